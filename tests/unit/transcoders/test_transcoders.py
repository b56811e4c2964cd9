"""Transcoder loading (every format), validation errors, activation functions, hashing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from atlas.errors import TranscoderError
from atlas.models import load_model
from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders
from atlas.transcoders import load_transcoders


@pytest.fixture(scope="module")
def tc_root(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("tc")
    for kind in ("jumprelu", "relu", "topk", "clt"):
        build_tiny_transcoders(model_dir, root / kind, kind=kind, d_transcoder=64)
    build_tiny_transcoders(model_dir, root / "skip", kind="jumprelu", skip=True, d_transcoder=64)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    if "transcoders" in cfg:  # point at the copies
        cfg["transcoders"] = [f"layer_{i}.safetensors" for i in range(len(cfg["transcoders"]))]
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


@pytest.mark.parametrize(
    ("kind", "activation", "is_clt"),
    [
        ("jumprelu", "jumprelu", False),
        ("relu", "relu", False),
        ("topk", "topk", False),
        ("clt", "jumprelu", True),
    ],
)
def test_load_kinds(tc_root: Path, model, kind: str, activation: str, is_clt: bool) -> None:
    t = load_transcoders(tc_root / kind, model)
    assert t.activation == activation and t.is_clt == is_clt
    assert (t.n_layers, t.d_model, t.d_transcoder) == (2, 64, 64)
    assert t.info.content_hash.startswith("sha256:")
    assert t.info.kind == ("cross_layer_transcoder" if is_clt else "transcoder_set")
    assert t.info.feature_input_hook == "mlp.hook_in"
    if is_clt:
        assert [w.shape for w in t.w_dec] == [(64, 2, 64), (64, 1, 64)]
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    acts = t.encode(0, x)
    pre = t.pre_activations(0, x)
    if activation == "jumprelu":
        assert t.threshold is not None
        torch.testing.assert_close(acts, pre * (pre > t.threshold[0]))
    elif activation == "relu":
        torch.testing.assert_close(acts, pre.clamp_min(0))
    else:
        assert t.k == 12
        assert ((acts != 0).sum(-1) <= t.k).all()
        top = pre.topk(t.k, dim=-1).indices
        torch.testing.assert_close(acts.gather(-1, top), pre.gather(-1, top))


def test_clt_reconstruction_sums_earlier_layers(tc_root: Path, model) -> None:
    t = load_transcoders(tc_root / "clt", model)
    gen = torch.Generator().manual_seed(1)
    acts = [torch.rand(3, 64, generator=gen) for _ in range(2)]
    rec = t.reconstruct(acts, [torch.zeros(3, 64)] * 2)
    expected1 = acts[0] @ t.w_dec[0][:, 1] + acts[1] @ t.w_dec[1][:, 0] + t.b_dec[1]
    torch.testing.assert_close(rec[1], expected1)


def test_skip_term(tc_root: Path, model) -> None:
    t = load_transcoders(tc_root / "skip", model)
    assert t.has_skip and t.w_skip is not None
    x = torch.randn(4, 64)
    torch.testing.assert_close(t.skip(1, x), x @ t.w_skip[1].T)


def test_content_hash_tracks_files(tc_root: Path, model, tmp_path: Path) -> None:
    a = load_transcoders(tc_root / "relu", model).info.content_hash
    assert load_transcoders(tc_root / "relu", model).info.content_hash == a
    copy = _copy(tc_root / "relu", tmp_path / "c")
    sd = load_file(str(copy / "layer_1.safetensors"))
    sd["b_enc"] = sd["b_enc"] + 1.0
    save_file(sd, str(copy / "layer_1.safetensors"))
    assert load_transcoders(copy, model).info.content_hash != a


def test_moved_directory_still_loads(tc_root: Path, model, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(tc_root / "jumprelu", moved)  # config.yaml still lists the old absolute paths
    t = load_transcoders(moved / "config.yaml", model)
    assert t.n_layers == 2


def test_gemmascope_npz(tc_root: Path, model, tmp_path: Path) -> None:
    ref = load_transcoders(tc_root / "jumprelu", model)
    d = tmp_path / "gs"
    d.mkdir()
    paths = []
    for i in range(2):
        sd = load_file(str(tc_root / "jumprelu" / f"layer_{i}.safetensors"))
        np.savez(
            d / f"params_{i}.npz",
            W_enc=sd["W_enc"].T.numpy(),
            W_dec=sd["W_dec"].numpy(),
            b_enc=sd["b_enc"].numpy(),
            b_dec=sd["b_dec"].numpy(),
            threshold=sd["activation_function.threshold"].numpy(),
        )
        paths.append(f"params_{i}.npz")
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "transcoders": paths,
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    t = load_transcoders(d, model)
    x = torch.randn(5, 64)
    torch.testing.assert_close(t.encode(1, x), ref.encode(1, x))


def test_gemma_scope_2_safetensors(tc_root: Path, model, tmp_path: Path) -> None:
    ref = load_transcoders(tc_root / "skip", model)
    d = tmp_path / "gs2"
    d.mkdir()
    for i in range(2):
        sd = load_file(str(tc_root / "skip" / f"layer_{i}.safetensors"))
        save_file(
            {
                "w_enc": sd["W_enc"].T.contiguous(),
                "w_dec": sd["W_dec"],
                "b_enc": sd["b_enc"],
                "b_dec": sd["b_dec"],
                "threshold": sd["activation_function.threshold"],
                "affine_skip_connection": sd["W_skip"].T.contiguous(),
            },
            str(d / f"layer_{i}.safetensors"),
        )
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    t = load_transcoders(d, model)
    x = torch.randn(5, 64)
    torch.testing.assert_close(t.encode(0, x), ref.encode(0, x))
    torch.testing.assert_close(t.skip(1, x), ref.skip(1, x))


# ---------------------------------------------------------------------- validation errors
def test_missing_config(tmp_path: Path, model) -> None:
    with pytest.raises(TranscoderError, match=r"config\.yaml"):
        load_transcoders(tmp_path, model)
    with pytest.raises(TranscoderError, match="no transcoders"):
        load_transcoders(tmp_path / "nope", model)


def test_missing_layer(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    (d / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match="layer 1"):
        load_transcoders(d, model)


def test_missing_clt_layer(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "clt", tmp_path / "c")
    (d / "W_dec_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match="layer 1"):
        load_transcoders(d, model)


def test_corrupted_file(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    f = d / "layer_0.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(TranscoderError, match="corrupted"):
        load_transcoders(d, model)


def test_wrong_layer_count(tc_root: Path, tmp_path: Path) -> None:
    three = load_model(build_tiny_model("llama", tmp_path / "m3", n_layers=3))
    with pytest.raises(TranscoderError, match="3-layer"):
        load_transcoders(tc_root / "relu", three)
    with pytest.raises(TranscoderError, match="layer 2"):
        load_transcoders(tc_root / "clt", three)


def test_wrong_d_model(tc_root: Path, tmp_path: Path) -> None:
    wide = load_model(build_tiny_model("llama", tmp_path / "w", d_model=32, n_layers=2))
    with pytest.raises(TranscoderError, match="d_model"):
        load_transcoders(tc_root / "relu", wide)


def test_shape_mismatch_in_one_layer(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    sd = load_file(str(d / "layer_1.safetensors"))
    sd["W_dec"] = sd["W_dec"][:, :10].contiguous()
    save_file(sd, str(d / "layer_1.safetensors"))
    with pytest.raises(TranscoderError, match="W_dec"):
        load_transcoders(d, model)


def test_non_finite_weights(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    sd = load_file(str(d / "layer_0.safetensors"))
    sd["W_enc"][3, 3] = float("nan")
    save_file(sd, str(d / "layer_0.safetensors"))
    with pytest.raises(TranscoderError, match="NaN"):
        load_transcoders(d, model)


def _with_config(d: Path, **changes: object) -> Path:
    """``d`` with ``changes`` written into its config.yaml."""
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg.update(changes)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_unsupported_hook(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    _with_config(d, feature_output_hook="blocks.0.hook_resid_post")
    with pytest.raises(TranscoderError, match="feature_output_hook"):
        load_transcoders(d, model)


def test_bad_config_values(tc_root: Path, model, tmp_path: Path) -> None:
    d = _copy(tc_root / "relu", tmp_path / "c")
    _with_config(d, model_kind="mystery")
    with pytest.raises(TranscoderError, match="model_kind"):
        load_transcoders(d, model)
    _with_config(d, model_kind="transcoder_set", activation="topk")
    with pytest.raises(TranscoderError, match="'k'"):
        load_transcoders(d, model)
    (d / "config.yaml").write_text("model_kind: [unclosed")
    with pytest.raises(TranscoderError, match="YAML"):
        load_transcoders(d, model)


def test_listed_file_gone_uses_the_one_beside_the_config_and_says_so(
    tc_root: Path, model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config listing files that moved away: the same-named files next to it are used, and a
    warning names the listed path and the file used (never a silent substitution)."""
    moved = _copy(tc_root / "jumprelu", tmp_path / "moved")
    gone = tmp_path / "gone"
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["transcoders"] = [str(gone / f"layer_{i}.safetensors") for i in range(2)]
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="atlas.transcoders.loading"):
        t = load_transcoders(moved, model)
    assert t.files == [moved / f"layer_{i}.safetensors" for i in range(2)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, warned
    for i, message in enumerate(warned):
        assert str(gone / f"layer_{i}.safetensors") in message
        assert str(moved / f"layer_{i}.safetensors") in message
    (moved / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match=f"layer 1: {gone / 'layer_1.safetensors'}"):
        load_transcoders(moved, model)
