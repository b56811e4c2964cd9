"""Interchange JSON files: the one reader (:func:`read_json`), the size-checked, streamed and
atomic writers (:func:`write_json`, :func:`write_document`)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlas.errors import InputError
from atlas.graph import (
    Graph,
    NodeKind,
)
from atlas.interchange.export import _json_parts, _JsonParts
from atlas.interchange.ids import FEATURE_TYPE_LOGIT
from atlas.interchange.parse import graph_from_json, read_document


def read_json(path: str | Path) -> Graph:
    """Read an interchange JSON graph file: the one reader behind every command that takes one.

    Beyond :func:`graph_from_json`, it keeps the logit tokens' texts from their labels
    (``Output "text" (p=...)``, as :func:`graph_to_json` writes them) in
    ``metadata.extra["logit_tokens"]``, so that a logit whose token is not in the prompt can
    still be found by its text once stored.
    """
    doc = read_document(path)
    graph = graph_from_json(doc)
    _keep_logit_texts(graph, doc)
    return graph


DEFAULT_MAX_LINKS = 5_000_000
"""Links above which :func:`write_json` refuses a graph by default (~70 bytes a link: 350 MB)."""


class GraphTooLargeForJson(InputError):
    """The graph has more links than the JSON size limit allows (its artifact holds it whole)."""


def write_json(
    graph: Graph, path: str | Path, *, max_links: int | None = None, **kwargs: Any
) -> Path:
    """Write :func:`graph_to_json`'s object to ``path``, streamed: same bytes as
    :func:`write_document` would write, without holding the links as Python objects.

    Written atomically (a temporary file renamed over ``path``); NaN and infinities refused.
    ``max_links`` (``None``: no limit) refuses a larger graph with :class:`GraphTooLargeForJson`
    before anything is written. ``kwargs`` go to :func:`graph_to_json`. Returns the path.
    """
    n_links = int(graph.edge_weight.shape[0])
    if max_links is not None and n_links > max_links:
        raise GraphTooLargeForJson(
            f"graph JSON not written: {n_links:,} links is over the limit of {max_links:,}"
        )
    if n_links and not bool(graph.edge_weight.isfinite().all()):
        raise ValueError("Out of range float values are not JSON compliant")
    parts = _json_parts(graph, **kwargs)
    return _write_atomically(path, lambda fh: _stream_document(fh, parts, graph))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _stream_document(fh: Any, parts: _JsonParts, graph: Graph, chunk: int = 1 << 16) -> None:
    """Write the object ``{"metadata", "qParams", "nodes", "links"}`` as :func:`_dumps` would,
    the links a chunk at a time (node ids are plain ASCII and weights finite floats, so a link
    is formatted directly, as ``json`` formats it)."""
    fh.write('{"metadata":' + _dumps(parts.metadata) + ',"qParams":' + _dumps(parts.qparams))
    fh.write(',"nodes":[' + ",".join(_dumps(node) for node in parts.nodes) + '],"links":[')
    ids, first = parts.ids, True
    for i in range(0, int(graph.edge_weight.shape[0]), chunk):
        rows = zip(
            graph.edge_target[i : i + chunk].tolist(),
            graph.edge_source[i : i + chunk].tolist(),
            graph.edge_weight[i : i + chunk].tolist(),
            strict=True,
        )
        text = ",".join(
            f'{{"source":"{ids[s]}","target":"{ids[t]}","weight":{float.__repr__(w)}}}'
            for t, s, w in rows
        )
        fh.write(text if first else "," + text)
        first = False
    fh.write("]}")


def _write_atomically(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(text file)`` on a temporary file in ``path``'s directory, then rename it over
    ``path``, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_document(doc: dict[str, Any], path: str | Path) -> Path:
    """Write an interchange JSON object atomically: compact UTF-8, NaN refused.

    A temporary file in the same directory is renamed over ``path``, so a reader never sees
    half a file. Returns the path.
    """
    text = _dumps(doc)
    return _write_atomically(path, lambda fh: fh.write(text))


_OUTPUT_LABEL = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.DOTALL)


def _keep_logit_texts(graph: Graph, doc: Any) -> None:
    if graph.metadata.extra.get("logit_tokens") or not isinstance(doc, dict):
        return
    texts: dict[int, str] = {}
    for raw in doc.get("nodes") or []:
        if not isinstance(raw, dict) or raw.get("feature_type") != FEATURE_TYPE_LOGIT:
            continue
        m = _OUTPUT_LABEL.match(str(raw.get("clerp") or ""))
        tid = raw.get("feature")
        if m and isinstance(tid, int):
            texts[tid] = m.group(1)
    logits = [
        int(t)
        for k, t in zip(graph.kind.tolist(), graph.token_id.tolist(), strict=True)
        if k == NodeKind.LOGIT
    ]
    if texts and all(t in texts for t in logits):
        graph.metadata.extra["logit_tokens"] = [texts[t] for t in logits]
