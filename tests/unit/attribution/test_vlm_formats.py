"""Image + text graphs in every format: artifact, interchange JSON (ours and the paper's), the
`atlas attribute --image` files, and the refusals of inconsistent image artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from atlas.attribution import attribute
from atlas.errors import InputError
from atlas.graph import Graph, NodeKind
from atlas.images import sha256_bytes
from atlas.interchange import IMAGE_SOFT_TOKEN, graph_from_json, graph_to_json
from atlas.models import load_model
from atlas.testing.vlm_case import PROMPT, VlmCase, tiny_vlm_case
from atlas.transcoders import load_transcoders
from tests import REPO_ROOT

REPO = REPO_ROOT


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> VlmCase:
    return tiny_vlm_case(tmp_path_factory.mktemp("vlm_formats"))


@pytest.fixture(scope="module")
def graph(case: VlmCase) -> Graph:
    model = load_model(case.model_dir)
    result = attribute(PROMPT, model, load_transcoders(case.tc_dir, model), image=case.image)
    return result.to_graph()


def _same(a: Graph, b: Graph, *, rollout: bool = True) -> None:
    assert a.node_ids() == b.node_ids()
    for name in ("kind", "layer", "pos", "feature", "token_id", "input_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("activation", "influence", "logit_prob", "edge_weight"):
        assert torch.allclose(getattr(a, name), getattr(b, name), equal_nan=True), name
    assert torch.equal(a.edge_target, b.edge_target) and torch.equal(a.edge_source, b.edge_source)
    assert a.image_positions is not None and b.image_positions is not None
    assert torch.equal(a.image_positions, b.image_positions)
    assert a.image_grid is not None and b.image_grid is not None
    assert torch.equal(a.image_grid, b.image_grid)
    if rollout:
        assert a.rollout is not None and b.rollout is not None
        assert torch.equal(a.rollout, b.rollout)


def test_image_graph_records_the_image(graph: Graph, case: VlmCase) -> None:
    meta = graph.metadata
    sha = sha256_bytes(case.image.read_bytes())
    assert meta.image is not None and meta.image_sha256 == meta.image.sha256 == sha
    assert (meta.image.width, meta.image.height, meta.image.format) == (50, 40, "PNG")
    assert meta.image.n_tokens == 16 and meta.image.processor["tokens_per_image"] == 16
    assert meta.image.rollout is not None and meta.image.rollout["method"] == "attention_rollout"
    assert graph.image_grid is not None and graph.image_grid.tolist() == [
        [k // 4, k % 4] for k in range(16)
    ]
    assert graph.rollout is not None and tuple(graph.rollout.shape) == (16, 8, 8)
    image_nodes = graph.kind == NodeKind.IMAGE
    assert int(image_nodes.sum()) == 16  # pruning keeps every embedding node
    assert torch.equal(graph.pos[image_nodes], graph.image_positions)
    ids = [i for i, k in zip(graph.node_ids(), graph.kind.tolist(), strict=True) if k == 4]
    assert all(i.startswith("E_") for i in ids)


def test_prompt_id_includes_the_image_hash(graph: Graph) -> None:
    other = graph.metadata.model_copy(update={"image_sha256": "0" * 64})
    assert other.prompt_id() != graph.metadata.prompt_id()


def test_artifact_round_trip(graph: Graph, tmp_path: Path) -> None:
    path = graph.save(tmp_path / "g.safetensors")
    back = Graph.load(path)
    _same(graph, back)
    assert back.metadata == graph.metadata
    with safe_open(str(path), framework="pt") as fh:
        assert {"image_positions", "image_grid", "rollout"} <= set(fh.keys())


def test_text_graph_metadata_has_no_image_key(case: VlmCase, tmp_path: Path) -> None:
    model = load_model(case.model_dir)
    text = attribute(PROMPT, model, load_transcoders(case.tc_dir, model)).to_graph()
    path = text.save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert "image" not in json.loads(fh.metadata()["atlas.graph"])
        assert set(fh.keys()) == set(text.tensors())
    assert "image_positions" not in text.tensors()
    assert "image" not in graph_to_json(text)["metadata"]["atlas"]


def test_json_round_trip(graph: Graph) -> None:
    doc = json.loads(json.dumps(graph_to_json(graph)))
    positions = graph.image_positions.tolist()  # type: ignore[union-attr]
    assert [doc["metadata"]["prompt_tokens"][p] for p in positions] == [IMAGE_SOFT_TOKEN] * 16
    nodes = {n["ctx_idx"]: n for n in doc["nodes"] if "image_k" in n}
    assert sorted(nodes) == positions
    fifth = nodes[positions[5]]
    assert fifth["feature_type"] == "embedding" and fifth["node_id"].startswith("E_")
    assert (fifth["image_k"], fifth["image_row"], fifth["image_col"]) == (5, 1, 1)
    assert fifth["image_sha256"] == graph.metadata.image_sha256
    back = graph_from_json(doc)
    _same(graph, back)
    assert back.metadata == graph.metadata


def test_the_papers_json_reads_as_an_image_graph(graph: Graph) -> None:
    """The fork's files: embedding nodes with ``<image_soft_token>`` prompt tokens, no fields of
    ours, no atlas block: image nodes on the row-major pooled grid."""
    doc = json.loads(json.dumps(graph_to_json(graph)))
    del doc["metadata"]["atlas"]
    for node in doc["nodes"]:
        for key in ("image_k", "image_row", "image_col", "image_sha256"):
            node.pop(key, None)
    back = graph_from_json(doc)
    assert torch.equal(back.kind, graph.kind)
    assert back.image_grid is not None and torch.equal(back.image_grid, graph.image_grid)
    assert back.metadata.image is not None and back.metadata.image.n_tokens == 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_grid", "needs the image_positions and image_grid"),
        ("shift_positions", "not exactly at the image positions"),
        ("short_rollout", "rollout of shape"),
        ("image_on_text", "image tensors in a graph whose metadata has no image"),
    ],
)
def test_inconsistent_image_artifacts_are_refused(
    graph: Graph, tmp_path: Path, change: str, message: str
) -> None:
    from safetensors.torch import save_file

    path = graph.save(tmp_path / "g.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["atlas.graph"])
    if change == "drop_grid":
        del tensors["image_grid"]
    elif change == "shift_positions":
        tensors["image_positions"] = tensors["image_positions"] + 1
    elif change == "short_rollout":
        tensors["rollout"] = tensors["rollout"][:3].contiguous()
    else:
        meta.pop("image")
        meta["image_sha256"] = None
    save_file(tensors, str(path), metadata={"atlas.graph": json.dumps(meta)})
    with pytest.raises(InputError, match=message) as info:
        Graph.load(path)
    assert "\n" not in str(info.value)


def _atlas(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("atlas")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )


def test_attribute_cli_writes_graph_and_attention_maps(case: VlmCase, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--model", str(case.model_dir), "--transcoders", str(case.tc_dir), "--no-progress"]
    run = _atlas(
        "attribute", *common, "--prompt", PROMPT, "--image", str(case.image),
        "--rollout-last-k", "2", "--rollout-head-fraction", "0.5", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    maps = out / "attention_maps"
    rollout = load_file(str(maps / "rollout.safetensors"))["rollout"]
    assert rollout.dtype == torch.float32 and tuple(rollout.shape) == (16, 8, 8)
    assert sorted(p.name for p in maps.glob("*.png")) == sorted(f"{k}.png" for k in range(16))
    meta = json.loads((maps / "metadata.json").read_text())
    assert meta["params"]["last_k"] == 2 and meta["head_fraction"] == 0.5
    (artifact,) = out.glob("*.safetensors")
    graph = Graph.load(artifact)
    assert graph.rollout is not None and torch.equal(graph.rollout, rollout)

    bad = tmp_path / "bad.png"
    bad.write_bytes(case.image.read_bytes()[:60])
    run = _atlas("attribute", *common, "--prompt", PROMPT, "--image", str(bad), "--out", str(out))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0], run.stderr


def test_llava_graph_round_trips_too(tmp_path_factory: pytest.TempPathFactory) -> None:
    """LLaVA: one soft token per patch (block 1), its own ``<image>`` token, the viewer's
    ``<image_soft_token>`` in the JSON, and the model's token back on import."""
    case = tiny_vlm_case(tmp_path_factory.mktemp("vlm_llava"), "llava")
    model = load_model(case.model_dir)
    result = attribute(PROMPT, model, load_transcoders(case.tc_dir, model), image=case.image)
    graph = result.to_graph()
    assert graph.rollout is not None and graph.metadata.image is not None
    assert graph.metadata.image.rollout["block"] == 1  # type: ignore[index]
    n = graph.metadata.image.n_tokens
    assert int(graph.rollout.shape[0]) == n and int((graph.kind == NodeKind.IMAGE).sum()) == n
    doc = json.loads(json.dumps(graph_to_json(graph)))
    positions = graph.image_positions.tolist()  # type: ignore[union-attr]
    assert {doc["metadata"]["prompt_tokens"][p] for p in positions} == {IMAGE_SOFT_TOKEN}
    back = graph_from_json(doc)
    _same(graph, back)
    assert back.metadata.tokens == graph.metadata.tokens
