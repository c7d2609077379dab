#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch + a build of
# esper_gate against it) when needed, then runs what you ask for.
#
#   bash scripts/run.sh demo [args]   the demo (python -m esper_gate demo)
#   bash scripts/run.sh test [args]   the test suite (pytest)
#   bash scripts/run.sh bench [args]  the quick benchmark
#   bash scripts/run.sh setup         only set up
#
# Knobs: ESPER_GATE_VENV (default .venv), ESPER_GATE_TORCH (default
# torch==2.14.1, the CUDA 13.0 build), CUDA_HOME (default /usr/local/cuda when
# present), plus setup.py's ESPER_GATE_FORCE_CPU / ESPER_GATE_FORCE_CUDA /
# ESPER_GATE_CUDA_ARCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ESPER_GATE_VENV:-.venv}
TORCH_SPEC=${ESPER_GATE_TORCH:-torch==2.14.1}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

log() { echo "[run.sh] $*" >&2; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  local want="$TORCH_SPEC setuptools wheel ninja pytest pytest-timeout hypothesis numpy matplotlib"
  local have_stamp="$VENV/.esper_gate_deps"
  if [ "$(cat "$have_stamp" 2>/dev/null)" != "$want" ]; then
    log "installing $want"
    "$VENV/bin/pip" install -q --disable-pip-version-check $want
    echo "$want" > "$have_stamp"
  fi
  # Rebuild only when the sources or the build script changed.
  local src_hash
  src_hash=$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py; env | grep '^ESPER_GATE_FORCE\|^ESPER_GATE_CUDA_ARCHS' || true) | sha256sum | cut -c1-16)
  if [ "$(cat "$VENV/.esper_gate_build" 2>/dev/null)" != "$src_hash" ] || \
     ! "$VENV/bin/python" -c "import esper_gate" >/dev/null 2>&1; then
    log "building esper_gate against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    local t0=$SECONDS
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
      > "$VENV/build.log" 2>&1 || { cat "$VENV/build.log"; exit 1; }
    log "build took $((SECONDS - t0)) s"
    "$VENV/bin/python" -m esper_gate info >&2
    echo "$src_hash" > "$VENV/.esper_gate_build"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/python" -m esper_gate demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) setup; exec "$VENV/bin/python" -m esper_gate bench "$@" ;;
  *) echo "usage: bash scripts/run.sh {demo|test|bench|setup} [args]" >&2; exit 2 ;;
esac
