#!/usr/bin/env bash
# The whole gate, exactly what CI runs: set-up, format check, lint, types, the full test suite
# (Neo4j and Redis tests included: they start real local servers when none is configured).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
dev/setup.sh
echo "[test] ruff format --check" >&2
.venv/bin/ruff format --check .
echo "[test] ruff check" >&2
.venv/bin/ruff check .
echo "[test] mypy" >&2
.venv/bin/mypy
echo "[test] pytest" >&2
.venv/bin/pytest -q "$@"
