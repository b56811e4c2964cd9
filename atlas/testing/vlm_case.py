"""A tiny image + text case on disk: a random Gemma-3 (or LLaVA) VLM, transcoders for its language
model and a picture, for the format, store, CLI and pipeline tests and the bench.

Built once per directory (a marker file says the build finished), so concurrent test modules and
re-runs reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from atlas.testing.tiny import build_tiny_transcoders
from atlas.testing.tiny_vlm import save_language_model, save_tiny_vlm

PROMPT = "how many fingers are there"


@dataclass(frozen=True)
class VlmCase:
    """Paths of one tiny case: the VLM, its transcoders, a PNG, and the text twin of the VLM."""

    model_dir: Path
    tc_dir: Path
    image: Path
    text_dir: Path


def picture(path: Path, seed: int = 0, size: tuple[int, int] = (50, 40)) -> Path:
    """A random RGB PNG of ``size`` at ``path`` (seeded, so its sha256 is stable)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[0] * size[1] * 3,), generator=gen, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, bytes(data.tolist())).save(path, format="PNG")
    return path


def tiny_vlm_case(root: Path, kind: str = "gemma3", *, d_transcoder: int = 128) -> VlmCase:
    """Build (or reuse) the tiny case of ``kind`` under ``root``.

    Gemma-3 transcoders use the paper's hooks (``mlp.hook_in`` / ``mlp.hook_out``: the MLP
    output before the post-feed-forward norm).
    """
    root = Path(root)
    case = VlmCase(root / "vlm", root / "tc", root / "hand.png", root / "text")
    done = root / ".built"
    if done.is_file():
        return case
    save_tiny_vlm(case.model_dir, kind)
    save_language_model(case.model_dir, case.text_dir)
    build_tiny_transcoders(case.text_dir, case.tc_dir, d_transcoder=d_transcoder)
    if kind == "gemma3":
        cfg = yaml.safe_load((case.tc_dir / "config.yaml").read_text())
        cfg["feature_input_hook"] = "mlp.hook_in"
        cfg["feature_output_hook"] = "mlp.hook_out"
        (case.tc_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    picture(case.image)
    done.write_text("ok\n")
    return case
