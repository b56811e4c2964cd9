"""Helpers for tests that start servers or worker processes of their own (not fixtures)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import IO, Any

from atlas.services import _proc
from tests import REPO_ROOT

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


def subprocess_env(
    settings: Any, drop: tuple[str, ...], extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a child process: this one's without the variables starting with
    ``drop``, plus the settings' ATLAS_HOME, REDIS_URL and NEO4J_*, then ``extra``, with the
    repository first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(settings_env(settings))
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    stdout: IO[bytes],
    stderr: IO[bytes] | int = subprocess.STDOUT,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with no stdin, as a child that dies with the test process."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_proc.die_with_parent(),
    )
