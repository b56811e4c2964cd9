"""The VLM paper's transcoder format (config.yaml with ``top_k``) and SAELens layer directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from atlas.errors import TranscoderError
from atlas.testing.tiny import build_tiny_transcoders
from atlas.transcoders import load_transcoders


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """ReLU transcoders with a skip connection (circuit-tracer layout) to re-express."""
    out = tmp_path_factory.mktemp("tc") / "relu"
    return build_tiny_transcoders(model_dir, out, kind="relu", skip=True, d_transcoder=64)


def _layers(src: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(src / f"layer_{i}.safetensors")) for i in range(2)]


def _paper_set(src: Path, out: Path, top_k: int = 5, **extra: object) -> Path:
    out.mkdir(parents=True)
    for i, tensors in enumerate(_layers(src)):
        keep = {k: v for k, v in tensors.items() if k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        save_file(keep, str(out / f"layer_{i}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "top_k": top_k,
        "layers": [0, 1],
        "num_model_layers": 2,
        "transcoders": ["layer_0.safetensors", "layer_1.safetensors"],
        **extra,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def test_paper_format_is_relu_then_top_k(model, source: Path, tmp_path: Path) -> None:
    tset = load_transcoders(_paper_set(source, tmp_path / "paper"), model)
    assert tset.activation == "relu_topk" and tset.k == 5
    assert (tset.feature_input_hook, tset.feature_output_hook) == ("mlp.hook_in", "mlp.hook_out")
    raw = _layers(source)[0]
    x = torch.randn(7, tset.d_model, generator=torch.Generator().manual_seed(0))
    pre = x @ raw["W_enc"].T + raw["b_enc"]
    relu = torch.relu(pre)
    want = torch.zeros_like(relu)
    idx = torch.topk(relu, 5, dim=-1).indices
    want.scatter_(-1, idx, relu.gather(-1, idx))
    got = tset.encode(0, x)
    assert torch.allclose(got, want, atol=1e-6)
    assert int((got > 0).sum(-1).max()) <= 5 and not bool((got < 0).any())


def test_paper_format_layer_list_must_cover_the_model(model, source: Path, tmp_path: Path) -> None:
    with pytest.raises(TranscoderError, match="'layers' must list every layer"):
        load_transcoders(_paper_set(source, tmp_path / "a", layers=[1, 0]), model)
    with pytest.raises(TranscoderError, match="num_model_layers 3"):
        load_transcoders(_paper_set(source, tmp_path / "b", num_model_layers=3), model)
    with pytest.raises(TranscoderError, match="'top_k' must be a positive integer"):
        load_transcoders(_paper_set(source, tmp_path / "c", top_k=0), model)


def _saelens_set(
    src: Path, out: Path, *, fold_b_dec: bool = False, topk: int | None = None
) -> Path:
    for i, t in enumerate(_layers(src)):
        d = out / f"blocks.{i}.hook_mlp_in"
        d.mkdir(parents=True)
        d_sae, d_model = t["W_enc"].shape
        b_enc = t["b_enc"]
        if fold_b_dec:  # SAELens subtracts b_dec from the input: shift b_enc to compensate
            b_enc = b_enc + t["W_enc"] @ t["b_dec"]
        weights = {
            "W_enc": t["W_enc"].T.contiguous(),
            "W_dec": t["W_dec"].contiguous(),
            "b_enc": b_enc,
            "b_dec": t["b_dec"],
            "W_skip": t["W_skip"],
        }
        save_file(weights, str(d / "sae_weights.safetensors"))
        cfg = {
            "d_in": d_model,
            "d_sae": d_sae,
            "d_out": d_model,
            "hook_name": f"blocks.{i}.hook_mlp_in",
            "hook_name_out": f"blocks.{i}.hook_mlp_out",
            "hook_layer": i,
            "architecture": "topk" if topk else "standard",
            "activation_fn": "topk" if topk else "relu",
            "activation_fn_kwargs": {"k": topk} if topk else {},
            "apply_b_dec_to_input": fold_b_dec,
        }
        (d / "cfg.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("fold", [False, True])
def test_saelens_layers_equal_the_circuit_tracer_set(
    model, source: Path, tmp_path: Path, fold: bool
) -> None:
    ref = load_transcoders(source, model)
    tset = load_transcoders(_saelens_set(source, tmp_path / "sl", fold_b_dec=fold), model)
    assert tset.activation == "relu" and tset.has_skip
    assert (tset.feature_input_hook, tset.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    x = torch.randn(5, ref.d_model, generator=torch.Generator().manual_seed(1))
    for layer in range(2):
        assert torch.allclose(tset.encode(layer, x), ref.encode(layer, x), atol=1e-5)
        assert torch.equal(tset.w_dec[layer], ref.w_dec[layer])
        assert torch.equal(tset.skip(layer, x), ref.skip(layer, x))
    assert tset.info.content_hash != ref.info.content_hash


def test_saelens_topk_and_errors(model, source: Path, tmp_path: Path) -> None:
    tset = load_transcoders(_saelens_set(source, tmp_path / "k", topk=4), model)
    assert (tset.activation, tset.k) == ("relu_topk", 4)
    root = _saelens_set(source, tmp_path / "gap")
    for f in (root / "blocks.1.hook_mlp_in").iterdir():
        f.unlink()
    (root / "blocks.1.hook_mlp_in").rmdir()
    with pytest.raises(TranscoderError, match=r"layers \[0\], need \[0, 1\]"):
        load_transcoders(root, model)
    bad = _saelens_set(source, tmp_path / "bad")
    (bad / "blocks.0.hook_mlp_in" / "sae_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(TranscoderError, match="corrupted or unreadable"):
        load_transcoders(bad, model)
