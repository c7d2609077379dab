#!/usr/bin/env bash
# Packaging check: what a pip user gets from a release, end to end.
#
#   bash scripts/check_packaging.sh [cpu] [cuda]      (default: cpu)
#
#  1. builds the sdist (python -m build --sdist, isolated: no torch needed) and
#     checks it holds every tracked file under csrc/ and esper_gate/ and no
#     build output;
#  2. per variant, builds a wheel from the unpacked sdist alone, against the
#     torch of a build environment (--no-build-isolation);
#       cpu:  .venv-cpu (torch 2.13.0+cpu), ESPER_GATE_FORCE_CPU=1
#       cuda: .venv (torch 2.14.1, CUDA 13.0), ESPER_GATE_FORCE_CUDA=1, arch
#             ESPER_GATE_CUDA_ARCHS (default 9.0: one arch keeps nvcc short)
#  3. installs the wheel (and that torch) into a fresh venv where only the
#     wheel provides esper_gate, and from a directory outside the checkout runs
#     `python -m esper_gate info` and a 2-rank gloo sync (scripts/pkg_smoke.py).
# Prints the sdist file count, each wheel's tag and size, and the time taken.
# A missing build environment is created (torch + setuptools, wheel, ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(cpu)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-2} PIP_DISABLE_PIP_VERSION_CHECK=1
W=$(mktemp -d "${TMPDIR:-/tmp}/esper_gate_pkg.XXXXXX")
trap 'rm -rf "$W"' EXIT
t0=$SECONDS
log() { echo "[check_packaging +$((SECONDS - t0))s] $*"; }
fail() { echo "[check_packaging] FAIL: $*" >&2; exit 1; }

build_env() {  # variant -> the python of an environment with that variant's torch and build tools
  local venv spec
  case "$1" in
    cpu) venv=${ESPER_GATE_PKG_CPU_VENV:-.venv-cpu}; spec=torch==2.13.0 ;;
    cuda) venv=${ESPER_GATE_PKG_CUDA_VENV:-.venv}; spec=torch==2.14.1 ;;
    *) fail "unknown variant $1 (expected cpu or cuda)" ;;
  esac
  if ! "$venv/bin/python" -c "import torch, setuptools, wheel" >/dev/null 2>&1; then
    log "creating build environment $venv ($spec)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$spec" setuptools wheel ninja >&2
  fi
  echo "$ROOT/$venv/bin/python"
}

# ---- 1. sdist ------------------------------------------------------------------------
CPU_PY=$(build_env "${VARIANTS[0]}")
"$CPU_PY" -m build --version >/dev/null 2>&1 || "$CPU_PY" -m pip install -q build
log "building the sdist (isolated build environment, without torch)"
"$CPU_PY" -m build --sdist --outdir "$W/dist" . > "$W/sdist.log" 2>&1 || { cat "$W/sdist.log"; fail "sdist"; }
SDIST=$(ls "$W"/dist/esper_gate-*.tar.gz)
tar -xzf "$SDIST" -C "$W"
SRC=$(ls -d "$W"/esper_gate-*/)
SRC=${SRC%/}
nfiles=$(find "$SRC" -type f | wc -l)
log "sdist $(basename "$SDIST"): $nfiles files, $(du -k "$SDIST" | cut -f1) KiB"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  missing=$(git ls-files csrc esper_gate setup.py pyproject.toml MANIFEST.in | while read -r f; do
    [ -f "$SRC/$f" ] || echo "$f"; done)
  [ -z "$missing" ] || fail "the sdist lacks tracked files: $missing"
fi
built=$(cd "$SRC" && find . -name '_build_info.py' -o -name '*.so' -o -name '*.o' | head)
[ -z "$built" ] || fail "the sdist carries build outputs: $built"

# ---- 2-3. per variant: wheel from the sdist, fresh venv, smoke test outside the checkout ------
for variant in "${VARIANTS[@]}"; do
  vt0=$SECONDS
  BPY=$(build_env "$variant")
  torch_spec="torch==$("$BPY" -c 'import torch; print(torch.__version__.split("+")[0])')"
  if [ "$variant" = cuda ]; then
    knobs=(ESPER_GATE_FORCE_CUDA=1 "ESPER_GATE_CUDA_ARCHS=${ESPER_GATE_CUDA_ARCHS:-9.0}")
  else
    knobs=(ESPER_GATE_FORCE_CPU=1)
  fi
  log "[$variant] building a wheel from the unpacked sdist against $("$BPY" -c 'import torch; print(torch.__version__)') (${knobs[*]})"
  rm -rf "$SRC/build"
  (cd "$SRC" && env "${knobs[@]}" "$BPY" -m pip wheel -v --no-build-isolation --no-deps -w "$W/wheels-$variant" .) \
    > "$W/wheel-$variant.log" 2>&1 || { tail -n 60 "$W/wheel-$variant.log"; fail "[$variant] wheel build"; }
  grep "esper_gate setup:" "$W/wheel-$variant.log" | sed 's/^ *//' || true
  WHEEL=$(ls "$W/wheels-$variant"/esper_gate-*.whl)
  name=$(basename "$WHEEL")
  tag=${name#esper_gate-*-}
  tag=${tag%.whl}
  log "[$variant] wheel $name: tag $tag, $(du -k "$WHEEL" | cut -f1) KiB"
  case "$tag" in cp310-abi3-*) ;; *) fail "[$variant] expected a cp310-abi3 wheel, got $tag" ;; esac

  log "[$variant] fresh venv: $torch_spec + the wheel"
  python3 -m venv "$W/venv-$variant"
  "$W/venv-$variant/bin/pip" install -q "$WHEEL" "$torch_spec" > "$W/install-$variant.log" 2>&1 \
    || { tail -n 30 "$W/install-$variant.log"; fail "[$variant] install"; }
  log "[$variant] installed; from $W/run-$variant (outside the checkout):"
  mkdir -p "$W/run-$variant"
  cp scripts/pkg_smoke.py "$W/run-$variant/"
  (
    cd "$W/run-$variant"
    unset PYTHONPATH
    info=$("$W/venv-$variant/bin/python" -m esper_gate info) || { echo "$info"; fail "[$variant] info"; }
    echo "$info"
    grep -q "^  build          $variant\$" <<< "$info" || fail "[$variant] info does not report a $variant build"
    "$W/venv-$variant/bin/python" pkg_smoke.py
  ) || fail "[$variant] the installed wheel"
  # Each fresh venv goes as soon as it has passed: the CUDA one alone is about 5.6 GiB.
  rm -rf "$W/venv-$variant" "$W/run-$variant"
  log "[$variant] passed in $((SECONDS - vt0)) s"
done
log "packaging check passed (${VARIANTS[*]}) in $((SECONDS - t0)) s"
