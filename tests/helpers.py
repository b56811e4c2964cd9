"""Helpers shared by test modules (plain functions, not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests import REPO_ROOT

#: (family, transcoder kind, skip connection): one of each text family the engine supports, plus
#: skip transcoders and cross-layer transcoders; the checks that must hold on every family use it.
FAMILY_CASES = [
    ("gemma2", "jumprelu", False),
    ("gemma3", "jumprelu", False),
    ("llama", "relu", False),
    ("qwen2", "jumprelu", False),
    ("qwen3", "topk", False),
    ("gpt2", "jumprelu", False),
    ("gemma2", "jumprelu", True),
    ("llama", "jumprelu", True),
    ("gemma2", "clt", False),
    ("qwen3", "clt", False),
]


def build_tiny_world(root: Path) -> tuple[str, str]:
    """(model dir, transcoder dir) of a tiny seeded Llama (character-level tokenizer) under
    ``root``."""
    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders

    model = build_tiny_model("llama", root / "model", seed=0)
    tcs = build_tiny_transcoders(model, root / "transcoders", seed=0)
    return str(model), str(tcs)


def run_console(
    args: list[str], settings: Any, *, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """The real console script (``.venv/bin/atlas``) as a user's shell or CI runs it, reaching
    ``settings``' atlas home, Neo4j and Redis (``env`` on top)."""
    script = Path(sys.executable).with_name("atlas")
    assert script.is_file(), script
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "REDIS_"))}
    base |= {
        "ATLAS_HOME": str(settings.atlas_home),
        "NEO4J_URI": settings.neo4j_uri,
        "NEO4J_USER": settings.neo4j_user,
        "NEO4J_PASSWORD": settings.neo4j_password.get_secret_value(),
        "REDIS_URL": settings.redis_url or "",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [str(script), *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
