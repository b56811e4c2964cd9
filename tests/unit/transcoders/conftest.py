"""Fixtures of the transcoder tests: one tiny Llama per module (transcoders are built on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from atlas.models import load_model
from atlas.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama", n_layers=2)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    return load_model(model_dir)
