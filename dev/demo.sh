#!/usr/bin/env bash
# `make demo`: set-up, then `atlas demo` (local Neo4j + Redis + workers on the toy world).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
dev/setup.sh
exec .venv/bin/atlas demo "$@"
