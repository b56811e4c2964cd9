#!/usr/bin/env bash
# Create circuit-tracer's OWN virtual environment at bench/.venv-ct (gitignored).
#
# circuit-tracer is a test oracle and benchmark peer only, never a runtime dependency of atlas.
# Order matters (REFERENCE.md §1): torch first (the same version our venv uses, so uv reuses its
# cache and does not pull another build), then circuit-tracer==0.5.0, then nnsight==0.6.1 (pip would
# otherwise pick nnsight 0.8.x, whose layout breaks circuit-tracer's nnsight backend).
#
# Usage: bash bench/ct_env.sh            (idempotent; re-running only fills in what is missing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/bench/.venv-ct"
# uv: $UV, else the one dev/setup.sh bootstraps, else uv on PATH
BOOT="${ATLAS_BOOTSTRAP:-${XDG_CACHE_HOME:-$HOME/.cache}/circuit-atlas/bootstrap}"
UV="${UV:-$BOOT/bin/uv}"
if ! command -v "$UV" >/dev/null 2>&1; then UV="uv"; fi
OUR_PY="$ROOT/.venv/bin/python"

TORCH_SPEC="torch"
if [ -x "$OUR_PY" ]; then
  TV="$("$OUR_PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
  if [ -n "$TV" ]; then TORCH_SPEC="torch==$TV"; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$UV" venv -p 3.11 "$VENV"
fi
echo "[ct_env] installing $TORCH_SPEC"
"$UV" pip install -p "$VENV/bin/python" "$TORCH_SPEC"
echo "[ct_env] installing circuit-tracer==0.5.0"
"$UV" pip install -p "$VENV/bin/python" "$TORCH_SPEC" "circuit-tracer==0.5.0"
echo "[ct_env] installing nnsight==0.6.1"
"$UV" pip install -p "$VENV/bin/python" "$TORCH_SPEC" "circuit-tracer==0.5.0" "nnsight==0.6.1"
# Bytecode compiled once, as pip does at install (uv does not, and PYTHONDONTWRITEBYTECODE is common
# on these machines): otherwise every circuit-tracer process compiles torch, transformers and
# TransformerLens again (~5 s of each start on 2 cores), which a pip user does not pay.
echo "[ct_env] compiling bytecode"
"$VENV/bin/python" -m compileall -q -j 0 "$VENV"/lib/python3.*/site-packages >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("torch", "circuit-tracer", "nnsight", "transformers", "transformer-lens"):
    try:
        print(f"[ct_env] {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"[ct_env] {p} MISSING")
PY
