"""Open an ``atlas export viewer`` directory in circuit-tracer 0.5.0's own local server.

Runs in circuit-tracer's environment (``bash bench/ct_env.sh`` makes ``bench/.venv-ct``), never
in the atlas's:

    bench/.venv-ct/bin/python bench/ct_viewer.py EXPORT_DIR

It starts ``circuit_tracer.frontend.local_server.serve(data_dir=EXPORT_DIR/graph_data)`` on a
free port, fetches the viewer's page, ``/data/graph-metadata.json`` and every
``/graph_data/{slug}.json`` it lists through that server, and checks each graph against
circuit-tracer's own pydantic model of the file (``frontend.graph_models.Model``) and each
feature file under ``EXPORT_DIR/features`` against ``frontend.feature_models.Model``. Prints one
JSON line (what was loaded) and exits 0, or prints the first failure and exits 1.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        return bytes(body)


def main(export_dir: str) -> dict[str, Any]:
    from circuit_tracer.frontend import feature_models, graph_models
    from circuit_tracer.frontend.local_server import serve

    root = Path(export_dir)
    port = free_port()
    server = serve(data_dir=str(root / "graph_data"), port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        page = fetch(base + "/index.html")
        if b"Attribution Graphs" not in page:
            raise RuntimeError("the viewer's index.html did not load")
        listing = json.loads(fetch(base + "/data/graph-metadata.json"))
        slugs = [g["slug"] for g in listing["graphs"]]
        if not slugs:
            raise RuntimeError("graph-metadata.json lists no graphs")
        nodes = links = 0
        for slug in slugs:
            doc = json.loads(fetch(f"{base}/graph_data/{slug}.json"))
            model = graph_models.Model(**doc)
            if model.metadata.slug != slug:
                raise RuntimeError(f"{slug}.json names slug {model.metadata.slug!r}")
            ids = {n.node_id for n in model.nodes}
            ends = [x if isinstance(x, dict) else x.model_dump() for x in model.links]
            dangling = [x for x in ends if x["source"] not in ids or x["target"] not in ids]
            if dangling:
                raise RuntimeError(f"{slug}: link {dangling[0]} names an unknown node")
            nodes += len(model.nodes)
            links += len(model.links)
        features = sorted((root / "features").rglob("*.json"))
        for f in features:
            feature_models.Model(**json.loads(f.read_text()))
        return {
            "graphs": len(slugs),
            "nodes": nodes,
            "links": links,
            "feature_files": len(features),
        }
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: ct_viewer.py EXPORT_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        print(json.dumps(main(sys.argv[1])))
    except Exception as exc:
        print(f"ct_viewer: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        sys.exit(1)
