"""Circuit Atlas tests: ``unit/<package>/`` mirrors ``atlas/`` (no services), ``integration/neo4j``
and ``integration/celery`` run against real servers, ``cli/`` drives the console commands,
``gpu/`` needs CUDA; ``golden/`` holds the reference data (not tests)."""

from pathlib import Path

#: The repository root, for tests that run commands or read files relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Golden files from the references (data, see golden/README.md).
GOLDEN = REPO_ROOT / "tests" / "golden"
