"""Attention rollout for image soft tokens: which part of the picture each image token stands for.

The recipe of the VLM circuit-tracing paper, from the vision tower's eager attentions
(``attentions[l]`` of shape ``[B, H, N, N]``, one tuple entry per layer):

1. For each of the last ``last_k`` layers (all of them if fewer), in layer order: ``p = A / (row
   sum + 1e-6)``; each head's entropy ``-sum p log(p + 1e-6)`` averaged over query rows; keep the
   ``max(1, round(head_fraction * H))`` heads of lowest entropy and average their attentions; add
   the identity; normalise rows (``sum + 1e-6``).
2. ``rollout = I``, then ``rollout = A_l @ rollout`` for each kept layer in order.
3. ``grid = sqrt(N)`` patches per side (``cls_tokens`` leading tokens, e.g. CLIP's CLS, are dropped
   from rows and columns after the product, so paths through them still count).
4. Image soft token ``k = (pr, pc)``, row-major over the pooled ``t x t`` grid (the projector's
   pooling order), owns the ``block x block`` patches with ``block = grid / t``; its map is the
   element-wise max over those patches' rollout rows, reshaped to ``[grid, grid]``. ``block`` is 1
   when every patch is its own token (LLaVA).

Maps are float32 ``[n_image_tokens, grid, grid]``, before any clipping or scaling. Rendering
(:func:`render_map`): clip at the map's own 0.95 quantile, min-max scale (denominator clamped to
1e-6), bilinear resize to the image, overlay ``0.2 * image + 0.8 * [h, 0.85 sqrt(h), 0.15 h^2]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

EPS = 1e-6
METHOD = "attention_rollout"
CLIP_QUANTILE = 0.95


@dataclass(frozen=True)
class RolloutParams:
    """Settings of the rollout (the paper's values by default)."""

    last_k: int = 4
    """Number of final vision layers rolled out (all layers if the tower has fewer)."""
    head_fraction: float = 0.30
    """Fraction of heads kept per layer, those with the lowest mean attention entropy."""
    cls_tokens: int = 0
    """Leading non-patch tokens in the tower's sequence (1 for CLIP's CLS, 0 for SigLIP)."""

    def __post_init__(self) -> None:
        if self.last_k < 1:
            raise ValueError(f"last_k must be at least 1, got {self.last_k}")
        if not 0.0 < self.head_fraction <= 1.0:
            raise ValueError(f"head_fraction must be in (0, 1], got {self.head_fraction}")
        if self.cls_tokens < 0:
            raise ValueError(f"cls_tokens must be non-negative, got {self.cls_tokens}")

    def heads_kept(self, n_heads: int) -> int:
        """How many heads a layer with ``n_heads`` heads keeps (Python's ``round``)."""
        return max(1, round(self.head_fraction * n_heads))


@dataclass(frozen=True)
class Rollout:
    """Rollout maps of every image soft token, with what produced them.

    Attributes:
        maps: float32 ``[n_image_tokens, grid, grid]``, unclipped; images in batch order, each
            image's tokens row-major over its pooled grid.
        grid: patches per side.
        pooled_grid: image tokens per side.
        block: patches per side of one token's block (``grid // pooled_grid``).
        layers: indices of the vision layers rolled out, in order.
        heads_kept: heads averaged per layer.
        params: the settings.
    """

    maps: Tensor
    grid: int
    pooled_grid: int
    block: int
    layers: tuple[int, ...]
    heads_kept: int
    params: RolloutParams

    def metadata(self) -> dict[str, object]:
        """JSON-ready description written beside the maps."""
        return {
            "method": METHOD,
            "grid": [self.grid, self.grid],
            "pooled_grid": [self.pooled_grid, self.pooled_grid],
            "block": self.block,
            "k": len(self.layers),
            "layers": list(self.layers),
            "head_fraction": self.params.head_fraction,
            "heads_kept": self.heads_kept,
            "reduction": "max",
            "clip": {"quantile": CLIP_QUANTILE, "scale": "min-max"},
            "n_image_tokens": int(self.maps.shape[0]),
            "params": asdict(self.params),
        }


def head_entropy(attention: Tensor) -> Tensor:
    """Mean over query rows of one head's attention entropy (``[N, N]`` -> scalar). One head at a
    time keeps the temporaries at ``N^2`` (a 64 x 64 grid has 4096 patches: 64 MiB per head)."""
    p = attention / (attention.sum(dim=-1, keepdim=True) + EPS)
    return -(p * torch.log(p + EPS)).sum(dim=-1).mean()


def layer_attention(attention: Tensor, params: RolloutParams) -> Tensor:
    """One layer's rollout matrix ``[N, N]`` from its attentions ``[H, N, N]``: the lowest-entropy
    heads averaged, identity added, rows normalised."""
    entropy = torch.stack([head_entropy(head) for head in attention])  # [H]
    kept = torch.argsort(entropy, stable=True)[: params.heads_kept(attention.shape[0])]
    mixed = attention[kept].mean(dim=0)
    mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
    return mixed / (mixed.sum(dim=-1, keepdim=True) + EPS)


def rollout_matrix(attentions: Sequence[Tensor], params: RolloutParams) -> Tensor:
    """Product ``A_L @ ... @ A_1`` over the kept layers (each ``[H, N, N]``), in layer order."""
    result: Tensor | None = None
    for attention in attentions:
        a = layer_attention(attention, params)
        result = a if result is None else a @ result
    assert result is not None
    return result


def pool_token_maps(matrix: Tensor, grid: int, pooled_grid: int) -> Tensor:
    """Per image token, the max over its block's rows of ``matrix`` ``[grid^2, grid^2]``;
    returns ``[pooled_grid^2, grid, grid]`` with tokens row-major over the pooled grid."""
    block = grid // pooled_grid
    n = grid * grid
    rows = matrix.reshape(pooled_grid, block, pooled_grid, block, n)
    rows = rows.permute(0, 2, 1, 3, 4).reshape(pooled_grid * pooled_grid, block * block, n)
    return rows.amax(dim=1).reshape(-1, grid, grid)


def _per_image(attentions: Sequence[Tensor]) -> list[list[Tensor]]:
    """Attentions regrouped per image: ``[image][layer] -> [H, N, N]``."""
    shapes = {tuple(a.shape) for a in attentions}
    if len(shapes) != 1:
        raise ValueError(f"attentions of every layer must have one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) == 3:
        return [list(attentions)]
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attentions must be [B, H, N, N] or [H, N, N], got {list(shape)}")
    return [[a[b] for a in attentions] for b in range(shape[0])]


def _grids(n_tokens: int, tokens_per_image: int, cls_tokens: int) -> tuple[int, int]:
    """(patches per side, image tokens per side), checked to tile evenly."""
    n_patches = n_tokens - cls_tokens
    grid = math.isqrt(max(n_patches, 0))
    if n_patches <= 0 or grid * grid != n_patches:
        raise ValueError(f"{n_patches} patches (after {cls_tokens} CLS) do not form a square grid")
    pooled = math.isqrt(tokens_per_image)
    if pooled * pooled != tokens_per_image or pooled == 0 or grid % pooled:
        raise ValueError(
            f"{tokens_per_image} tokens per image do not pool a {grid} x {grid} grid into blocks"
        )
    return grid, pooled


def attention_rollout(
    attentions: Sequence[Tensor | None],
    *,
    tokens_per_image: int,
    params: RolloutParams | None = None,
    dtype: torch.dtype = torch.float32,
) -> Rollout:
    """Rollout maps for every image soft token from a vision tower's eager attentions.

    ``attentions``: one ``[B, H, N, N]`` (or ``[H, N, N]``) tensor per vision layer, as the tower
    returns with ``output_attentions=True`` under ``attn_implementation="eager"`` or as
    :func:`vision_attentions` captures them (``None`` for layers outside the last ``last_k``).
    ``tokens_per_image``: soft tokens per image (Gemma-3: ``mm_tokens_per_image``; LLaVA: the
    number of patches, so block 1). ``dtype``: the computation's precision (maps are float32).
    """
    params = params or RolloutParams()
    if not attentions:
        raise ValueError("no attentions: run the vision tower with output_attentions=True")
    n_layers = len(attentions)
    layers = tuple(range(max(0, n_layers - params.last_k), n_layers))
    kept = [attentions[i] for i in layers]
    if any(a is None for a in kept):
        raise ValueError(f"attentions missing for some of the rolled-out layers {list(layers)}")
    images = _per_image([a for a in kept if a is not None])
    n_heads, n_tokens = images[0][0].shape[0], images[0][0].shape[-1]
    grid, pooled = _grids(n_tokens, tokens_per_image, params.cls_tokens)
    c = params.cls_tokens
    maps = []
    with torch.no_grad():
        for per_layer in images:
            matrix = rollout_matrix([a.detach().to(dtype) for a in per_layer], params)
            maps.append(pool_token_maps(matrix[c:, c:], grid, pooled))
    return Rollout(
        maps=torch.cat(maps).to(torch.float32).cpu().contiguous(),
        grid=grid,
        pooled_grid=pooled,
        block=grid // pooled,
        layers=layers,
        heads_kept=params.heads_kept(n_heads),
        params=params,
    )


def vision_attentions(
    tower: nn.Module,
    pixel_values: Tensor,
    *,
    last_k: int = 4,
    n_layers: int | None = None,
) -> list[Tensor | None]:
    """Run a CLIP or SigLIP vision tower and keep only the attentions the rollout reads.

    ``output_attentions=True`` would hold every layer's ``[B, H, N, N]`` (27 x 16 x 4096^2 values
    on Gemma-3-4B's tower); hooks on the last ``last_k`` of the first ``n_layers`` encoder layers
    (default: all) keep just those. ``n_layers`` matters where the features are read below the
    top (LLaVA's ``vision_feature_layer=-2`` reads after layer L-1: ``n_layers = L - 1``). The
    tower must run eager attention, the only kind that returns weights. Returns a list of length
    ``n_layers`` with ``None`` for the layers not kept (their indices stay true for
    :func:`attention_rollout`).
    """
    blocks = list(tower.get_submodule("encoder.layers").children())
    n_layers = len(blocks) if n_layers is None else n_layers
    if not 0 < n_layers <= len(blocks):
        raise ValueError(f"n_layers must be in 1..{len(blocks)}, got {n_layers}")
    kept = range(max(0, n_layers - last_k), n_layers)
    captured: list[Tensor | None] = [None] * n_layers
    handles = []

    def keep(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(
                    "the vision tower returned no attention weights: load the model with "
                    'attn_implementation="eager"'
                )
            captured[index] = weights.detach()

        return hook

    for i in kept:
        handles.append(blocks[i].get_submodule("self_attn").register_forward_hook(keep(i)))
    try:
        with torch.no_grad():
            tower(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------------- rendering
def normalise_map(heat: Tensor, quantile: float = CLIP_QUANTILE) -> Tensor:
    """Clip ``heat`` at its own ``quantile`` and min-max scale it into [0, 1]."""
    h = heat.to(torch.float64)
    h = torch.minimum(h, torch.quantile(h.flatten(), quantile))
    low = h.min()
    return (h - low) / (h.max() - low).clamp_min(EPS)


def heat_colours(heat: Tensor) -> Tensor:
    """``[H, W]`` values in [0, 1] -> ``[H, W, 3]`` colours in [0, 255]: R = h, G = 0.85 sqrt(h),
    B = 0.15 h^2."""
    h = heat.clamp(0.0, 1.0)
    return torch.stack([h, 0.85 * h.sqrt(), 0.15 * h * h], dim=-1) * 255.0


def render_map(heat: Tensor, image: Image.Image) -> Image.Image:
    """The paper's picture of one map ``[rows, cols]`` over ``image``: clipped, scaled, resized
    bilinearly to the image's size and overlaid (0.2 image + 0.8 colour)."""
    rgb = image.convert("RGB")
    scaled = normalise_map(heat)
    size = (rgb.height, rgb.width)
    resized = F.interpolate(scaled[None, None], size=size, mode="bilinear", align_corners=False)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(*size, 3)
    overlay = 0.2 * pixels.to(torch.float64) + 0.8 * heat_colours(resized[0, 0])
    out = overlay.round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out)


def write_rollout(out_dir: str | Path, rollout: Rollout, image: Image.Image) -> Path:
    """Write ``OUT/attention_maps/``: ``rollout.safetensors`` (tensor ``rollout``, float32
    ``[n_image_tokens, rows, cols]``, unclipped), ``{k}.png`` per image token (k from the first
    image token) and ``metadata.json``. Returns the ``attention_maps`` directory."""
    directory = Path(out_dir) / "attention_maps"
    directory.mkdir(parents=True, exist_ok=True)
    maps = rollout.maps.to(torch.float32).contiguous()
    save_file({"rollout": maps}, str(directory / "rollout.safetensors"))
    for k in range(maps.shape[0]):
        render_map(maps[k], image).save(directory / f"{k}.png", format="PNG")
    meta = rollout.metadata() | {"image_size": [image.width, image.height], "files": "{k}.png"}
    (directory / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory
