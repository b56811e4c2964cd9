"""Import: an interchange JSON document (ours, circuit-tracer's, the paper's fork's) as a
:class:`~atlas.graph.Graph` (:func:`graph_from_json`), with the id-collision rules of the
package docstring."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from atlas.interchange.ids import (
    FEATURE_ID_RE,
    FEATURE_TYPE_ERROR,
    FEATURE_TYPE_LOGIT,
    FEATURE_TYPE_TOKEN,
    FEATURE_TYPES_READ,
    IMAGE_SOFT_TOKEN,
    TOKEN_ID_RE,
    cantor_unpair,
)


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
        m = TOKEN_ID_RE.match(nid)
        if not m:
            raise InputError(f"embedding node id {nid!r} is not E_<token_id>_<pos>")
        if int(m.group(2)) != pos:
            raise InputError(f"embedding node {nid!r} disagrees with its ctx_idx {pos}")
        return mk(NodeKind.TOKEN, -1, -1, int(m.group(1)), 0.0, 0.0)
    layer = _int(raw.get("layer"), f"node {nid!r} layer")
    if ftype == FEATURE_TYPE_LOGIT:
        m = FEATURE_ID_RE.match(nid)
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
    if ftype in FEATURE_TYPES_READ:
        m = FEATURE_ID_RE.match(nid)
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
