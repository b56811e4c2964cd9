"""Hostile graph artifacts: well-formed safetensors files that break the layout contract.

Each variant parses as safetensors and carries valid-looking metadata, but contradicts
:class:`atlas.graph.Graph`'s contract in one way. Tests write them with :func:`write_hostile`
to check that every reader refuses them before anything is stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from atlas.graph import Graph, NodeKind

Tensors = dict[str, torch.Tensor]
Mutation = Callable[[Tensors, dict[str, Any]], None]


def _first(tensors: Tensors, kind: NodeKind) -> int:
    return int(torch.nonzero(tensors["kind"] == int(kind)).flatten()[0])


def _negative_edge_index(t: Tensors, _m: dict[str, Any]) -> None:
    t["edge_source"][0] = -1


def _edge_index_out_of_range(t: Tensors, _m: dict[str, Any]) -> None:
    t["edge_target"][0] = t["kind"].shape[0]


def _duplicated_edges(t: Tensors, _m: dict[str, Any]) -> None:
    for name in ("edge_target", "edge_source", "edge_weight"):
        t[name] = torch.cat([t[name], t[name][:1].repeat(1000)])


def _negative_layer(t: Tensors, _m: dict[str, Any]) -> None:
    t["layer"][_first(t, NodeKind.FEATURE)] = -5


def _layer_beyond_model(t: Tensors, m: dict[str, Any]) -> None:
    t["layer"][_first(t, NodeKind.ERROR)] = m["model"]["n_layers"] + 3


def _position_beyond_tokens(t: Tensors, m: dict[str, Any]) -> None:
    t["pos"][_first(t, NodeKind.FEATURE)] = len(m["tokens"]) + 2


def _fewer_tokens_than_positions(t: Tensors, m: dict[str, Any]) -> None:
    m["tokens"] = m["tokens"][:-2]
    t["input_ids"] = t["input_ids"][:-2]


def _tokens_disagree_with_ids(_t: Tensors, m: dict[str, Any]) -> None:
    m["tokens"] = m["tokens"][:-1]


def _wrong_layer_count(_t: Tensors, m: dict[str, Any]) -> None:
    m["model"]["n_layers"] += 2


def _unknown_format_version(_t: Tensors, m: dict[str, Any]) -> None:
    m["format_version"] = 99


def _unknown_node_kind(t: Tensors, _m: dict[str, Any]) -> None:
    t["kind"][0] = 7


def _token_without_vocabulary_id(t: Tensors, _m: dict[str, Any]) -> None:
    t["token_id"][_first(t, NodeKind.TOKEN)] = -1


def _negative_feature_index(t: Tensors, _m: dict[str, Any]) -> None:
    t["feature"][_first(t, NodeKind.FEATURE)] = -3


def _duplicated_node(t: Tensors, _m: dict[str, Any]) -> None:
    i = _first(t, NodeKind.FEATURE)
    for name in ("layer", "pos", "feature", "token_id"):
        t[name][i + 1] = t[name][i]


def _non_finite_activation(t: Tensors, _m: dict[str, Any]) -> None:
    t["activation"][_first(t, NodeKind.FEATURE)] = float("nan")


#: name -> how the artifact is spoiled (tensors and metadata are edited in place).
HOSTILE: dict[str, Mutation] = {
    "negative edge index": _negative_edge_index,
    "edge index out of range": _edge_index_out_of_range,
    "duplicated edges": _duplicated_edges,
    "negative layer": _negative_layer,
    "layer beyond the model": _layer_beyond_model,
    "position beyond the tokens": _position_beyond_tokens,
    "fewer tokens than positions": _fewer_tokens_than_positions,
    "tokens disagree with input ids": _tokens_disagree_with_ids,
    "wrong layer count": _wrong_layer_count,
    "unknown format version": _unknown_format_version,
    "unknown node kind": _unknown_node_kind,
    "token without vocabulary id": _token_without_vocabulary_id,
    "negative feature index": _negative_feature_index,
    "duplicated node": _duplicated_node,
    "non-finite activation": _non_finite_activation,
}


def write_hostile(graph: Graph, variant: str, path: str | Path) -> Path:
    """Write ``graph`` spoiled by :data:`HOSTILE` ``[variant]``, bypassing every check."""
    tensors = {name: t.clone() for name, t in graph.tensors().items()}
    meta = graph.metadata.model_dump(mode="json")
    HOSTILE[variant](tensors, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"atlas.graph": json.dumps(meta)})
    return path
