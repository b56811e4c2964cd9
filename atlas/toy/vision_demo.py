"""The demo's image prompts on the toy vision world, and its visual Hand features.

``demo_image_prompts(out_dir)`` draws held-out images (a seed stream no training or eval set
uses), writes them as PNG files under ``out_dir`` and returns :class:`DemoImagePrompt` items:
hands of every finger count (six-finger hands the most, as the demo asks about them), dots and
stars of every count from 1 to 9, and the three planets. ``item.spec()`` is the keyword
arguments of a :class:`atlas.pipeline.payloads.PromptSpec` (prompt, image path, tags, the toy
VLM and its transcoders).

``hand_features(paths)`` ranks transcoder features by how selectively they fire on hand images
against each other kind of image (per image the maximum activation over every position but
BOS, image tokens and question alike; the hands' mean minus the largest mean of another kind),
and returns ``LAYER/INDEX`` specs, as :func:`atlas.store.supernodes.define_from_features` takes
them. Hands and dots are asked the same question (``"how many ?"``), so a feature that beats
the dots fires because of what the picture shows, wherever the model computes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atlas.toy.build import ToyPaths
from atlas.toy.vision_data import (
    DOT_COUNTS,
    FINGER_COUNTS,
    PLANETS,
    VisionSample,
    make_sample,
)

#: Hands per finger count in the demo set (six fingers the most: the demo's question).
DEMO_HANDS: dict[int, int] = {3: 8, 4: 8, 5: 16, 6: 24, 7: 8}
DEMO_DOTS_PER_COUNT = 3
DEMO_PLANETS_PER_KIND = 4


@dataclass(frozen=True)
class DemoImagePrompt:
    """One image prompt of the demo."""

    prompt: str
    image: Path
    tags: tuple[str, ...]
    """``hand`` + ``fingers:N``; ``dots`` / ``stars`` + ``dots:N`` / ``stars:N``;
    ``planet`` + ``planet:NAME``."""
    answer: str
    """The correct answer word (what the image shows, not what the model says)."""
    model: str
    transcoders: str

    def spec(self) -> dict[str, Any]:
        """Keyword arguments of a ``PromptSpec``."""
        return {
            "prompt": self.prompt,
            "image": str(self.image),
            "tags": list(self.tags),
            "model": self.model,
            "transcoders": self.transcoders,
        }


def demo_samples(seed: int = 0) -> list[VisionSample]:
    """The demo's samples (:data:`DEMO_HANDS`, dots and stars of every count, planets);
    the same list for the same seed."""
    rng = random.Random(f"toy-vision-demo-{seed}")
    out: list[VisionSample] = []
    for n in FINGER_COUNTS:
        out += [make_sample(rng, "hand", fingers=n) for _ in range(DEMO_HANDS[n])]
    for n in DOT_COUNTS:
        for k in range(DEMO_DOTS_PER_COUNT):
            out.append(make_sample(rng, "dots", count=n, kind="stars" if k == 2 else "dots"))
    for planet in PLANETS:
        out += [make_sample(rng, "planet", planet=planet) for _ in range(DEMO_PLANETS_PER_KIND)]
    return out


def demo_image_prompts(
    out_dir: Path, seed: int = 0, paths: ToyPaths | None = None
) -> list[DemoImagePrompt]:
    """Write the demo's images under ``out_dir`` (``hand_6_000.png``, ``dots_4_001.png``,
    ``planet_mars_000.png``, ...) and return the prompts (at least 100), in a fixed order."""
    from atlas.toy.vision_build import vision_paths

    paths = paths or vision_paths()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counters: dict[str, int] = {}
    items = []
    for s in demo_samples(seed):
        a = s.attr
        stem = {
            "hand": f"hand_{a.get('fingers')}",
            "dots": f"{a.get('kind')}_{a.get('count')}",
            "planet": f"planet_{a.get('planet')}",
        }.get(s.task, s.task)
        k = counters.get(stem, 0)
        counters[stem] = k + 1
        path = out_dir / f"{stem}_{k:03d}.png"
        path.write_bytes(s.png_bytes())
        tags = list(s.tags)
        if s.task == "dots" and a["kind"] == "stars":
            tags.append(f"dots:{a['count']}")  # every counted image also carries dots:N
        items.append(
            DemoImagePrompt(
                prompt=s.question,
                image=path,
                tags=tuple(dict.fromkeys(tags)),
                answer=s.answer,
                model=str(paths.model_dir),
                transcoders=str(paths.transcoder_dir),
            )
        )
    return items


@torch.no_grad()
def feature_selectivity(
    paths: ToyPaths | None = None, seed: int = 0, per_task: int = 24
) -> dict[int, torch.Tensor]:
    """``{layer: (d_transcoder,)}`` hand selectivity of every feature (see the module
    docstring), on held-out images (a seed stream of its own)."""
    from safetensors.torch import load_file

    from atlas.toy.vision_build import collect_image_activations, load_vision, vision_paths
    from atlas.transcoders.training import apply_transcoder

    paths = paths or vision_paths()
    loaded = load_vision(paths)
    rng = random.Random(f"toy-vision-hand-features-{seed}")
    hands = [make_sample(rng, "hand", fingers=rng.choice(FINGER_COUNTS)) for _ in range(per_task)]
    groups = {
        "hand": hands,
        "dots": [make_sample(rng, "dots") for _ in range(per_task)],
        "planet": [make_sample(rng, "planet") for _ in range(per_task // 2)],
        "shape": [make_sample(rng, "shape") for _ in range(per_task // 2)],
    }
    import yaml

    tc_cfg = yaml.safe_load((paths.transcoder_dir / "config.yaml").read_text())
    files = sorted(paths.transcoder_dir.glob("layer_*.safetensors"))
    tensors = {int(f.stem.split("_")[1]): load_file(str(f)) for f in files}
    out: dict[int, torch.Tensor] = {}
    per_image: dict[str, dict[int, torch.Tensor]] = {}
    for name, group in groups.items():  # one question length per group
        acts = collect_image_activations(
            loaded.hf,
            loaded.tokenizer,
            group,
            sorted(tensors),
            input_hook=tc_cfg["feature_input_hook"],
            output_hook=tc_cfg["feature_output_hook"],
            batch=len(group),
        )
        per_image[name] = {}
        for layer, (x, _y) in acts.items():
            _, a = apply_transcoder(tensors[layer], x)
            # rows: per image, every position but BOS (the image tokens, then the question)
            n_pos = a.shape[0] // len(group)
            per_image[name][layer] = a.reshape(len(group), n_pos, -1).amax(1)
    for layer in tensors:
        others = torch.stack([per_image[k][layer].mean(0) for k in groups if k != "hand"])
        out[layer] = per_image["hand"][layer].mean(0) - others.amax(0)
    return out


def hand_features(
    paths: ToyPaths | None = None,
    top: int | None = 8,
    seed: int = 0,
    min_selectivity: float = 0.0,
) -> list[str]:
    """The ``top`` (``None``: all) most hand-selective features, as ``LAYER/INDEX`` specs, most
    selective first; only features whose selectivity exceeds ``min_selectivity`` (>= 0)."""
    sel = feature_selectivity(paths, seed)
    ranked: list[tuple[float, int, int]] = []
    for layer, s in sel.items():
        for f in torch.nonzero(s > max(min_selectivity, 0.0)).flatten().tolist():
            ranked.append((float(s[f]), layer, f))
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [f"{layer}/{f}" for _, layer, f in ranked[:top]]
