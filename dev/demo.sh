#!/usr/bin/env bash
# `make demo`: set-up, then `atlas demo` (the toy prompts through the workers into Neo4j,
# then the cross-prompt answers).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
dev/setup.sh
exec .venv/bin/atlas demo "$@"
