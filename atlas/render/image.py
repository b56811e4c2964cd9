"""Image prompts' heatmaps and feature cards.

The heatmap of selected image soft tokens is the element-wise maximum of their rollout maps,
drawn over the image by :func:`atlas.attribution.rollout.render_map` (the paper's colours), at
the image's own size. A feature card shows the feature's name and label, its logit-lens tokens,
its top activating text snippets and image crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atlas.errors import InputError
from atlas.render._figure import Drawn, new_figure, output_format, save, short, token_text

if TYPE_CHECKING:
    import torch
    from PIL import Image


def draw_heatmap(
    image: Image.Image,
    rollout: torch.Tensor,
    tokens: Sequence[int],
    out: str | Path,
    *,
    min_side: int = 384,
) -> Drawn:
    """Write ``image`` with the rollout heat of image tokens ``tokens`` (indices ``k`` into
    ``rollout``, ``(T, rows, cols)``) overlaid, as a PNG of the image's size; an image whose
    longer side is under ``min_side`` pixels is first enlarged by the smallest integer factor
    that reaches it (nearest neighbour, so every pixel stays a sharp block)."""
    from atlas.attribution.rollout import render_map

    output_format(out, (".png",))
    n = int(rollout.shape[0])
    if not tokens:
        raise InputError("name at least one image token")
    bad = [k for k in tokens if not 0 <= k < n]
    if bad:
        raise InputError(f"image token {bad[0]} is not one of the prompt's {n} (0..{n - 1})")
    longest = max(image.size)
    if 0 < longest < min_side:
        k = -(-min_side // longest)
        from PIL.Image import Resampling

        image = image.resize((image.width * k, image.height * k), Resampling.NEAREST)
    heat = rollout[list(tokens)].amax(dim=0)
    picture = render_map(heat, image)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return Drawn(path=path, size=picture.size)


def draw_card(card: Mapping[str, Any], out: str | Path) -> Drawn:
    """Write a feature card. ``card`` holds ``name``, and optionally ``label``, ``top_tokens``
    and ``top_values`` (logit lens), ``snippets`` (``[{"text", "activation"}]``) and ``crops``
    (``[{"image": PIL image, "caption"}]``)."""
    output_format(out)
    crops = list(card.get("crops") or [])[:6]
    snippets = list(card.get("snippets") or [])[:8]
    fig = new_figure(6.5, 3.0 + 0.22 * len(snippets) + (1.3 if crops else 0.0))
    height = fig.get_size_inches()[1]
    y = 1.0 - 0.35 / height

    def line(text: str, size: float = 8.0, weight: str = "normal", gap: float = 0.24) -> None:
        nonlocal y
        fig.text(0.04, y, text, fontsize=size, weight=weight, va="top", color="#1a202c")
        y -= gap / height

    line(str(card["name"]), 11, "bold", 0.32)
    line(f"label: {card.get('label') or '(none)'}", 9, gap=0.36)
    tokens, values = list(card.get("top_tokens") or []), list(card.get("top_values") or [])
    lens = ", ".join(
        f"{token_text(t)} ({values[i]:.2f})" if i < len(values) else token_text(t)
        for i, t in enumerate(tokens)
    )
    line("logit lens:", 8, "bold")
    line(short(lens, 110) or "(none)", gap=0.36)
    line("top activations:", 8, "bold")
    for s in snippets or [{"text": "(none)", "activation": None}]:
        act = s.get("activation")
        line(("" if act is None else f"{act:7.3f}  ") + short(str(s["text"]), 95))
    if crops:
        y -= 0.1 / height
        fig.text(0.04, y, "image crops:", fontsize=8, weight="bold", va="top")
        size = 0.95 / height
        for i, crop in enumerate(crops):
            ax = fig.add_axes((0.04 + i * 0.155, y - 0.2 / height - size, 0.14, size))
            ax.imshow(np.asarray(crop["image"].convert("RGB")))
            ax.set_axis_off()
            ax.set_title(short(str(crop.get("caption", "")), 20), fontsize=6)
    return save(fig, out, nodes=[str(card["name"])])
