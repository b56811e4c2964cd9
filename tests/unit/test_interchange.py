"""Interchange JSON (Anthropic frontend / Neuronpedia format): export, import, validation.

Oracles: our own round trip (Graph -> JSON -> Graph), Neuronpedia's graph-schema.json, and
circuit-tracer 0.5.0's own exports committed under tests/golden/ (their nodes and links must come
back exactly as circuit-tracer's pruning masks and dense adjacency say).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from atlas.errors import InputError
from atlas.graph import (
    AttributionSettings,
    Graph,
    GraphMetadata,
    ModelInfo,
    NodeKind,
    TranscoderInfo,
)
from atlas.interchange import (
    GraphTooLargeForJson,
    cantor_pair,
    cantor_unpair,
    graph_from_json,
    graph_to_json,
    write_document,
    write_json,
)
from tests import GOLDEN

SCHEMA = GOLDEN / "neuronpedia-graph-schema.json"


# ----------------------------------------------------------------------------- helpers
def make_graph(seed: int = 0, n_layers: int = 3, n_pos: int = 5, n_logits: int = 3) -> Graph:
    """A random graph in the reference layout (features | errors | tokens | logits)."""
    gen = torch.Generator().manual_seed(seed)
    feats = sorted(
        {
            (int(lay), int(p), int(f))
            for lay, p, f in zip(
                torch.randint(0, n_layers, (12,), generator=gen),
                torch.randint(1, n_pos, (12,), generator=gen),
                torch.randint(0, 50, (12,), generator=gen),
                strict=True,
            )
        }
    )
    kind, layer, pos, feature, token_id = [], [], [], [], []
    for lay, p, f in feats:
        kind.append(NodeKind.FEATURE), layer.append(lay), pos.append(p)
        feature.append(f), token_id.append(-1)
    for lay in range(n_layers):
        for p in range(n_pos):
            kind.append(NodeKind.ERROR), layer.append(lay), pos.append(p)
            feature.append(-1), token_id.append(-1)
    input_ids = torch.randint(4, 100, (n_pos,), generator=gen)
    input_ids[0] = 1
    for p in range(n_pos):
        kind.append(NodeKind.TOKEN), layer.append(-1), pos.append(p)
        feature.append(-1), token_id.append(int(input_ids[p]))
    logit_ids = torch.randperm(120, generator=gen)[:n_logits].tolist()
    for t in logit_ids:
        kind.append(NodeKind.LOGIT), layer.append(n_layers), pos.append(n_pos - 1)
        feature.append(-1), token_id.append(t)
    n = len(kind)
    kinds = torch.tensor(kind, dtype=torch.int8)
    activation = torch.where(kinds == NodeKind.FEATURE, torch.rand(n, generator=gen) * 5, 0.0)
    influence = torch.rand(n, generator=gen)
    influence[kinds == NodeKind.LOGIT] = math.nan
    logit_prob = torch.zeros(n)
    probs = torch.rand(n_logits, generator=gen)
    logit_prob[kinds == NodeKind.LOGIT] = probs / probs.sum() * 0.9
    # edges: targets are features/logits, sources below them
    targets, sources = [], []
    lay_t = torch.tensor(layer)
    for t in range(n):
        if kind[t] not in (NodeKind.FEATURE, NodeKind.LOGIT):
            continue
        for s in range(n):
            below = kind[s] == NodeKind.TOKEN or (
                kind[s] in (NodeKind.FEATURE, NodeKind.ERROR) and lay_t[s] < lay_t[t]
            )
            if below and float(torch.rand(1, generator=gen)) < 0.4:
                targets.append(t), sources.append(s)
    weights = torch.randn(len(targets), generator=gen) * 3
    tokens = [f"t{int(i)}" for i in input_ids]
    meta = GraphMetadata(
        prompt="".join(tokens),
        tokens=tokens,
        model=ModelInfo(
            name="tiny/gemma2", family="gemma2", n_layers=n_layers, d_model=64, vocab_size=128
        ),
        transcoders=TranscoderInfo(
            name="tiny-tc", kind="transcoder_set", content_hash="abc123", d_transcoder=64
        ),
        settings=AttributionSettings(max_feature_nodes=None),
        replacement_score=0.7,
        completeness_score=0.9,
        code_version="0.1.0",
    )
    return Graph(
        metadata=meta,
        input_ids=input_ids,
        kind=kinds,
        layer=torch.tensor(layer),
        pos=torch.tensor(pos),
        feature=torch.tensor(feature),
        token_id=torch.tensor(token_id),
        activation=activation,
        influence=influence,
        logit_prob=logit_prob,
        edge_target=torch.tensor(targets, dtype=torch.int64),
        edge_source=torch.tensor(sources, dtype=torch.int64),
        edge_weight=weights,
    )


def edge_dict(g: Graph) -> dict[tuple[str, str], float]:
    ids = g.node_ids()
    return {
        (ids[t], ids[s]): w
        for t, s, w in zip(
            g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
        )
    }


def assert_graphs_equal(a: Graph, b: Graph, atol: float = 1e-6) -> None:
    assert a.metadata == b.metadata
    assert torch.equal(a.input_ids, b.input_ids)
    for name in ("kind", "layer", "pos", "feature", "token_id"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("activation", "influence", "logit_prob"):
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), atol=atol, rtol=0, equal_nan=True, msg=name
        )
    ea, eb = edge_dict(a), edge_dict(b)
    assert ea.keys() == eb.keys()
    for k, w in ea.items():
        assert abs(w - eb[k]) <= atol * max(1.0, abs(w)), k


# ----------------------------------------------------------------------------- export / round trip
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_lossless(seed: int, tmp_path: Path) -> None:
    g = make_graph(seed)
    doc = graph_to_json(g, slug="s")
    text = json.dumps(doc, allow_nan=False)  # no NaN leaks into JSON
    back = graph_from_json(json.loads(text))
    assert_graphs_equal(g, back)
    # and through a file
    path = write_json(g, tmp_path / "g.json", slug="s")
    assert_graphs_equal(g, graph_from_json(path))
    assert_graphs_equal(g, graph_from_json(str(path)))


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_file_equals_the_document(seed: int, tmp_path: Path) -> None:
    """write_json streams the links in chunks yet writes the bytes of the whole document."""
    from atlas.interchange.export import _json_parts
    from atlas.interchange.files import _stream_document

    g = make_graph(seed)
    whole = write_document(graph_to_json(g, slug="s"), tmp_path / "whole.json").read_bytes()
    assert write_json(g, tmp_path / "streamed.json", slug="s").read_bytes() == whole
    with (tmp_path / "chunked.json").open("w", encoding="utf-8") as fh:
        _stream_document(fh, _json_parts(g, slug="s"), g, chunk=3)
    assert (tmp_path / "chunked.json").read_bytes() == whole


def test_json_above_the_link_limit_is_refused(tmp_path: Path) -> None:
    g = make_graph(0)
    n = int(g.edge_weight.shape[0])
    assert write_json(g, tmp_path / "ok.json", max_links=n).exists()
    with pytest.raises(GraphTooLargeForJson, match=f"{n:,} links is over the limit of {n - 1:,}"):
        write_json(g, tmp_path / "big.json", max_links=n - 1)
    assert not (tmp_path / "big.json").exists()


def test_round_trip_stable_on_second_pass() -> None:
    g = make_graph(3)
    doc1 = graph_to_json(g, slug="x", labels={g.node_ids()[0]: "first feature"})
    g2 = graph_from_json(doc1)
    doc2 = graph_to_json(g2, slug="x")
    assert doc1["nodes"] == doc2["nodes"]
    assert sorted(doc1["links"], key=lambda e: (e["target"], e["source"])) == sorted(
        doc2["links"], key=lambda e: (e["target"], e["source"])
    )


def test_export_node_fields_follow_the_format() -> None:
    g = make_graph(0)
    doc = graph_to_json(g, slug="fmt")
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    ids = g.node_ids()
    n_layers = g.n_layers
    for i, nid in enumerate(ids):
        node = by_id[nid]
        k = NodeKind(int(g.kind[i]))
        lay, p = int(g.layer[i]), int(g.pos[i])
        assert node["ctx_idx"] == p
        if k == NodeKind.FEATURE:
            f = int(g.feature[i])
            assert nid == f"{lay}_{f}_{p}"
            assert node["feature"] == cantor_pair(lay, f)
            assert node["feature_type"] == "cross layer transcoder"
            assert node["layer"] == str(lay)
            assert node["activation"] == pytest.approx(float(g.activation[i]))
        elif k == NodeKind.ERROR:
            assert nid == f"{lay}_-1_{p}"
            assert node["feature_type"] == "mlp reconstruction error"
            assert node["activation"] is None
        elif k == NodeKind.TOKEN:
            assert nid == f"E_{int(g.token_id[i])}_{p}"
            assert node["layer"] == "E"
            assert node["feature_type"] == "embedding"
        else:
            assert nid == f"{n_layers + 1}_{int(g.token_id[i])}_{p}"
            assert node["feature_type"] == "logit"
            assert node["influence"] is None
            assert node["token_prob"] == pytest.approx(float(g.logit_prob[i]))
            assert "(p=" in node["clerp"]
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    # weight = raw A[target, source]
    adj = g.dense_adjacency()
    index = {nid: i for i, nid in enumerate(ids)}
    for link in doc["links"]:
        assert link["weight"] == pytest.approx(
            float(adj[index[link["target"]], index[link["source"]]])
        )
    assert doc["metadata"]["slug"] == "fmt"
    assert doc["metadata"]["schema_version"] == 1
    assert doc["metadata"]["scan"] == "tiny/gemma2"


def test_export_validates_against_neuronpedia_schema() -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    g = make_graph(1)
    doc = graph_to_json(g, slug="schema", supernodes=[["group", g.node_ids()[0], g.node_ids()[1]]])
    jsonschema.validate(json.loads(json.dumps(doc)), schema)


def test_schema_rejects_what_it_should() -> None:
    """The committed schema is a real check: a node without clerp fails it."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    doc = graph_to_json(make_graph(1), slug="bad")
    del doc["nodes"][0]["clerp"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_cantor_pairing_is_a_bijection() -> None:
    seen = set()
    for layer in range(30):
        for f in range(200):
            z = cantor_pair(layer, f)
            assert cantor_unpair(z) == (layer, f)
            seen.add(z)
    assert len(seen) == 30 * 200
    assert cantor_pair(0, 41) == 902  # the value Neuronpedia users see for layer 0, feature 41
    assert cantor_unpair(cantor_pair(25, 16383)) == (25, 16383)


# ----------------------------------------------------------------------------- supernodes, labels
def test_supernodes_and_labels_come_back() -> None:
    g = make_graph(2)
    ids = g.node_ids()
    sn = [["say Paris", ids[0], ids[1]], ["empty"]]
    doc = graph_to_json(g, slug="sn", supernodes=sn, labels={ids[2]: "a label"})
    assert doc["qParams"]["supernodes"] == sn
    back = graph_from_json(doc)
    assert back.metadata.extra["supernodes"] == sn
    assert back.metadata.extra["labels"] == {ids[2]: "a label"}
    # mapping form is accepted too
    doc2 = graph_to_json(g, supernodes={"grp": [ids[3]]})
    assert doc2["qParams"]["supernodes"] == [["grp", ids[3]]]


def test_unknown_ids_in_supernodes_or_labels_are_refused() -> None:
    g = make_graph(2)
    with pytest.raises(InputError, match="unknown node id"):
        graph_to_json(g, supernodes=[["x", "99_99_99"]])
    with pytest.raises(InputError, match="unknown node id"):
        graph_to_json(g, labels={"99_99_99": "nope"})
    doc = graph_to_json(g)
    doc["qParams"]["supernodes"] = [["x", "99_99_99"]]
    with pytest.raises(InputError, match="unknown node id"):
        graph_from_json(doc)


# ----------------------------------------------------------------------------- strict validation
def _doc() -> dict:
    return graph_to_json(make_graph(0), slug="v")


def test_malformed_json_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('{"metadata": {')
    with pytest.raises(InputError, match="not valid JSON"):
        graph_from_json(p)
    with pytest.raises(InputError, match="cannot read"):
        graph_from_json(tmp_path / "missing.json")
    with pytest.raises(InputError, match="must be an object"):
        graph_from_json([])  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["metadata", "nodes", "links"])
