"""The graph artifact reader refuses every file that breaks the layout contract, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlas.errors import InputError
from atlas.graph import Graph, NodeKind
from atlas.store.synthetic import synthetic_graph
from atlas.testing.artifacts import HOSTILE, write_hostile


def _small() -> Graph:
    return synthetic_graph(7, n_layers=4, n_pos=6, n_features=40, n_logits=3, n_edges=300)


def test_a_good_artifact_round_trips(tmp_path: Path) -> None:
    g = _small()
    back = Graph.load(g.save(tmp_path / "g.safetensors"))
    assert back.prompt_id == g.prompt_id
    assert torch.equal(back.dense_adjacency(), g.dense_adjacency())


@pytest.mark.parametrize("variant", sorted(HOSTILE))
def test_hostile_artifact_is_refused(tmp_path: Path, variant: str) -> None:
    path = write_hostile(_small(), variant, tmp_path / "bad.safetensors")
    with pytest.raises(InputError) as info:
        Graph.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


def test_unknown_kind_text_is_an_input_error() -> None:
    assert NodeKind.from_text("logit") is NodeKind.LOGIT
    with pytest.raises(InputError, match="unknown node kind"):
        NodeKind.from_text("picture")


def test_kind_table_names_every_kind_once() -> None:
    for field in ("text", "label"):
        values = [getattr(k, field) for k in NodeKind]
        assert len(set(values)) == len(values), field
    # an image soft token is an embedding node to the paper's viewer: it alone shares a row's
    # feature_type and id format (the token's)
    text_kinds = [k for k in NodeKind if k is not NodeKind.IMAGE]
    for field in ("feature_type", "id_format"):
        values = [getattr(k, field) for k in text_kinds]
        assert len(set(values)) == len(values), field
        assert getattr(NodeKind.IMAGE, field) == getattr(NodeKind.TOKEN, field)
    assert [int(k) for k in NodeKind] == list(range(len(NodeKind)))


def test_from_columns_defaults_and_sorts_edges() -> None:
    g = _small()
    nodes = {"kind": g.kind, "layer": g.layer, "pos": g.pos, "feature": g.feature}
    nodes["token_id"] = g.token_id
    order = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))
    edges = {
        "target": g.edge_target[order],
        "source": g.edge_source[order],
        "weight": g.edge_weight[order],
    }
    built = Graph.from_columns(g.metadata, g.input_ids.tolist(), nodes, edges)
    assert torch.equal(built.edge_target, g.edge_target)
    assert torch.equal(built.edge_weight, g.edge_weight)
    assert bool(torch.isnan(built.influence).all()) and not bool(built.activation.any())
    with pytest.raises(InputError, match="unknown graph node column"):
        Graph.from_columns(g.metadata, g.input_ids, {**nodes, "colour": g.pos}, edges)
