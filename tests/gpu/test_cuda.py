"""The CUDA path: golden equality, the perturbation self-check and a real out-of-memory halving on
a GPU. Marked ``gpu``: skipped (with the reason shown) where no CUDA device is present."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_float32() -> Any:
    """Full-precision float32 matmuls (no TF32), so tolerances match the CPU goldens."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on_cpu(result: Any) -> Any:
    """The attribution result with every tensor field moved to the CPU."""
    moved = {
        f.name: getattr(result, f.name).cpu()
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), torch.Tensor)
    }
    return dataclasses.replace(result, **moved)


@pytest.mark.parametrize("case", ["gemma2_jumprelu", "llama_gqa_jumprelu_skip"])
def test_golden_adjacency_on_cuda(case: str) -> None:
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders
    from tests.unit.attribution import test_golden as golden

    prompt = next(p for c, p in golden._cases() if c == case and p.get("max_feature_nodes") is None)
    model = load_model(golden.GOLDEN / case / "model", device="cuda", dtype=torch.float32)
    tcs = load_transcoders(golden.GOLDEN / case / "transcoders", model)
    t, meta = golden._reference(case, prompt["slug"])
    r = _on_cpu(golden.attribute_as_recorded(model, tcs, meta))
    ref_ids = golden._ref_identities(t, golden._n_layers(case))
    our_ids = golden._our_identities(r)
    assert sorted(ref_ids) == sorted(our_ids)
    index = {x: i for i, x in enumerate(our_ids)}
    our_idx = torch.tensor([index[x] for x in ref_ids])
    golden._close(r.adjacency[our_idx][:, our_idx], t["adjacency"], "adjacency (cuda)")


@pytest.mark.parametrize(("family", "kind"), [("gemma2", "jumprelu"), ("qwen3", "clt")])
def test_perturbation_on_cuda(tmp_path: Path, family: str, kind: str) -> None:
    """The graph computed on the GPU passes the CPU float64 perturbation check."""
    from atlas.attribution import attribute
    from atlas.models import load_model
    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders
    from atlas.transcoders import load_transcoders
    from tests.unit.attribution.test_perturbation import PROMPT, _check_graph

    model_dir = build_tiny_model(family, tmp_path / "m", n_layers=3, n_kv_heads=2)
    tc_dir = build_tiny_transcoders(model_dir, tmp_path / "t", kind=kind, d_transcoder=128)
    model = load_model(model_dir, device="cuda", dtype=torch.float32)
    res = _on_cpu(attribute(PROMPT, model, load_transcoders(tc_dir, model), batch_size=16))
    _check_graph(model_dir, tc_dir, res)


def test_real_cuda_out_of_memory_halves_the_batch(tmp_path: Path) -> None:
    """A real CUDA OOM (a memory cap just above what batch 4 needs) is caught by type and the
    batch halved until the graph fits; the graph equals the one computed without the cap."""
    from atlas.engine import Engine, attribute_with_halving
    from atlas.graph import AttributionSettings, ModelInfo, TranscoderInfo
    from atlas.models import load_model
    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders
    from atlas.transcoders import load_transcoders

    model_dir = build_tiny_model("gemma2", tmp_path / "m", n_layers=4, d_model=256)
    tc_dir = build_tiny_transcoders(model_dir, tmp_path / "t", d_transcoder=2048)
    model = load_model(model_dir, device="cuda", dtype=torch.float32)
    tcs = load_transcoders(tc_dir, model)
    info = ModelInfo(name="m", family="gemma2", n_layers=4, d_model=256, vocab_size=1)
    tinfo = TranscoderInfo(name="t", kind="transcoder_set", content_hash="h", d_transcoder=2048)
    engine = Engine(model=model, transcoders=tcs, model_info=info, transcoder_info=tinfo)
    prompt = " ".join(["the cat sat on the mat"] * 8)
    knobs = AttributionSettings()

    def peak(batch: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        attribute_with_halving(engine, prompt, knobs, batch_size=batch, timings={})
        return int(torch.cuda.max_memory_allocated())

    reference = attribute_with_halving(engine, prompt, knobs, batch_size=4, timings={})
    p4, p64 = peak(4), peak(64)
    assert p64 > p4, "batch 64 must need more memory than batch 4 for this test to mean anything"
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((p4 + (p64 - p4) // 8) / total)
    try:
        graph = attribute_with_halving(engine, prompt, knobs, batch_size=64, timings={})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert graph.prompt_id == reference.prompt_id
    torch.testing.assert_close(graph.edge_weight, reference.edge_weight, rtol=1e-4, atol=1e-6)
