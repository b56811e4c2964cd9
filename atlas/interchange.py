"""Interchange JSON: export a :class:`~atlas.graph.Graph` to, and import one from, the graph format of
Anthropic's attribution-graphs frontend and Neuronpedia (``graph-schema.json``).

Format (one JSON object)::

    {"metadata": {"slug", "scan", "prompt", "prompt_tokens", "node_threshold", "schema_version",
                  "generation_settings", "pruning_settings", "info", ...},
     "qParams":  {"pinnedIds": [...], "supernodes": [[label, node_id, ...], ...],
                  "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes":    [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp",
                   "influence", "activation", "token_prob", "is_target_logit", ...}, ...],
     "links":    [{"source": node_id, "target": node_id, "weight": A[target, source]}, ...]}

Node ids written by :func:`graph_to_json` are the project's (see :mod:`atlas.graph`):

==========  =================================  ===============================================
kind        ``node_id``                        ``feature`` field / ``feature_type``
==========  =================================  ===============================================
feature     ``{layer}_{feature}_{pos}``        Cantor pair ``(l+f)(l+f+1)/2 + f`` (schema 1) /
                                               ``"cross layer transcoder"``
error       ``{layer}_-1_{pos}``               ``-1`` / ``"mlp reconstruction error"``
token       ``E_{token_id}_{pos}``             ``pos`` / ``"embedding"``
logit       ``{n_layers+1}_{token_id}_{pos}``  ``token_id`` / ``"logit"``
==========  =================================  ===============================================

The error id differs from circuit-tracer 0.5.0, which writes ``0_{layer}_{pos}`` for errors: that
id collides with the layer-0 feature ``layer`` at the same position (circuit-tracer issue #78).
:func:`graph_from_json` reads both. It classifies nodes by ``feature_type`` (not by id) and
resolves a colliding id in a link as follows: as a *target* it is the feature (error nodes have
no incoming edges); as a *source* it is the candidate consistent with the order circuit-tracer
writes links in (grouped by target, sources in node order) and with the layer rule (a source
sits below its target). A collision that none of these settles is refused with
:class:`~atlas.errors.InputError`.

``weight`` is the raw adjacency entry (not normalised). ``influence`` is the node's cumulative
influence rank from pruning (the frontend's dynamic pruning reads it), ``null`` where unknown.
Everything the frontend does not need but a lossless round trip does (our full
:class:`~atlas.graph.GraphMetadata`, the input ids) travels under ``metadata["atlas"]``; the
schema allows extra keys, and foreign files simply lack it.

Image soft tokens (kind ``image``) are written as the paper's viewer expects them: embedding nodes
``E_{image_token_id}_{pos}`` whose ``prompt_tokens`` entry is ``"<image_soft_token>"``, plus our
fields ``image_sha256``, ``image_row``, ``image_col`` and ``image_k`` (k counted from the first
image token, the index of its ``attention_maps/{k}.png``); the grid and the rollout maps travel
under ``metadata["atlas"]["image"]``. The importer reads them back, and reads the paper's own files
(no image fields) by their ``"<image_soft_token>"`` prompt tokens, with the row-major pooled grid.

Supernodes (``qParams.supernodes``) and labels (``clerp``) come back in
``graph.metadata.extra["supernodes"]`` (``[[label, node_id, ...], ...]`` with the project's ids)
and ``graph.metadata.extra["labels"]`` (``{node_id: label}``).

Files: this module is the only graph-JSON reader and writer. :func:`read_json` reads a file
(one-line :class:`~atlas.errors.InputError` for an unreadable or malformed one);
:func:`write_json` / :func:`write_document` write atomically and refuse NaN; :func:`write_json`
streams the links and refuses a graph above a link count the caller sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from atlas.errors import InputError
from atlas.graph import (
    AttributionSettings,
    Graph,
    GraphMetadata,
    ImageMeta,
    ModelInfo,
    NodeKind,
    TranscoderInfo,
    node_id,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""``metadata.schema_version`` written by :func:`graph_to_json` (Cantor-paired ``feature``)."""

FEATURE_TYPE_FEATURE = NodeKind.FEATURE.feature_type
FEATURE_TYPE_ERROR = NodeKind.ERROR.feature_type
FEATURE_TYPE_TOKEN = NodeKind.TOKEN.feature_type
FEATURE_TYPE_LOGIT = NodeKind.LOGIT.feature_type

