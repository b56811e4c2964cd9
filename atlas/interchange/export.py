"""Export: a :class:`~atlas.graph.Graph` as an interchange JSON document (:func:`graph_to_json`),
with our metadata, supernodes and image fields."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from atlas.errors import InputError
from atlas.graph import (
    Graph,
    NodeKind,
)
from atlas.interchange.ids import (
    FEATURE_TYPE_TOKEN,
    GENERATOR_NAME,
    IMAGE_SOFT_TOKEN,
    SCHEMA_VERSION,
    cantor_pair,
    image_index,
)


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


def _viewer_tokens(graph: Graph, tokens: list[str]) -> list[str]:
    """``prompt_tokens`` as the paper's viewer reads them: ``<image_soft_token>`` at image
    positions whatever the model calls its image token."""
    index = image_index(graph)
    return [IMAGE_SOFT_TOKEN if p in index else t for p, t in enumerate(tokens)]


def _write_image_fields(graph: Graph, nodes: list[dict[str, Any]]) -> None:
    """Our image fields on the image nodes of an exported graph (in place)."""
    index = image_index(graph)
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
