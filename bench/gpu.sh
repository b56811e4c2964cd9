#!/usr/bin/env bash
# GPU benchmark in ONE pass, well under 8 minutes: a Gemma-2-2B-shaped model with random weights
# (26 layers, d_model 2304, d_mlp 9216, vocab 256,000) and 16,384-wide JumpReLU transcoders,
# max_feature_nodes 8,192, batch 32:
#   1. 64 and 512 tokens, float32 and bfloat16: `attribute()` seconds and peak CUDA memory, ours and
#      circuit-tracer 0.5.0 (TransformerLens backend) side by side where bench/.venv-ct exists;
#   2. the longest prompt that fits (ours, bfloat16): 1,024, 2,048, 4,096, 8,192 tokens, stopping at
#      the first that fails (out of memory) or runs past its timeout.
# Every step has its own timeout and the whole script a deadline (GPU_DEADLINE_S, default 460 s);
# a step that would start past it is skipped and says so. Results: bench/out/gpu/*/results.json,
# copied to $OUT when set (the device tool's output folder).
#
#   bash bench/gpu.sh                   # on the GPU machine
#   bash bench/gpu.sh --dry-run         # the same steps on CPU with the `tiny` shape (seconds)
#   bash bench/gpu.sh --fetch-wheels    # here: wheels of our pure-Python needs the GPU image lacks
#                                       # (pydantic, pydantic-settings...) into .whl/ (carry it)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5"
if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  exit $?
fi

PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import pydantic_settings' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

SHAPE=gemma2-2b DEVICE=cuda LENGTHS="64 512" LONG="1024 2048 4096 8192"
STEP_S=110 LONG_S=90 THREADS=0
if [ "${1:-}" = "--dry-run" ]; then
  SHAPE=tiny DEVICE=cpu LENGTHS="16 32" LONG="64 128" STEP_S=120 LONG_S=60 THREADS=1
fi
DEADLINE=$((SECONDS + ${GPU_DEADLINE_S:-460}))
RESULTS="bench/out/gpu"
CT_FLAG=""
if [ ! -x bench/.venv-ct/bin/python ]; then
  CT_FLAG="--skip-ct"
  echo "[gpu] no bench/.venv-ct here (bash bench/ct_env.sh needs the network): ours only"
fi
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; }

step() {  # step NAME SECONDS ARGS...: one bench run, skipped past the deadline
  local name=$1 limit=$2; shift 2
  if [ $((SECONDS + 20)) -gt "$DEADLINE" ]; then
    echo "[gpu] $name: skipped (deadline)"; return 2
  fi
  echo "[gpu] $name (t=${SECONDS}s)"
  timeout $((limit * 3 + 60)) "$PY" bench/attribution.py --device "$DEVICE" --shape "$SHAPE" \
    --modes attribute --reps 1 --max-feature-nodes 8192 --batch-size 32 --threads "$THREADS" \
    --timeout "$limit" --out "$RESULTS/$name" "$@"
}

echo "[gpu] building $SHAPE inputs (t=${SECONDS}s)"
timeout 240 "$PY" -c "import sys; sys.path.insert(0, 'bench'); import attribution as a; a.build_inputs('$SHAPE', 'plt')" \
  || { echo "[gpu] could not build the inputs"; exit 1; }

for dt in bfloat16 float32; do
  # shellcheck disable=SC2086
  step "$dt" "$STEP_S" --dtype "$dt" --lengths $LENGTHS $CT_FLAG
done

for n in $LONG; do
  step "long-$n" "$LONG_S" --dtype bfloat16 --lengths "$n" --skip-ct || break
  if ! grep -q '"attribute_s"' "$RESULTS/long-$n/results.json" 2>/dev/null; then
    echo "[gpu] $n tokens did not fit or did not finish: longest that fits is the one before"
    break
  fi
done

if [ -n "${OUT:-}" ]; then
  for d in "$RESULTS"/*/; do
    [ -f "$d/results.json" ] && cp "$d/results.json" "$OUT/$(basename "$d").json"
  done
fi
echo "[gpu] done in ${SECONDS}s"