#: feature_type strings read as transcoder features (the frontend draws all of them the same way).
_FEATURE_TYPES = {FEATURE_TYPE_FEATURE, "transcoder", "per layer transcoder", "plt", "clt"}

_FEATURE_ID = re.compile(r"^(-?\d+)_(-?\d+)_(-?\d+)$")
_TOKEN_ID = re.compile(r"^E_(-?\d+)_(-?\d+)$")

GENERATOR_NAME = "circuit-atlas"


def cantor_pair(layer: int, feature: int) -> int:
    """Cantor pairing of (layer, feature), the ``feature`` field under schema_version 1."""
    s = layer + feature
    return s * (s + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of :func:`cantor_pair`: ``z -> (layer, feature)``."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature


# --------------------------------------------------------------------------------------- export
def _float_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class _NodeRow(NamedTuple):
    """One node's columns, as the per-kind field writers below read them."""

    layer: int
    pos: int
    feature: int
    token_id: int
    activation: float
    logit_prob: float
    n_layers: int


def _feature_fields(r: _NodeRow) -> dict[str, Any]:
    return {
        "feature": cantor_pair(r.layer, r.feature),
        "layer": str(r.layer),
        "jsNodeId": f"{r.layer}_{r.feature}-0",
        "activation": float(r.activation),
    }


def _error_fields(r: _NodeRow) -> dict[str, Any]:
    return {"feature": -1, "layer": str(r.layer), "jsNodeId": f"{r.layer}_-1_{r.pos}-0"}


def _token_fields(r: _NodeRow) -> dict[str, Any]:
    return {"feature": int(r.pos), "layer": "E", "jsNodeId": f"E_{r.token_id}-{r.pos}"}


def _logit_fields(r: _NodeRow) -> dict[str, Any]:
    return {
        "feature": int(r.token_id),
        "layer": str(r.n_layers + 1),
        "token_prob": float(r.logit_prob),
        "jsNodeId": f"L_{r.token_id}-{r.pos}",
    }


#: The frontend's kind-specific node fields (``feature_type`` comes from :class:`NodeKind`).
_KIND_FIELDS: dict[NodeKind, Callable[[_NodeRow], dict[str, Any]]] = {
    NodeKind.FEATURE: _feature_fields,
    NodeKind.ERROR: _error_fields,
    NodeKind.TOKEN: _token_fields,
    NodeKind.LOGIT: _logit_fields,
    NodeKind.IMAGE: _token_fields,
}


def _normalise_supernodes(
    supernodes: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None,
) -> list[list[str]]:
    if supernodes is None:
        return []
    if isinstance(supernodes, Mapping):
        return [[str(label), *[str(m) for m in members]] for label, members in supernodes.items()]
    out: list[list[str]] = []
    for i, sn in enumerate(supernodes):
        if isinstance(sn, str) or not isinstance(sn, Sequence) or len(sn) < 1:
            raise InputError(f"supernode {i} must be [label, node_id, ...], got {sn!r}")
        out.append([str(x) for x in sn])
    return out


class _JsonParts(NamedTuple):
    """A graph's interchange JSON object but for its links, which are produced on demand."""

    metadata: dict[str, Any]
    qparams: dict[str, Any]
    nodes: list[dict[str, Any]]
    ids: list[str]


def graph_to_json(
    graph: Graph,
    *,
    slug: str | None = None,
    labels: Mapping[str, str] | None = None,
    supernodes: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None = None,
    token_decoder: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """Export ``graph`` as an interchange JSON object (a ``dict`` ready for :func:`json.dump`).

    The arguments are :func:`_json_parts`'s; :func:`write_json` writes the same object to a file
    without building its links as Python objects.
    """
    parts = _json_parts(
        graph, slug=slug, labels=labels, supernodes=supernodes, token_decoder=token_decoder
    )
    links = [
        {"source": parts.ids[s], "target": parts.ids[t], "weight": w}
        for t, s, w in zip(
            graph.edge_target.tolist(),
            graph.edge_source.tolist(),
            graph.edge_weight.tolist(),
            strict=True,
        )
    ]
    return {
        "metadata": parts.metadata,
        "qParams": parts.qparams,
        "nodes": parts.nodes,
        "links": links,
    }


def _json_parts(
    graph: Graph,
    *,
    slug: str | None = None,
    labels: Mapping[str, str] | None = None,
    supernodes: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None = None,
    token_decoder: Callable[[int], str] | None = None,
) -> _JsonParts:
    """Everything of ``graph``'s interchange JSON object but its links.

    Args:
        graph: the (usually pruned) graph; every node and edge is written.
        slug: the graph's slug; default: the prompt id.
        labels: ``{node_id: label}`` written as ``clerp``; merged over
            ``graph.metadata.extra["labels"]``.
        supernodes: ``[[label, node_id, ...], ...]`` (or ``{label: [node_id, ...]}``) written to
            ``qParams.supernodes``; default ``graph.metadata.extra["supernodes"]``.
        token_decoder: token id -> text, for the logit nodes' ``Output "..."`` labels. Without
            it, a logit token that also occurs in the prompt takes that position's text, others
            are written as ``#<id>``.

    Raises:
        InputError: a label or supernode names a node id the graph does not have.
    """
    meta = graph.metadata
    ids = graph.node_ids()
    id_set = set(ids)
    all_labels: dict[str, str] = dict(meta.extra.get("labels") or {})
    all_labels.update(labels or {})
    unknown = sorted(set(all_labels) - id_set)
    if unknown:
        raise InputError(f"label for unknown node id {unknown[0]!r} ({len(unknown)} unknown)")
    sns = _normalise_supernodes(
        supernodes if supernodes is not None else meta.extra.get("supernodes")
    )
    for sn in sns:
        missing = [m for m in sn[1:] if m not in id_set]
        if missing:
            raise InputError(f"supernode {sn[0]!r} names unknown node id {missing[0]!r}")

    input_ids = graph.input_ids.tolist()
    tokens = list(meta.tokens)
    text_of_id: dict[int, str] = {}
    for tid, text in zip(input_ids, tokens, strict=False):
        text_of_id.setdefault(int(tid), text)

    def decode(tid: int) -> str:
        if token_decoder is not None:
            return token_decoder(tid)
        return text_of_id.get(tid, f"#{tid}")

    first_logit = True
    nodes: list[dict[str, Any]] = []
    cols = zip(
        ids,
        graph.kind.tolist(),
        graph.layer.tolist(),
        graph.pos.tolist(),
        graph.feature.tolist(),
        graph.token_id.tolist(),
        graph.activation.tolist(),
        graph.influence.tolist(),
        graph.logit_prob.tolist(),
        strict=True,
    )
    for nid, kind, layer, pos, feat, tid, act, infl, prob in cols:
        node_kind = NodeKind(kind)
        node: dict[str, Any] = {
            "node_id": nid,
            "feature": None,
            "layer": "",
            "ctx_idx": int(pos),
            "feature_type": node_kind.feature_type,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "",
            "clerp": all_labels.get(nid, ""),
            "influence": _float_or_none(infl),
            "activation": None,
        }
        row = _NodeRow(layer, pos, feat, tid, act, prob, graph.n_layers)
        node.update(_KIND_FIELDS[node_kind](row))
        if node_kind == NodeKind.LOGIT:
            node["is_target_logit"] = first_logit
            if not node["clerp"]:
                node["clerp"] = f'Output "{decode(int(tid))}" (p={prob:.3f})'
            first_logit = False
        nodes.append(node)

    _write_image_fields(graph, nodes)

    settings = meta.settings
    generation: dict[str, Any] = {
        "max_n_logits": settings.max_n_logits,
        "desired_logit_prob": settings.desired_logit_prob,
    }
    if settings.max_feature_nodes is not None:
        generation["max_feature_nodes"] = settings.max_feature_nodes
    generator: dict[str, Any] = {"name": GENERATOR_NAME}
    if meta.code_version:
        generator["version"] = meta.code_version
    info: dict[str, Any] = {"generator": generator, "source_urls": [meta.transcoders.name]}
    metadata: dict[str, Any] = {
        "slug": slug or meta.prompt_id(),
        "scan": meta.model.name,
        "transcoder_list": [],
        "prompt_tokens": _viewer_tokens(graph, tokens),
        "prompt": meta.prompt,
        "node_threshold": settings.node_threshold,
        "schema_version": SCHEMA_VERSION,
        "generation_settings": generation,
        "pruning_settings": {
            "node_threshold": settings.node_threshold,
            "edge_threshold": settings.edge_threshold,
        },
        "info": info,
        "atlas": {
            "graph_metadata": meta.model_dump(mode="json"),
            "input_ids": input_ids,
        },
    }
    if graph.image_positions is not None:
        metadata["atlas"]["image"] = _image_block(graph)
    qparams = {
        "pinnedIds": [],
        "supernodes": sns,
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return _JsonParts(metadata, qparams, nodes, ids)


# --------------------------------------------------------------------------------------- import
@dataclass
class _Node:
    kind: NodeKind
    layer: int
    pos: int
    feature: int
    token_id: int
    activation: float
    influence: float
    logit_prob: float
    file_order: int
    json_id: str
    clerp: str

    def sort_key(self) -> tuple[int, ...]:
        if self.kind == NodeKind.FEATURE:
            return (0, self.layer, self.pos, self.feature)
        if self.kind == NodeKind.ERROR:
            return (1, self.layer, self.pos, 0)
        if self.kind in (NodeKind.TOKEN, NodeKind.IMAGE):
            return (2, self.pos, 0, 0)
        return (3, self.file_order, 0, 0)


def read_document(path: str | Path) -> Any:
    """The parsed JSON of a graph file; :class:`InputError` (one line) when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InputError(f"cannot read graph JSON {path}: {reason}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc


def _load(data: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(data, (str, Path)):
        data = read_document(data)
    if not isinstance(data, dict):
        raise InputError(f"graph JSON must be an object, got {type(data).__name__}")
    for key, typ in (("metadata", dict), ("nodes", list), ("links", list)):
        if key not in data:
            raise InputError(f"graph JSON has no {key!r}")
        if not isinstance(data[key], typ):
            raise InputError(f"graph JSON {key!r} must be a {typ.__name__}")
    qp = data.get("qParams", {})
    if qp is not None and not isinstance(qp, dict):
        raise InputError("graph JSON 'qParams' must be an object")
    return data


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise InputError(f"{what} must be an integer, got {value!r}") from exc


def _num(value: Any, what: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r}")
    return float(value)


def _parse_node(raw: Any, i: int, schema_version: int | None) -> _Node:
    if not isinstance(raw, dict):
        raise InputError(f"node {i} is not an object")
    nid = raw.get("node_id")
    if not isinstance(nid, str) or not nid:
        raise InputError(f"node {i} has no string node_id")
    ftype = raw.get("feature_type")
    if not isinstance(ftype, str):
        raise InputError(f"node {nid!r} has no feature_type")
    pos = _int(raw.get("ctx_idx"), f"node {nid!r} ctx_idx")
    if pos < 0:
        raise InputError(f"node {nid!r} has negative ctx_idx")
    infl = _num(raw.get("influence"), f"node {nid!r} influence", math.nan)
    clerp = raw.get("clerp") or ""
    if not isinstance(clerp, str):
        raise InputError(f"node {nid!r} clerp must be a string")

    def mk(kind: NodeKind, layer: int, feat: int, tid: int, act: float, prob: float) -> _Node:
        return _Node(kind, layer, pos, feat, tid, act, infl, prob, i, nid, clerp)

    if ftype == FEATURE_TYPE_TOKEN:
        m = _TOKEN_ID.match(nid)
        if not m:
            raise InputError(f"embedding node id {nid!r} is not E_<token_id>_<pos>")
        if int(m.group(2)) != pos:
            raise InputError(f"embedding node {nid!r} disagrees with its ctx_idx {pos}")
        return mk(NodeKind.TOKEN, -1, -1, int(m.group(1)), 0.0, 0.0)
    layer = _int(raw.get("layer"), f"node {nid!r} layer")
    if ftype == FEATURE_TYPE_LOGIT:
        m = _FEATURE_ID.match(nid)
        tid = raw.get("feature")
        token_id = _int(tid, f"logit node {nid!r} feature") if tid is not None else None
        if token_id is None:
            if not m:
                raise InputError(f"logit node id {nid!r} is not <layer>_<token_id>_<pos>")
            token_id = int(m.group(2))
        prob = _num(raw.get("token_prob"), f"node {nid!r} token_prob", 0.0)
        return mk(NodeKind.LOGIT, layer, -1, token_id, 0.0, prob)
    if layer < 0:
        raise InputError(f"node {nid!r} has negative layer")
    if ftype == FEATURE_TYPE_ERROR:
        return mk(NodeKind.ERROR, layer, -1, -1, 0.0, 0.0)
    if ftype in _FEATURE_TYPES:
        m = _FEATURE_ID.match(nid)
        if m and int(m.group(1)) == layer and int(m.group(3)) == pos:
            feat = int(m.group(2))
        else:
            raw_feat = _int(raw.get("feature"), f"node {nid!r} feature")
            feat = cantor_unpair(raw_feat)[1] if schema_version == 1 else raw_feat
        if feat < 0:
            raise InputError(f"feature node {nid!r} has a negative feature index")
        act = _num(raw.get("activation"), f"node {nid!r} activation", 0.0)
        if not math.isfinite(act):
            raise InputError(f"feature node {nid!r} has a non-finite activation")
        return mk(NodeKind.FEATURE, layer, feat, -1, act, 0.0)
    raise InputError(f"node {nid!r} has unknown feature_type {ftype!r}")


def _resolve_links(
    links: list[Any],
    by_id: dict[str, list[int]],
    nodes: list[_Node],
) -> tuple[list[int], list[int], list[float]]:
    """Map link endpoints to node indices (``nodes`` is in canonical order)."""
    n = len(links)
    tgt: list[int] = [-1] * n
    src: list[int] = [-1] * n
    tgt_raw: list[str] = [""] * n
    src_cands: list[list[int]] = [[]] * n
    weights: list[float] = [0.0] * n
    for i, raw in enumerate(links):
        if not isinstance(raw, dict):
            raise InputError(f"link {i} is not an object")
        s, t, w = raw.get("source"), raw.get("target"), raw.get("weight")
        if not isinstance(s, str) or not isinstance(t, str):
            raise InputError(f"link {i} needs string source and target")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise InputError(f"link {i} ({s} -> {t}) has a non-numeric weight {w!r}")
        if not math.isfinite(w):
            raise InputError(f"link {i} ({s} -> {t}) has a non-finite weight {w!r}")
        if t not in by_id:
            raise InputError(f"link {i} targets unknown node id {t!r}")
        if s not in by_id:
            raise InputError(f"link {i} comes from unknown node id {s!r}")
        tc = by_id[t]
        # An ambiguous target (circuit-tracer's error/feature id collision) is the feature:
        # error nodes never have incoming edges.
        tgt[i] = tc[0] if len(tc) == 1 else next(j for j in tc if nodes[j].kind == NodeKind.FEATURE)
        tgt_raw[i] = t
        src_cands[i] = by_id[s]
        if len(by_id[s]) == 1:
            src[i] = by_id[s][0]
        weights[i] = float(w)

    for i in range(n):
        if src[i] >= 0:
            continue
        target = nodes[tgt[i]]
        cands = src_cands[i]
        by_layer = [
            j for j in cands if target.kind == NodeKind.LOGIT or nodes[j].layer < target.layer
        ]
        # order rule: within a run of links with the same target, sources ascend in node order
        lo, hi = -1, len(nodes)
        k = i - 1
        while k >= 0 and tgt_raw[k] == tgt_raw[i]:
            if src[k] >= 0:
                lo = src[k]
                break
            k -= 1
        k = i + 1
        while k < n and tgt_raw[k] == tgt_raw[i]:
            if len(src_cands[k]) == 1:
                hi = src_cands[k][0]
                break
            k += 1
        by_order = [j for j in by_layer if lo < j < hi]
        chosen = by_order if by_order else by_layer
        if len(chosen) != 1:
            sid = links[i]["source"]
            raise InputError(
                f"link {i} source {sid!r} is ambiguous (circuit-tracer 0.5.0 error/feature id "
                f"collision, issue #78) and cannot be resolved"
            )
        src[i] = chosen[0]
    return tgt, src, weights


def graph_from_json(data: dict[str, Any] | str | Path) -> Graph:
    """Import an interchange JSON graph (ours, circuit-tracer's, or any schema-valid one).

    Args:
        data: the parsed JSON object, or the path of a ``.json`` file.

    Returns:
        A :class:`~atlas.graph.Graph` with nodes in the canonical order (features by layer, pos,
        feature; errors layer-major; tokens; logits in file order) and edges sorted by (target,
        source). Supernodes and labels are in ``metadata.extra``; for foreign files the model
        and transcoder provenance is what the file says (``scan``), with unknown sizes as 0.

    Raises:
        InputError: malformed JSON or structure, duplicate node ids, links to unknown ids,
            non-finite weights, duplicate links, unresolvable id collisions.
    """
    doc = _load(data)
    md = doc["metadata"]
    qp = doc.get("qParams") or {}
    schema_version = md.get("schema_version")
    atlas_block = md.get("atlas") if isinstance(md.get("atlas"), dict) else None

    parsed = [_parse_node(raw, i, schema_version) for i, raw in enumerate(doc["nodes"])]
    image_nodes = _mark_image_nodes(doc["nodes"], parsed, md.get("prompt_tokens"))

    # duplicate ids: only circuit-tracer's error/feature collision is tolerated
    seen: dict[str, list[_Node]] = {}
    for nd in parsed:
        seen.setdefault(nd.json_id, []).append(nd)
    for nid, group in seen.items():
        if len(group) == 1:
            continue
        kinds = sorted(g.kind for g in group)
        if len(group) == 2 and kinds == [NodeKind.FEATURE, NodeKind.ERROR]:
            continue
        raise InputError(f"duplicate node id {nid!r} in graph JSON")

    logits = [nd for nd in parsed if nd.kind == NodeKind.LOGIT]
    if logits:
        n_layers = logits[0].layer - 1
        if any(nd.layer != logits[0].layer for nd in logits):
            raise InputError("logit nodes disagree on the logit layer")
    elif atlas_block is not None:
        n_layers = int(atlas_block["graph_metadata"]["model"]["n_layers"])
    else:
        n_layers = 1 + max((nd.layer for nd in parsed), default=-1)
    for nd in parsed:
        if nd.kind in (NodeKind.FEATURE, NodeKind.ERROR) and nd.layer >= n_layers:
            raise InputError(f"node {nd.json_id!r} is at layer {nd.layer} >= n_layers {n_layers}")
        if nd.kind == NodeKind.LOGIT:
            nd.layer = n_layers

    identities: set[tuple[int, ...]] = set()
    for nd in parsed:
        ident = (int(nd.kind), nd.layer, nd.pos, nd.feature, nd.token_id)
        if ident in identities:
            raise InputError(f"node {nd.json_id!r} duplicates another node")
        identities.add(ident)

    nodes = sorted(parsed, key=_Node.sort_key)
    by_id: dict[str, list[int]] = {}
    for j, nd in enumerate(nodes):
        by_id.setdefault(nd.json_id, []).append(j)

    tgt, src, weights = _resolve_links(doc["links"], by_id, nodes)
    pairs = set(zip(tgt, src, strict=True))
    if len(pairs) != len(tgt):
        raise InputError("graph JSON has duplicate links (same source and target)")

    prompt_tokens = md.get("prompt_tokens")
    if not isinstance(prompt_tokens, list) or not all(isinstance(t, str) for t in prompt_tokens):
        raise InputError("metadata.prompt_tokens must be a list of strings")
    n_pos = len(prompt_tokens)
    for nd in nodes:
        if nd.pos >= n_pos:
            raise InputError(f"node {nd.json_id!r} has ctx_idx {nd.pos} >= {n_pos} prompt tokens")
    if atlas_block is not None and isinstance(atlas_block.get("input_ids"), list):
        input_ids = [_int(x, "metadata.atlas.input_ids") for x in atlas_block["input_ids"]]
    else:
        input_ids = [-1] * n_pos
        for nd in nodes:
            if nd.kind in (NodeKind.TOKEN, NodeKind.IMAGE):
                input_ids[nd.pos] = nd.token_id

    metadata = _metadata(md, qp, nodes, n_layers, atlas_block)
    image_tensors = None
    if image_nodes:
        metadata, image_tensors = _read_image(metadata, image_nodes, atlas_block)

    columns = ("kind", "layer", "pos", "feature", "token_id", "activation", "influence")
    return Graph.from_columns(
        metadata,
        input_ids,
        {
            **{name: [getattr(nd, name) for nd in nodes] for name in columns},
            "logit_prob": [nd.logit_prob for nd in nodes],
        },
        {"target": tgt, "source": src, "weight": weights},
        image=image_tensors,
    )


def _our_id(nd: _Node, n_layers: int) -> str:
    return node_id(nd.kind, nd.layer, nd.pos, nd.feature, nd.token_id, n_layers)


def _metadata(
    md: dict[str, Any],
    qp: dict[str, Any],
    nodes: list[_Node],
    n_layers: int,
    atlas_block: dict[str, Any] | None,
) -> GraphMetadata:
    # json id -> our id, for supernode members (a colliding id means the feature, as for targets)
    id_map: dict[str, str] = {}
    for nd in nodes:
        if nd.json_id not in id_map or nd.kind == NodeKind.FEATURE:
            id_map[nd.json_id] = _our_id(nd, n_layers)
    labels = {
        _our_id(nd, n_layers): nd.clerp
        for nd in nodes
        if nd.clerp
        and nd.kind in (NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.IMAGE)
    }
    raw_sns = qp.get("supernodes") or []
    if not isinstance(raw_sns, list):
        raise InputError("qParams.supernodes must be a list")
    supernodes: list[list[str]] = []
    for i, sn in enumerate(raw_sns):
        if not isinstance(sn, list) or not sn or not all(isinstance(x, str) for x in sn):
            raise InputError(f"qParams.supernodes[{i}] must be [label, node_id, ...]")
        members = []
        for m in sn[1:]:
            if m not in id_map:
                raise InputError(f"supernode {sn[0]!r} names unknown node id {m!r}")
            members.append(id_map[m])
        supernodes.append([sn[0], *members])

    if atlas_block is not None and "graph_metadata" in atlas_block:
        try:
            meta = GraphMetadata.model_validate(atlas_block["graph_metadata"])
        except Exception as exc:  # pydantic.ValidationError: keep the message to one line
            first = str(exc).splitlines()[0]
            raise InputError(f"metadata.atlas.graph_metadata is malformed: {first}") from exc
        kept = dict(meta.extra)
        if labels:
            kept["labels"] = labels
        if supernodes:
            kept["supernodes"] = supernodes
        return meta.model_copy(update={"extra": kept})

    scan = md.get("scan")
    if not isinstance(scan, str) or not scan:
        raise InputError("metadata.scan must be a non-empty string")
    prompt = md.get("prompt")
    if not isinstance(prompt, str):
        raise InputError("metadata.prompt must be a string")
    gen: dict[str, Any] = md.get("generation_settings") or {}
    prune: dict[str, Any] = md.get("pruning_settings") or {}
    if not isinstance(gen, dict) or not isinstance(prune, dict):
        raise InputError("metadata generation_settings / pruning_settings must be objects")
    node_threshold = prune.get("node_threshold", md.get("node_threshold"))
    settings: dict[str, Any] = {"pruned": True}
    for key, value in (
        ("max_n_logits", gen.get("max_n_logits")),
        ("desired_logit_prob", gen.get("desired_logit_prob")),
        ("max_feature_nodes", gen.get("max_feature_nodes")),
        ("node_threshold", node_threshold),
        ("edge_threshold", prune.get("edge_threshold")),
    ):
        if value is not None:
            settings[key] = value
    try:
        attribution_settings = AttributionSettings(**settings)
    except Exception as exc:
        raise InputError(f"graph JSON settings are malformed: {str(exc).splitlines()[0]}") from exc
    scan_hash = hashlib.sha256(scan.encode()).hexdigest()[:16]
    extra: dict[str, Any] = {
        "imported_from": {
            "format": "interchange-json",
            "slug": md.get("slug"),
            "scan": scan,
            "schema_version": md.get("schema_version"),
        }
    }
    if labels:
        extra["labels"] = labels
    if supernodes:
        extra["supernodes"] = supernodes
    for key in ("pinnedIds", "clickedId"):
        if qp.get(key):
            extra.setdefault("qParams", {})[key] = qp[key]
    return GraphMetadata(
        prompt=prompt,
        tokens=list(md["prompt_tokens"]),
        model=ModelInfo(name=scan, family="unknown", n_layers=n_layers, d_model=0, vocab_size=0),
        transcoders=TranscoderInfo(
            name=scan, kind="unknown", content_hash=f"scan-{scan_hash}", d_transcoder=0
        ),
        settings=attribution_settings,
        extra=extra,
    )


# --------------------------------------------------------------------------------------- files
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


# --------------------------------------------------------------------------------------- images
#: The viewer's token text of an image soft token (the paper's Gemma-3 token).
IMAGE_SOFT_TOKEN = "<image_soft_token>"


def _image_index(graph: Graph) -> dict[int, tuple[int, int, int]]:
    """Position -> ``(k, row, col)`` of each image soft token of ``graph`` (empty for text)."""
    if graph.image_positions is None or graph.image_grid is None:
        return {}
    grid = graph.image_grid.tolist()
    return {p: (k, grid[k][0], grid[k][1]) for k, p in enumerate(graph.image_positions.tolist())}


def _viewer_tokens(graph: Graph, tokens: list[str]) -> list[str]:
    """``prompt_tokens`` as the paper's viewer reads them: ``<image_soft_token>`` at image
    positions whatever the model calls its image token."""
    index = _image_index(graph)
    return [IMAGE_SOFT_TOKEN if p in index else t for p, t in enumerate(tokens)]


def _write_image_fields(graph: Graph, nodes: list[dict[str, Any]]) -> None:
    """Our image fields on the image nodes of an exported graph (in place)."""
    index = _image_index(graph)
    if not index:
        return
    sha = graph.metadata.image_sha256
    for node in nodes:
        if node["feature_type"] == FEATURE_TYPE_TOKEN and node["ctx_idx"] in index:
            k, row, col = index[node["ctx_idx"]]
            node.update({"image_sha256": sha, "image_row": row, "image_col": col, "image_k": k})


def _image_block(graph: Graph) -> dict[str, Any]:
    """``metadata.atlas.image``: positions, grid and the rollout maps (nested lists, exact
    float32 values)."""
    assert graph.image_positions is not None and graph.image_grid is not None
    return {
        "positions": graph.image_positions.tolist(),
        "grid": graph.image_grid.tolist(),
        "rollout": graph.rollout.tolist() if graph.rollout is not None else None,
    }


def _mark_image_nodes(
    raws: list[Any], parsed: list[_Node], prompt_tokens: Any
) -> dict[int, tuple[int, int] | None]:
    """Turn the embedding nodes that are image soft tokens into image nodes (in place).

    Ours carry ``image_k``; the paper's files say it by their ``<image_soft_token>`` prompt
    token. Returns position -> ``(row, col)`` (``None`` where the file gives no grid).
    """
    tokens = prompt_tokens if isinstance(prompt_tokens, list) else []
    found: dict[int, tuple[int, int] | None] = {}
    for raw, nd in zip(raws, parsed, strict=True):
        if nd.kind != NodeKind.TOKEN or not isinstance(raw, dict):
            continue
        soft = nd.pos < len(tokens) and tokens[nd.pos] == IMAGE_SOFT_TOKEN
        if "image_k" not in raw and not soft:
            continue
        nd.kind = NodeKind.IMAGE
        if "image_row" in raw and "image_col" in raw:
            row = _int(raw["image_row"], f"node {nd.json_id!r} image_row")
            col = _int(raw["image_col"], f"node {nd.json_id!r} image_col")
            found[nd.pos] = (row, col)
        else:
            found[nd.pos] = None
    return found


def _read_image(
    meta: GraphMetadata,
    found: dict[int, tuple[int, int] | None],
    atlas_block: dict[str, Any] | None,
) -> tuple[GraphMetadata, dict[str, Any]]:
    """The metadata and image tensors of an imported image graph."""
    import torch

    positions = sorted(found)
    if any(found[p] is None for p in positions):  # the paper's files: row-major pooled grid
        side = math.isqrt(len(positions))
        if side * side != len(positions):
            raise InputError(f"{len(positions)} image tokens do not make a square grid")
        grid = [[k // side, k % side] for k in range(len(positions))]
    else:
        grid = [list(found[p]) for p in positions]  # type: ignore[arg-type]
    block = (atlas_block or {}).get("image") or {}
    rollout = block.get("rollout")
    maps = torch.tensor(rollout, dtype=torch.float32) if rollout is not None else None
    if meta.image is None:
        image = ImageMeta(sha256=meta.image_sha256, n_tokens=len(positions))
        meta = meta.model_copy(update={"image": image})
    tensors = {
        "image_positions": torch.tensor(positions, dtype=torch.int64),
        "image_grid": torch.tensor(grid, dtype=torch.int64).reshape(-1, 2),
        "rollout": maps,
    }
    return meta, tensors
