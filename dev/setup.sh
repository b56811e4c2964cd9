#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages (Redis, Java 17, Maven, chromium), uv,
# the .venv with circuit-atlas[dev] installed editable, and the Neo4j launcher build. A second
# run only checks stamps and is fast. Called by `make test` and `make demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- system packages (apt)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi
APT_UPDATED=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing $*, and no apt-get here: install them with your package manager"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    say "missing $*: run as root or install them (apt-get install -y $*)"
    exit 1
  fi
  if [ "$APT_UPDATED" -eq 0 ]; then
    say "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
java_ok=0
if command -v java >/dev/null 2>&1; then
  major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
  [ -n "$major" ] && [ "$major" -ge 17 ] && java_ok=1
fi
[ "$java_ok" -eq 1 ] || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
# Debian's chromium for the page's browser test (tests/web; driven by Playwright, which never
# downloads a browser of its own). ATLAS_SKIP_BROWSER=1 skips it and that test.
if [ -z "${ATLAS_SKIP_BROWSER:-}" ]; then
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
if [ "${#need[@]}" -gt 0 ]; then apt_install "${need[@]}"; fi

# ---------------------------------------------------------------- uv
BOOT="${ATLAS_BOOTSTRAP:-${XDG_CACHE_HOME:-$HOME/.cache}/circuit-atlas/bootstrap}"
if command -v uv >/dev/null 2>&1; then
  UV="$(command -v uv)"
elif [ -x "$BOOT/bin/uv" ]; then
  UV="$BOOT/bin/uv"
else
  say "installing uv into $BOOT (python3 -m pip install uv)"
  python3 -m venv "$BOOT" 2>/dev/null || { rm -rf "$BOOT"; mkdir -p "$BOOT"; }
  if [ -x "$BOOT/bin/python" ]; then
    "$BOOT/bin/python" -m pip install -q uv
  else  # no venv module: plain pip into a target directory
    python3 -m pip install -q --target "$BOOT/lib" uv
    mkdir -p "$BOOT/bin"
    ln -sf "$BOOT/lib/bin/uv" "$BOOT/bin/uv"
  fi
  UV="$BOOT/bin/uv"
fi

# ---------------------------------------------------------------- .venv + package
STAMP=".venv/.atlas-setup-stamp"
# The stamp covers pyproject.toml and the bytecode step below, so changing either reinstalls.
want="$( (cat pyproject.toml; echo "bytecode") | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv (python 3.11)"
  "$UV" venv -q .venv -p python3.11
  have=""
fi
if [ "$want" != "$have" ]; then
  say "installing circuit-atlas[dev] into .venv (uv pip install -e '.[dev]')"
  "$UV" pip install -q -p .venv/bin/python -e '.[dev]'
  # Bytecode is compiled once here: uv installs without it and PYTHONDONTWRITEBYTECODE is common, so
  # otherwise every process (CLI call, worker start, test subprocess) compiles torch and transformers
  # again (~4 s of each start on 2 cores). A few vendored test files do not compile; that is fine.
  say "compiling bytecode for .venv"
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3.*/site-packages >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
else
  say ".venv is up to date"
fi

# ---------------------------------------------------------------- Neo4j launcher (Maven, cached)
.venv/bin/python - <<'PY'
import sys

from atlas.services.neo4j_local import build_launcher
from atlas.settings import AtlasSettings

build_launcher(
    AtlasSettings().atlas_home / "launcher",
    progress=lambda message: print(f"[setup] {message}", file=sys.stderr),
)
PY
say "ready"
