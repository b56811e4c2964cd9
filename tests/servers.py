"""Helpers for tests that start servers or worker processes of their own (not fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: C1-only JIT: test servers live minutes, and this halves their start on a busy 2-core machine.
TEST_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1",)


def launcher_build_root() -> Path:
    """The shared launcher build cache (so each test session does not rebuild with Maven)."""
    from atlas.settings import AtlasSettings

    return AtlasSettings(_env_file=None).atlas_home / "launcher"  # type: ignore[call-arg]


def settings_env(settings: Any) -> dict[str, str]:
    """The environment a subprocess needs to reach the same Neo4j, Redis and atlas home."""
    env = {
        "ATLAS_HOME": str(settings.atlas_home),
        "REDIS_URL": settings.redis_url or "",
    }
    if settings.neo4j_uri:
        env["NEO4J_URI"] = settings.neo4j_uri
        env["NEO4J_USER"] = settings.neo4j_user
        env["NEO4J_PASSWORD"] = settings.neo4j_password.get_secret_value()
    return env
