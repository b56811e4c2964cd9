"""Attention rollout against a direct float64 computation from real vision-tower attentions, and
the files its rendering writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from atlas.attribution.rollout import (
    Rollout,
    RolloutParams,
    attention_rollout,
    normalise_map,
    render_map,
    vision_attentions,
    write_rollout,
)
from atlas.testing.tiny_vlm import build_tiny_vlm


# ---------------------------------------------------------------------- the direct computation
def reference_rollout(
    attentions: list[np.ndarray],
    tokens_per_image: int,
    last_k: int = 4,
    head_fraction: float = 0.30,
    cls_tokens: int = 0,
) -> np.ndarray:
    """The recipe written out with loops, in float64 numpy, for one image (attentions [H, N, N])."""
    layers = attentions[-last_k:]
    n = layers[0].shape[-1]
    roll = np.eye(n)
    for att in layers:
        att = att.astype(np.float64)
        n_heads = att.shape[0]
        entropies = []
        for h in range(n_heads):
            total = 0.0
            for q in range(n):
                row = att[h, q] / (att[h, q].sum() + 1e-6)
                total += -(row * np.log(row + 1e-6)).sum()
            entropies.append(total / n)
        keep = max(1, round(head_fraction * n_heads))
        order = sorted(range(n_heads), key=lambda h: entropies[h])[:keep]
        mixed = sum(att[h] for h in order) / keep
        mixed = mixed + np.eye(n)
        for q in range(n):
            mixed[q] = mixed[q] / (mixed[q].sum() + 1e-6)
        roll = mixed @ roll
    roll = roll[cls_tokens:, cls_tokens:]
    grid = math.isqrt(roll.shape[0])
    side = math.isqrt(tokens_per_image)
    block = grid // side
    maps = np.zeros((tokens_per_image, grid, grid))
    for k in range(tokens_per_image):
        pr, pc = divmod(k, side)
        best = np.full(grid * grid, -np.inf)
        for i in range(block):
            for j in range(block):
                patch = (pr * block + i) * grid + (pc * block + j)
                best = np.maximum(best, roll[patch])
        maps[k] = best.reshape(grid, grid)
    return maps


def _tower_attentions(kind: str, seed: int = 0, **kwargs: int) -> tuple[list[torch.Tensor], int]:
    """Eager attentions of the tiny VLM's vision tower on seeded pixels, and tokens per image."""
    model, _processor = build_tiny_vlm(kind, seed=seed, **kwargs)
    tower = model.model.vision_tower
    assert tower.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(seed + 11)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_attentions=True)
    config = model.config
    tokens = config.mm_tokens_per_image if kind == "gemma3" else config.image_seq_length
    return list(out.attentions), tokens


@pytest.fixture(scope="module")
def gemma_attn() -> tuple[list[torch.Tensor], int]:
    return _tower_attentions("gemma3", mm_tokens_per_image=16)


def _check(rollout: Rollout, attentions: list[torch.Tensor], tokens: int, **ref: object) -> None:
    assert rollout.maps.dtype == torch.float32
    per_image = []
    for b in range(attentions[0].shape[0]):
        per_image.append(
            reference_rollout([a[b].double().numpy() for a in attentions], tokens, **ref)  # type: ignore[arg-type]
        )
    want = np.concatenate(per_image)
    got = rollout.maps.double().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------- rollout
def test_gemma3_block2_matches_direct_computation(
    gemma_attn: tuple[list[torch.Tensor], int],
) -> None:
    attentions, tokens = gemma_attn
    assert len(attentions) == 5 and attentions[0].shape == (2, 4, 64, 64)
    rollout = attention_rollout(attentions, tokens_per_image=tokens)
    assert (rollout.grid, rollout.pooled_grid, rollout.block) == (8, 4, 2)
    assert rollout.layers == (1, 2, 3, 4) and rollout.heads_kept == 1
    assert rollout.maps.shape == (2 * 16, 8, 8)
    _check(rollout, attentions, tokens)


def test_gemma3_block4_and_params(gemma_attn: tuple[list[torch.Tensor], int]) -> None:
    attentions, _tokens = gemma_attn
    params = RolloutParams(last_k=2, head_fraction=0.5)
    rollout = attention_rollout(attentions, tokens_per_image=4, params=params, dtype=torch.float64)
    assert rollout.block == 4 and rollout.layers == (3, 4) and rollout.heads_kept == 2
    _check(rollout, attentions, 4, last_k=2, head_fraction=0.5)


def test_fewer_layers_than_last_k_uses_all(gemma_attn: tuple[list[torch.Tensor], int]) -> None:
    attentions, tokens = gemma_attn
    two = attentions[:2]
    rollout = attention_rollout(two, tokens_per_image=tokens)
    assert rollout.layers == (0, 1)
    _check(rollout, two, tokens)


def test_single_image_without_batch_axis(gemma_attn: tuple[list[torch.Tensor], int]) -> None:
    attentions, tokens = gemma_attn
    batched = attention_rollout(attentions, tokens_per_image=tokens)
    single = attention_rollout([a[1] for a in attentions], tokens_per_image=tokens)
    torch.testing.assert_close(single.maps, batched.maps[tokens:], rtol=0, atol=0)


