"""Helpers shared by test modules (plain functions, not fixtures)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_world(root: Path) -> tuple[str, str]:
    """(model dir, transcoder dir) of a tiny seeded Llama (character-level tokenizer) under
    ``root``."""
    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders

    model = build_tiny_model("llama", root / "model", seed=0)
    tcs = build_tiny_transcoders(model, root / "transcoders", seed=0)
    return str(model), str(tcs)
