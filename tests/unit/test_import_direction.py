"""The lint rule that keeps the compute core free of services: a wrong-direction import fails
``ruff check`` (the same gate CI runs), a right-direction one passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT

ROOT = REPO_ROOT
RUFF = Path(sys.executable).with_name("ruff")


def _ruff(filename: str, source: str) -> subprocess.CompletedProcess[str]:
    """``ruff check`` of ``source`` as if it were the file ``filename`` of this repository."""
    return subprocess.run(
        [str(RUFF), "check", "--no-cache", "--select", "TID251", "--stdin-filename", filename, "-"],
        input=source,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("filename", "source"),
    [
        ("atlas/models/probe.py", "import neo4j\n"),
        ("atlas/attribution/probe.py", "from celery import Celery\n"),
        ("atlas/transcoders/probe.py", "import click\n"),
        ("atlas/graph.py", "from atlas.store import read\n"),
        ("atlas/interchange/probe.py", "from atlas.pipeline.steps import run_inline\n"),
        ("atlas/interventions/probe.py", "import atlas.cli\n"),
        ("atlas/circuits/probe.py", "from atlas.engine import Engine\n"),
        ("atlas/testing/probe.py", "from tests.conftest import clean_neo4j\n"),
    ],
)
def test_wrong_direction_import_fails_the_lint(filename: str, source: str) -> None:
    r = _ruff(filename, source)
    assert r.returncode != 0 and "TID251" in r.stdout, (filename, r.stdout, r.stderr)


@pytest.mark.parametrize(
    ("filename", "source"),
    [
        ("atlas/store/probe.py", "import neo4j\nfrom atlas.graph import Graph\n"),
        ("atlas/pipeline/probe.py", "from atlas.store import read\n"),
        ("atlas/cli/probe.py", "import click\nfrom atlas.pipeline import submit\n"),
        ("workers/probe.py", "from celery import Celery\n"),
        ("atlas/models/probe.py", "import torch\nfrom atlas.graph import Graph\n"),
    ],
)
def test_right_direction_import_passes_the_lint(filename: str, source: str) -> None:
    r = _ruff(filename, source)
    assert r.returncode == 0, (filename, r.stdout, r.stderr)