def test_llava_clip_block1_drops_cls() -> None:
    attentions, tokens = _tower_attentions("llava")
    assert attentions[0].shape == (2, 4, 17, 17) and tokens == 16
    rollout = attention_rollout(
        attentions, tokens_per_image=tokens, params=RolloutParams(cls_tokens=1)
    )
    assert (rollout.grid, rollout.pooled_grid, rollout.block) == (4, 4, 1)
    _check(rollout, attentions, tokens, cls_tokens=1)
    with pytest.raises(ValueError, match="square grid"):
        attention_rollout(attentions, tokens_per_image=tokens)


def test_llava_siglip_block1() -> None:
    attentions, tokens = _tower_attentions("llava_siglip")
    rollout = attention_rollout(attentions, tokens_per_image=tokens)
    assert rollout.block == 1 and rollout.maps.shape == (2 * 16, 4, 4)
    _check(rollout, attentions, tokens)


@pytest.mark.parametrize(("heads", "kept"), [(1, 1), (4, 1), (5, 2), (8, 2), (16, 5)])
def test_heads_kept_rounds_like_python(heads: int, kept: int) -> None:
    assert RolloutParams().heads_kept(heads) == kept


def test_bad_shapes_and_params() -> None:
    with pytest.raises(ValueError):
        RolloutParams(head_fraction=0.0)
    with pytest.raises(ValueError):
        RolloutParams(last_k=0)
    att = torch.softmax(torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(ValueError, match="pool"):
        attention_rollout([att], tokens_per_image=9)
    with pytest.raises(ValueError, match="output_attentions"):
        attention_rollout([], tokens_per_image=4)


# ---------------------------------------------------------------------- rendering
def test_render_matches_formula_without_resizing() -> None:
    gen = torch.Generator().manual_seed(5)
    heat = torch.rand(8, 8, generator=gen)
    pixels = np.random.default_rng(5).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    got = np.asarray(render_map(heat, image)).astype(np.float64)

    h = heat.double().numpy()
    h = np.minimum(h, np.quantile(h, 0.95))
    h = (h - h.min()) / max(h.max() - h.min(), 1e-6)
    colour = np.stack([h, 0.85 * np.sqrt(h), 0.15 * h**2], axis=-1) * 255.0
    want = np.clip(np.round(0.2 * pixels + 0.8 * colour), 0, 255)
    np.testing.assert_array_equal(got, want)


def test_constant_map_is_safe() -> None:
    scaled = normalise_map(torch.full((4, 4), 0.25))
    assert torch.isfinite(scaled).all() and float(scaled.abs().max()) == 0.0


def test_write_rollout_files(tmp_path: Path, gemma_attn: tuple[list[torch.Tensor], int]) -> None:
    attentions, tokens = gemma_attn
    rollout = attention_rollout([a[:1] for a in attentions], tokens_per_image=tokens)
    image = Image.fromarray(
        np.random.default_rng(2).integers(0, 256, size=(30, 45, 3), dtype=np.uint8)
    )
    directory = write_rollout(tmp_path / "out", rollout, image)
    assert directory == tmp_path / "out" / "attention_maps"
    stored = load_file(str(directory / "rollout.safetensors"))
    assert list(stored) == ["rollout"]
    assert stored["rollout"].dtype == torch.float32 and stored["rollout"].shape == (16, 8, 8)
    torch.testing.assert_close(stored["rollout"], rollout.maps, rtol=0, atol=0)
    for k in range(tokens):
        with Image.open(directory / f"{k}.png") as png:
            assert png.format == "PNG" and png.size == (45, 30) and png.mode == "RGB"
    assert not (directory / f"{tokens}.png").exists()
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["method"] == "attention_rollout"
    assert meta["grid"] == [8, 8] and meta["pooled_grid"] == [4, 4] and meta["block"] == 2
    assert meta["k"] == 4 and meta["head_fraction"] == 0.3 and meta["reduction"] == "max"
    assert meta["clip"]["quantile"] == 0.95 and meta["image_size"] == [45, 30]


# ---------------------------------------------------------------------- capturing attentions
def test_vision_attentions_keeps_only_the_rolled_out_layers() -> None:
    model, _processor = build_tiny_vlm("gemma3", seed=3)
    tower = model.model.vision_tower
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tower(pixel_values=pixels, output_attentions=True).attentions
    captured = vision_attentions(tower, pixels)
    assert len(captured) == 5 and captured[0] is None
    for i in range(1, 5):
        got = captured[i]
        assert got is not None
        torch.testing.assert_close(got, full[i], rtol=0, atol=0)
    a = attention_rollout(captured, tokens_per_image=16)
    b = attention_rollout(full, tokens_per_image=16)
    assert a.layers == b.layers == (1, 2, 3, 4)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)


def test_vision_attentions_below_the_top_layer() -> None:
    model, _processor = build_tiny_vlm("llava")
    tower = model.model.vision_tower
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tower(pixel_values=pixels, output_attentions=True).attentions
    captured = vision_attentions(tower, pixels, last_k=2, n_layers=4)
    assert [c is None for c in captured] == [True, True, False, False]
    rollout = attention_rollout(
        captured, tokens_per_image=16, params=RolloutParams(last_k=2, cls_tokens=1)
    )
    assert rollout.layers == (2, 3)
    _check(rollout, list(full[:4]), 16, last_k=2, cls_tokens=1)


def test_vision_attentions_needs_eager() -> None:
    model, _processor = build_tiny_vlm("gemma3")
    model.set_attn_implementation("sdpa")
    tower = model.model.vision_tower
    with pytest.raises(ValueError, match="eager"):
        vision_attentions(tower, torch.zeros(1, 3, 32, 32))
    assert not any(layer.self_attn._forward_hooks for layer in tower.encoder.layers)
