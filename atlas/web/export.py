"""``atlas export viewer``: stored prompts in the layout of the attribution-graphs frontend.

    DIR/graph-metadata.json                 {"graphs": [metadata of each graph]}
    DIR/graph_data/{slug}.json              one graph each (interchange JSON, labels as clerp)
    DIR/graph_data/graph-metadata.json      the same index again, beside the graphs
    DIR/features/{scan}/{feature}.json      a feature file per feature node (``feature`` is the
                                            node's ``feature`` field, the frontend's index)

circuit-tracer's local server (``circuit_tracer.frontend.local_server.serve(data_dir=...)``)
reads ``/data/graph-metadata.json`` and ``/graph_data/{slug}.json`` from one flat directory:
give it ``DIR/graph_data``. Its frontend fetches feature files from Anthropic's server, so the
local ``features/`` serve frontends that read them from beside the graphs (a static copy of the
published frontend, the Neuronpedia uploader). Slugs are prompt ids; the scan is the model name
with anything but ``[A-Za-z0-9._-]`` replaced, so every path stays inside ``DIR``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import neo4j

from atlas.errors import InputError
from atlas.graph import NodeKind
from atlas.interchange import write_document
from atlas.store import queries as Q
from atlas.store import read
from atlas.store.connection import read_rows
from atlas.store.ingest import feature_ref

#: Top activating examples written per feature file.
FEATURE_EXAMPLES = 10
#: Features whose properties are read per round trip.
FEATURE_BATCH = 500


def safe_name(text: str) -> str:
    """``text`` as one path component: runs of other characters than ``[A-Za-z0-9._-]``
    become ``-``; never empty, never ``.`` or ``..``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name[:120] or "scan"


@dataclass(frozen=True)
class ViewerExport:
    """What an export wrote: the directory, the slugs of its graphs, its feature files."""

    out: Path
    slugs: list[str]
    n_features: int


def export_viewer(
    driver: neo4j.Driver,
    out: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    limit: int = 100,
    database: str | None = None,
    timeout_s: float = read.DEFAULT_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> ViewerExport:
    """Write the stored ``prompts`` (ids or unique prefixes; default: the ``limit`` newest) to
    ``out`` in the frontend's layout (module docstring). Files already there with other names
    are left alone; the index lists exactly the graphs of this export."""
    out = Path(out)
    ids = list(prompts or [])
    if not ids:
        listed = read.list_prompts(driver, limit=limit, database=database, timeout_s=timeout_s)
        ids = [r["id"] for r in listed]
    if not ids:
        raise InputError("no stored prompts to export")
    graphs_dir = out / "graph_data"
    graphs_dir.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, Any]] = []
    wanted: dict[str, tuple[str, int, str]] = {}  # fid -> (scan, frontend index, prompt)
    for n, pid in enumerate(ids, 1):
        doc = read.export_json(driver, pid, database=database, timeout_s=timeout_s)
        meta = doc["metadata"]
        slug = safe_name(meta["slug"])
        scan = safe_name(str(meta["scan"]))
        meta["slug"], meta["scan"] = slug, scan
        tset = meta["atlas"]["graph_metadata"]["transcoders"]["content_hash"]
        for node in doc["nodes"]:
            if node["feature_type"] == NodeKind.FEATURE.feature_type:
                layer, index_in_layer = _layer_index(node["node_id"])
                wanted.setdefault(
                    feature_ref(tset, layer, index_in_layer), (scan, int(node["feature"]), slug)
                )
        _write(graphs_dir / f"{slug}.json", doc)
        index.append({k: v for k, v in meta.items() if k != "atlas"})
        if progress:
            progress(f"graph {n}/{len(ids)}: {slug}")
    listing = {"graphs": index}
    _write(out / "graph-metadata.json", listing)
    _write(graphs_dir / "graph-metadata.json", listing)
    n_features = _write_features(driver, out, wanted, database=database, timeout_s=timeout_s)
    return ViewerExport(out=out, slugs=[g["slug"] for g in index], n_features=n_features)


def _layer_index(node_id: str) -> tuple[int, int]:
    """``(layer, feature)`` of a feature node id ``{layer}_{feature}_{pos}``."""
    parts = node_id.split("_")
    if len(parts) != 3:
        raise InputError(f"unexpected feature node id {node_id!r}")
    return int(parts[0]), int(parts[1])


def _write_features(
    driver: neo4j.Driver,
    out: Path,
    wanted: dict[str, tuple[str, int, str]],
    *,
    database: str | None,
    timeout_s: float,
) -> int:
    """One feature file per wanted feature: label, logit lens, top activating examples."""
    n_prompts = max(read.count_prompts(driver, database=database, timeout_s=timeout_s), 1)
    fids = sorted(wanted)
    written = 0
    for start in range(0, len(fids), FEATURE_BATCH):
        batch = fids[start : start + FEATURE_BATCH]

        def rows(text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return read_rows(
                driver, text, params, database=database, timeout_s=timeout_s, what="export"
            )

        props = {r["fid"]: r for r in rows(Q.WEB_EXPORT_FEATURES, {"fids": batch})}
        tops = {
            r["fid"]: r["top"]
            for r in rows(Q.TOP_ACTIVATIONS, {"fids": batch, "limit": FEATURE_EXAMPLES})
        }
        prompt_ids = sorted({t["prompt"] for top in tops.values() for t in top})
        tokens = {r["id"]: r["tokens"] or [] for r in rows(Q.PROMPT_TOKENS, {"ids": prompt_ids})}
        for fid in batch:
            if fid not in props:
                continue
            scan, index, _ = wanted[fid]
            doc = _feature_doc(props[fid], tops.get(fid, []), tokens, n_prompts)
            _write(out / "features" / scan / f"{index}.json", doc)
            written += 1
    return written


def _feature_doc(
    props: dict[str, Any],
    top: list[dict[str, Any]],
    tokens: dict[str, list[str]],
    n_prompts: int,
) -> dict[str, Any]:
    """A feature file in the frontend's shape (circuit-tracer's ``feature_models.Model``)."""
    examples = []
    for t in top:
        toks = list(tokens.get(t["prompt"], []))
        pos = int(t["pos"])
        if not 0 <= pos < len(toks):
            continue
        acts = [0.0] * len(toks)
        acts[pos] = float(t["activation"] or 0.0)
        examples.append(
            {
                "tokens_acts_list": acts,
                "train_token_ind": pos,
                "is_repeated_datapoint": False,
                "tokens": toks,
            }
        )
    label = props.get("label")
    return {
        "transcoder_id": str(props["fid"]),
        "index": int(props["index"]),
        "layer": int(props["layer"]),
        "label": label or "",
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
        "top_logits": list(props.get("top_tokens") or []),
        "bottom_logits": list(props.get("bottom_tokens") or []),
        "act_min": 0.0,
        "act_max": float(props.get("max_act") or 1.0),
        "quantile_values": [],
        "histogram": [],
        "activation_frequency": (props.get("n_prompts") or 0) / n_prompts,
    }


def _write(path: Path, obj: dict[str, Any]) -> None:
    """``obj`` as JSON at ``path`` (atomically; NaN refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_document(obj, path)
