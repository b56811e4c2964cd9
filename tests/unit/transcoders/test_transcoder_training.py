"""The transcoder trainer on tiny random models: it learns, it exports circuit-tracer's layout,
its exported tensors reproduce what it trained, and a checkpoint resumes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from atlas.testing.tiny import build_tiny_model
from atlas.transcoders.training import (
    TranscoderTrainConfig,
    TranscoderTrainer,
    apply_transcoder,
    collect_activations,
    evaluate_transcoders,
    locate_mlp_hooks,
)

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "1",
    "+",
    "2",
    "=",
    "3",
    "hello",
    "world",
    "dog",
    "ran",
    "far",
]


def _texts(seed: int, n: int = 32) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) for _ in range(n)]


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    d = build_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    return _load(d)


def _cfg(**kw) -> TranscoderTrainConfig:
    base = dict(
        d_transcoder=128,
        chunks=8,
        batch_tokens=32,
        l0_controller_rate=0.2,
        l0_coeff_init=1e-2,
        target_l0=8,
        lr=5e-3,
        seed=0,
        threads=1,
        checkpoint_every=2,
    )
    base.update(kw)
    return TranscoderTrainConfig(**base)


def test_training_reduces_fvu_and_exports_circuit_tracer_layout(llama, tmp_path: Path) -> None:
    model, tok = llama
    cfg = _cfg()
    trainer = TranscoderTrainer(model, tok, cfg)
    eval_texts = _texts(999, 16)
    before = trainer.evaluate(eval_texts)
    trainer.train(lambda c: _texts(c), progress=False)
    after = trainer.evaluate(eval_texts)
    for b, a in zip(before, after, strict=True):
        assert a.fvu < 0.5 * b.fvu, (b, a)
        assert a.fvu < 0.6
        assert a.l0 <= 3 * cfg.target_l0

    out = trainer.save(tmp_path / "tc", model_name="tiny-llama")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "mlp.hook_out"
    d_model = model.config.hidden_size
    for layer in range(model.config.num_hidden_layers):
        t = load_file(str(out / f"layer_{layer}.safetensors"))
        assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"}
        assert t["W_enc"].shape == (cfg.d_transcoder, d_model)
        assert t["W_dec"].shape == (cfg.d_transcoder, d_model)
        assert t["b_enc"].shape == (cfg.d_transcoder,)
        assert t["b_dec"].shape == (d_model,)
        assert bool((t["activation_function.threshold"] > 0).all())

    # The exported (scale-folded) tensors compute what the trainer computes in normalised units.
    acts = collect_activations(model, tok, eval_texts, [0, 1])
    files = {layer: load_file(str(out / f"layer_{layer}.safetensors")) for layer in (0, 1)}
    for layer in (0, 1):
        x, _ = acts[layer]
        tc = trainer.transcoders[str(layer)]
        recon_n, acts_n, _ = tc(x * trainer.scale_in[layer], cfg.bandwidth)
        recon, a = apply_transcoder(files[layer], x)
        torch.testing.assert_close(a, acts_n.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            recon, recon_n.detach() / trainer.scale_out[layer], rtol=1e-4, atol=1e-5
        )
    assert [r.fvu for r in evaluate_transcoders(files, acts)] == pytest.approx(
        [r.fvu for r in after], rel=1e-4
    )


def test_checkpoint_resume_matches_uninterrupted(llama, tmp_path: Path) -> None:
    model, tok = llama
    cfg = _cfg(chunks=4, skip=True)
    full = TranscoderTrainer(model, tok, cfg)
    full.train(lambda c: _texts(c), progress=False)

    ckpt = tmp_path / "ckpt"
    part = TranscoderTrainer(model, tok, cfg, checkpoint_dir=ckpt)
    part.train(lambda c: _texts(c), progress=False, stop_after=2)
    assert (ckpt / "trainer_state.safetensors").exists()
    resumed = TranscoderTrainer(model, tok, cfg, checkpoint_dir=ckpt)
    resumed.train(lambda c: _texts(c), progress=False)
    assert resumed.chunk == 4
    a, b = full.export_tensors(), resumed.export_tensors()
    for layer in a:
        for key in a[layer]:
            torch.testing.assert_close(a[layer][key], b[layer][key], rtol=1e-5, atol=1e-6)
    assert "W_skip" in a[0]


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "gpt2"])
def test_hooks_located_for_every_family(family: str, tmp_path: Path) -> None:
    model, tok = _load(build_tiny_model(family, tmp_path / family, seed=1))
    inputs, outputs, in_hook, out_hook = locate_mlp_hooks(model)
    assert len(inputs) == len(outputs) == model.config.num_hidden_layers
    acts = collect_activations(model, tok, _texts(3, 4), [0])
    x, y = acts[0]
    assert x.shape == y.shape and x.shape[1] == model.config.hidden_size
    assert x.shape[0] > 0 and torch.isfinite(x).all() and y.abs().sum() > 0
    if family == "gemma2":
        assert (in_hook, out_hook) == ("ln2.hook_normalized", "hook_mlp_out")