def test_missing_top_level_key(key: str) -> None:
    doc = _doc()
    del doc[key]
    with pytest.raises(InputError, match=key):
        graph_from_json(doc)


def test_unknown_node_id_in_link() -> None:
    doc = _doc()
    doc["links"][0]["source"] = "7_7_7"
    with pytest.raises(InputError, match="unknown node id '7_7_7'"):
        graph_from_json(doc)
    doc = _doc()
    doc["links"][0]["target"] = "nope"
    with pytest.raises(InputError, match="unknown node id 'nope'"):
        graph_from_json(doc)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None, True])
def test_bad_weights(bad: object) -> None:
    doc = _doc()
    doc["links"][3]["weight"] = bad
    with pytest.raises(InputError, match="weight"):
        graph_from_json(doc)


def test_nan_literal_in_file(tmp_path: Path) -> None:
    doc = _doc()
    text = json.dumps(doc).replace(str(doc["links"][0]["weight"]), "NaN", 1)
    p = tmp_path / "nan.json"
    p.write_text(text)
    with pytest.raises(InputError, match="non-finite"):
        graph_from_json(p)


def test_duplicate_node_ids() -> None:
    doc = _doc()
    doc["nodes"].append(copy.deepcopy(doc["nodes"][0]))
    with pytest.raises(InputError, match="duplicate node id"):
        graph_from_json(doc)


