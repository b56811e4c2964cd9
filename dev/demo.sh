#!/usr/bin/env bash
# `make demo`: set-up, then `atlas demo` when that command exists, else the services placeholder
# (local Neo4j + Redis, schema init, one task round-tripped through a real worker).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
dev/setup.sh
if .venv/bin/atlas demo --help >/dev/null 2>&1; then
  exec .venv/bin/atlas demo "$@"
fi
exec .venv/bin/python dev/services_demo.py "$@"