def test_duplicate_links() -> None:
    doc = _doc()
    doc["links"].append(dict(doc["links"][0]))
    with pytest.raises(InputError, match="duplicate links"):
        graph_from_json(doc)


def test_unknown_feature_type_and_bad_fields() -> None:
    doc = _doc()
    doc["nodes"][0]["feature_type"] = "attention head"
    with pytest.raises(InputError, match="unknown feature_type"):
        graph_from_json(doc)
    doc = _doc()
    doc["nodes"][0]["ctx_idx"] = "x"
    with pytest.raises(InputError, match="ctx_idx"):
        graph_from_json(doc)
    doc = _doc()
    tok = next(n for n in doc["nodes"] if n["feature_type"] == "embedding")
    tok["node_id"] = "E_bad"
    with pytest.raises(InputError, match="embedding node id"):
        graph_from_json(doc)
    doc = _doc()
    doc["nodes"][0]["ctx_idx"] = 999
    with pytest.raises(InputError):
        graph_from_json(doc)


def test_error_messages_are_one_line() -> None:
    doc = _doc()
    doc["metadata"]["atlas"]["graph_metadata"]["model"] = {"name": 3}
    with pytest.raises(InputError) as info:
        graph_from_json(doc)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- foreign files
def _ct_style_doc() -> dict:
    """A circuit-tracer-0.5.0-style file (2 layers) whose error id '0_1_2' collides with the
    layer-0 feature 1 at position 2, written the way circuit-tracer orders links."""

    def feat(layer: int, f: int, pos: int) -> dict:
        return {
            "node_id": f"{layer}_{f}_{pos}",
            "feature": cantor_pair(layer, f),
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{f}-0",
            "clerp": "",
            "influence": 0.1,
            "activation": 2.0,
        }

    def err(layer: int, pos: int) -> dict:
        return {
            "node_id": f"0_{layer}_{pos}",
            "feature": -1,
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{layer}_{pos}-0",
            "clerp": "",
            "influence": 0.2,
        }

    def tok(tid: int, pos: int) -> dict:
        return {
            "node_id": f"E_{tid}_{pos}",
            "feature": pos,
            "layer": "E",
            "ctx_idx": pos,
            "feature_type": "embedding",
            "jsNodeId": f"E_{tid}-{pos}",
            "clerp": "",
            "influence": 0.3,
        }

    logit = {
        "node_id": "3_42_2",
        "feature": 42,
        "layer": "3",
        "ctx_idx": 2,
        "feature_type": "logit",
        "jsNodeId": "L_42-2",
        "clerp": 'Output "x" (p=0.900)',
        "token_prob": 0.9,
        "is_target_logit": True,
        "influence": None,
    }
    nodes = [
        feat(0, 1, 2),
        feat(1, 5, 2),
        err(0, 2),
        err(1, 2),
        tok(1, 0),
        tok(9, 1),
        tok(8, 2),
        logit,
    ]
    links = [
        # target 1_5_2 (layer 1): '0_1_2' can only be the layer-0 feature (error is at layer 1)
        {"source": "0_1_2", "target": "1_5_2", "weight": 1.5},
        {"source": "E_8_2", "target": "1_5_2", "weight": 0.5},
        # target 0_1_2 (the feature: errors have no inputs)
        {"source": "E_8_2", "target": "0_1_2", "weight": 2.5},
        # logit: sources in node order -> feature 0_1_2, feature 1_5_2, error 0_0_2, error 0_1_2
        {"source": "0_1_2", "target": "3_42_2", "weight": 0.25},
        {"source": "1_5_2", "target": "3_42_2", "weight": 0.75},
        {"source": "0_0_2", "target": "3_42_2", "weight": -0.5},
        {"source": "0_1_2", "target": "3_42_2", "weight": -0.125},
    ]
    md = {
        "slug": "ct",
        "scan": "tiny-scan",
        "transcoder_list": [],
        "prompt_tokens": ["<bos>", "a", "b"],
        "prompt": "<bos>ab",
        "node_threshold": 0.8,
        "schema_version": 1,
    }
    qp = {
        "pinnedIds": [],
        "supernodes": [["grp", "0_1_2", "1_5_2"]],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": md, "qParams": qp, "nodes": nodes, "links": links}


def test_circuit_tracer_id_collision_is_resolved() -> None:
    g = graph_from_json(_ct_style_doc())
    assert g.n_layers == 2
    assert g.input_ids.tolist() == [1, 9, 8]
    edges = edge_dict(g)
    assert edges == {
        ("1_5_2", "0_1_2"): 1.5,
        ("1_5_2", "E_8_2"): 0.5,
        ("0_1_2", "E_8_2"): 2.5,
        ("3_42_2", "0_1_2"): 0.25,
        ("3_42_2", "1_5_2"): 0.75,
        ("3_42_2", "0_-1_2"): -0.5,
        ("3_42_2", "1_-1_2"): -0.125,
    }
    assert g.metadata.extra["supernodes"] == [["grp", "0_1_2", "1_5_2"]]
    assert g.metadata.model.name == "tiny-scan"
    assert g.metadata.extra["imported_from"]["scan"] == "tiny-scan"
    # and the export no longer collides
    ids = [n["node_id"] for n in graph_to_json(g)["nodes"]]
    assert len(ids) == len(set(ids))


def test_unresolvable_collision_is_refused() -> None:
    doc = _ct_style_doc()
    # a logit run with only the ambiguous source: feature or error, nothing says which
    doc["links"] = [{"source": "0_1_2", "target": "3_42_2", "weight": 1.0}]
    with pytest.raises(InputError, match="ambiguous"):
        graph_from_json(doc)


# ----------------------------------------------------------------------------- circuit-tracer's own files
def _golden_json_files() -> list[Path]:
    return sorted(
        p for p in GOLDEN.glob("*/*.json") if p.name not in ("case.json", "interventions.json")
    )


@pytest.mark.parametrize("path", _golden_json_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_import_circuit_tracer_export(path: Path) -> None:
    """circuit-tracer's JSON comes back as exactly its pruned graph (nodes, edges, weights)."""
    from safetensors import safe_open

    tensors_path = path.with_suffix(".safetensors")
    with safe_open(str(tensors_path), framework="pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    doc = json.loads(path.read_text())
    g = graph_from_json(doc)
    case = json.loads((path.parent / "case.json").read_text())
    n_layers = case["model"]["n_layers"]
    assert g.n_layers == n_layers
    assert g.n_nodes == len(doc["nodes"])
    assert g.n_edges == len(doc["links"])
    assert g.input_ids.tolist() == t["input_ids"].tolist()

    # identity of every node index in circuit-tracer's adjacency
    sel = t["active_features"][t["selected_features"]]
    n_pos = len(t["input_ids"])
    idents: list[str] = [f"{lay}_{f}_{p}" for lay, p, f in sel.tolist()]
    idents += [f"{lay}_-1_{p}" for lay in range(n_layers) for p in range(n_pos)]
    idents += [f"E_{tid}_{p}" for p, tid in enumerate(t["input_ids"].tolist())]
    idents += [f"{n_layers + 1}_{tid}_{n_pos - 1}" for tid in t["logit_tokens"].tolist()]
    index = {nid: i for i, nid in enumerate(idents)}
    ids = g.node_ids()
    kept = set(torch.nonzero(t["node_mask"].bool()).flatten().tolist())
    for nid in ids:
        assert index[nid] in kept, nid
    adj = t["adjacency"]
    for (tid, sid), w in edge_dict(g).items():
        assert w == pytest.approx(float(adj[index[tid], index[sid]]), rel=1e-6, abs=1e-9)
    edge_mask = set(map(tuple, t["edge_index"].T.tolist()))
    for tid, sid in edge_dict(g):
        assert (index[tid], index[sid]) in edge_mask
    # activations and influence ranks
    act = t["activation_values"][t["selected_features"]]
    cum = t["cumulative_scores"]
    for i, nid in enumerate(ids):
        if g.kind[i] == NodeKind.FEATURE:
            assert float(g.activation[i]) == pytest.approx(float(act[index[nid]]), rel=1e-6)
        if g.kind[i] != NodeKind.LOGIT:
            assert float(g.influence[i]) == pytest.approx(float(cum[index[nid]]), rel=1e-6)
        else:
            k = index[nid] - (len(idents) - len(t["logit_tokens"]))
            assert float(g.logit_prob[i]) == pytest.approx(float(t["logit_probabilities"][k]))
