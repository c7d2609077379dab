#!/usr/bin/env bash
# One-command GPU check for esper_gate: what a CPU-only machine cannot test (the CUDA build and
# kernels, NCCL, CUDA graphs, torch.compile) in one bounded run on a lent GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# On a machine with an NVIDIA GPU and this repository checked out, it
# Knob GPU_CHECK_NCCL_CYCLES (default 100): init/abort cycles of the owned_nccl step.
#
#   1. records the machine (nvidia-smi, torch, nvcc)                  env.log
#   2. builds the extension in place for the local GPU's arch          build.log
#      (ESPER_GATE_FORCE_CUDA=1, ESPER_GATE_CUDA_ARCHS=<capability>)
#   3. checks the build info says "cuda"                              info.log
#   4. runs every CUDA test (tests/test_cuda.py; a skipped test fails) test_cuda.log, test_cuda.xml
#      CUDA kernels == CPU kernels on random inputs; NCCL sync with one
#      rank; 2-4 ranks on the one GPU through gloo with CUDA tensors and a
#      divergence; no host sync inside the op (returns while a queued spin
#      kernel runs); capture + replay in a CUDA graph; torch.compile
#   4b. the gate's own NCCL communicator: tests/test_nccl_lib.py and    nccl_lib.log
#      tests/test_graph_safety.py, then benchmarks/gpu_owned_check.py: owned_nccl.log
#      init that times out then aborts, a stuck all_reduce aborted
#      within 2 s and a new communicator after it, one CUDA context
#      per process, 100 init/abort cycles without growth, a user's
#      global-mode capture while a gate all_reduce is in flight,
#      capture refused with the clear error, set_sync_debug_mode("error")
#   5. runs the benchmark's NCCL rows with one rank (per-slot unanimous
#      with .item(), rank-0 broadcast, bare floor, esper_gate, raw op) and
#      the host-side enqueue time of one sync                          bench.log, bench/bench.{md,json,png}
#   6. torch.compile(fullgraph=True) of the sync op on CUDA with NCCL  compile_sync_nccl.log
#   7. a quick subset of the CPU tests                                 cpu_tests.log
#   8. the gloo sweep (W = 2, 4) on this machine's CPUs                bench_cpu.log, bench_cpu/bench.*
# and prints a PASS/FAIL/SKIPPED line per step (also in summary.txt).
#
# Every step has a timeout and the whole run a budget (GPU_CHECK_BUDGET_S,
# default 290 s), so it ends in under 5 minutes; the benchmarks, last, are
# skipped when too little of the budget is left for them. Exit status: 0 every step
# passed; 1 a step failed or timed out; 3 no GPU is visible to torch: the GPU
# steps are SKIPPED (the CPU tests and a quick gloo benchmark still run, so the
# script itself can be tried anywhere).
#
# Knobs: PYTHON (default python3), CUDA_HOME (default: the toolkit of the nvcc
# on PATH, else /usr/local/cuda),
# MAX_JOBS (default nproc), GPU_CHECK_BUDGET_S, GPU_CHECK_SKIP_BUILD=1 (use
# the build that is there).
set -uo pipefail

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-290}
START=$SECONDS
# The in-place build lives in the source tree; spawned ranks inherit this.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

STEPS=()
RESULTS=()
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
record() {  # name status seconds note
  STEPS+=("$1")
  RESULTS+=("$(printf '%-8s %-18s %4ss  %s' "$2" "$1" "$3" "$4")")
  log "$2 $1 (${3}s) $4"
}

# step NAME TIMEOUT_S CMD...: run CMD with its output in $OUT/NAME.log, bounded
# by TIMEOUT_S and by what is left of the budget.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    record "$name" FAIL 0 "not run: the ${BUDGET}s budget is spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  # timeout(1) runs programs, not shell functions: run those in a child bash
  # (they are exported below). timeout signals the whole process group, so
  # spawned ranks die with their step.
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS "$took" "$OUT/$name.log"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAIL "$took" "TIMEOUT after ${limit}s; tail of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /'
  else
    record "$name" FAIL "$took" "exit $rc; tail of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /'
  fi
  return "$rc"
}

skip() { record "$1" SKIPPED 0 "$2"; }

: > "$OUT/gpu_check.log"
log "esper_gate GPU check: repo $ROOT, results in $OUT, budget ${BUDGET}s"

# ---- 1. machine ---------------------------------------------------------------
env_info() {
  echo "date: $(date -Is)"; echo "host: $(uname -a)"; echo "cpus: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "capability %d.%d" % torch.cuda.get_device_capability(0),
          "memory %.0f GiB" % (p.total_memory / 2**30), "count", torch.cuda.device_count())
print("nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
EOF
}
export PY OUT ROOT
export -f env_info
step env 60 env_info
GPU=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  GPU=1
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
  log "GPU: $GPU_NAME (arch $ARCH)"
else
  log "no GPU visible to torch: the GPU steps are SKIPPED (exit status 3)"
fi

# ---- 2-3. build --------------------------------------------------------------
build() {
  if [ -z "${CUDA_HOME:-}" ]; then
    # The toolkit holding the nvcc on PATH (which may be a wrapper script),
    # else the usual install places.
    local nvcc cand
    nvcc=$(command -v nvcc || true)
    for cand in ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"} \
                $(sed -n 's|^exec \(/[^ ]*\)/bin/nvcc .*|\1|p' "${nvcc:-/dev/null}" 2>/dev/null) \
                /usr/local/cuda /usr/local/cuda-*; do
      if [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
        CUDA_HOME=$cand
        break
      fi
    done
    [ -z "${CUDA_HOME:-}" ] && { echo "no CUDA toolkit found (nvcc on PATH: ${nvcc:-none}); set CUDA_HOME"; return 1; }
    export CUDA_HOME
  fi
  echo "CUDA_HOME=$CUDA_HOME ESPER_GATE_CUDA_ARCHS=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
  "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"
  ESPER_GATE_FORCE_CUDA=1 ESPER_GATE_CUDA_ARCHS=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PY" setup.py build_ext --inplace
}
check_build() {
  "$PY" -m esper_gate info || return 1
  "$PY" - <<'EOF'
import os, sys, esper_gate
where = os.path.dirname(esper_gate.__file__)
build = esper_gate.BUILD_INFO.get("build")
print("imported from", where, "build", build, "archs", esper_gate.BUILD_INFO.get("cuda_archs"))
sys.exit(0 if build == "cuda" else f"esper_gate from {where} is a {build} build, expected cuda")
EOF
}
export -f build check_build
export ARCH=${ARCH:-}
BUILD_OK=1
if [ "$GPU" = 1 ]; then
  if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    skip build "GPU_CHECK_SKIP_BUILD=1: using the build that is there"
  else
    step build 180 build || BUILD_OK=0
  fi
  step info 60 check_build || BUILD_OK=0
else
  skip build "no GPU: kept the existing build"
  step info 60 "$PY" -m esper_gate info || BUILD_OK=0
fi

# ---- 4. CUDA tests -------------------------------------------------------------
cuda_tests() {
  "$PY" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" || return 1
  # A CUDA test that skips (no GPU, a CPU-only build) checked nothing: count it as a failure.
  "$PY" - "$OUT/test_cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"CUDA tests: {tests} collected, {skipped} skipped")
sys.exit(1 if skipped or not tests else 0)
EOF
}
export -f cuda_tests
if [ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ]; then
  step test_cuda 120 cuda_tests
elif [ "$GPU" = 1 ]; then
  record test_cuda FAIL 0 "not run: no usable CUDA build"
else
  skip test_cuda "no GPU"
fi

# ---- 4b. the gate's own NCCL communicator ---------------------------------------------
if [ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ]; then
  step nccl_lib 60 "$PY" -m pytest tests/test_nccl_lib.py tests/test_graph_safety.py -q -rs -p no:cacheprovider
  # One PASS/FAIL line per case, each with its figure, also in owned_nccl.log.
  step owned_nccl 200 "$PY" benchmarks/gpu_owned_check.py --cycles "${GPU_CHECK_NCCL_CYCLES:-100}"
  grep -E '^(PASS|FAIL|SKIPPED) ' "$OUT/owned_nccl.log" | sed 's/^/    /'
else
  skip nccl_lib "no GPU or no CUDA build"
  skip owned_nccl "no GPU or no CUDA build"
  # The script itself still runs: it must say SKIPPED for every case and exit 3.
  owned_dry() { "$PY" benchmarks/gpu_owned_check.py; [ $? -eq 3 ]; }
  export -f owned_dry
  step owned_nccl_dry 60 owned_dry
fi

# ---- 5. benchmark --------------------------------------------------------------
# 90 s for the benchmark and 135 s for steps 6 and 7 after it
if [ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ] && [ $((BUDGET - (SECONDS - START))) -lt 225 ]; then
  skip bench "optional, and less than 225 s of the budget is left (the benchmark and the steps after it)"
elif [ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ]; then
  # NCCL with one rank: NCCL cannot put two ranks on one GPU.
  step bench 90 "$PY" benchmarks/bench_sync.py --backend nccl --budget 3 --out "$OUT/bench"
elif [ "$GPU" = 1 ]; then
  record bench FAIL 0 "not run: no usable CUDA build"
else
  skip bench "no GPU: NCCL rows need one"
  step bench_cpu_quick 90 "$PY" -m esper_gate bench --preset quick --budget 1 --out "$OUT/bench"
fi

# ---- 6. torch.compile of the sync op on CUDA + NCCL ---------------------------------
cat > "$OUT/compile_sync_nccl.py" <<'EOF'
# torch.compile(fullgraph=True) of torch.ops.esper_gate.sync on CUDA tensors, NCCL, one rank.
import datetime, socket
import torch, torch.distributed as dist
import esper_gate

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
name = dist.group.WORLD.group_name

def gate(votes, stages, targets):
    decision, report = torch.ops.esper_gate.sync(votes, stages, targets, 3, 17, "unanimous", name)
    return decision & (stages >= 0), report

dev = torch.device("cuda", 0)
votes = torch.tensor([True, False, True, True], device=dev)
stages = torch.tensor([3, 3, 4, 6], device=dev)
targets = torch.tensor([2, 2, 3, 5], device=dev)
got = torch.compile(gate, fullgraph=True)(votes, stages, targets)
want = gate(votes, stages, targets)
torch.testing.assert_close(got[0], want[0])
torch.testing.assert_close(got[1], want[1])
assert got[0].is_cuda and got[0].tolist() == [True, False, True, True], got[0]
dist.destroy_process_group()
print("torch.compile(fullgraph=True) of esper_gate.sync on CUDA/NCCL matches eager:", got[0].tolist())
EOF
if [ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ]; then
  step compile_sync_nccl 60 "$PY" "$OUT/compile_sync_nccl.py"
else
  skip compile_sync_nccl "no GPU or no CUDA build"
fi

# ---- 7. CPU subset ---------------------------------------------------------------
step cpu_tests 60 "$PY" -m pytest tests/test_ops.py tests/test_wire.py -q -p no:cacheprovider

# ---- 8. the gloo sweep on this machine's CPUs (last: the least important) ------------
if [ "$GPU" = 1 ] && [ $((BUDGET - (SECONDS - START))) -lt 100 ]; then
  skip bench_cpu "optional, and less than 100 s of the budget is left"
elif [ "$GPU" = 1 ]; then
  step bench_cpu 120 "$PY" benchmarks/bench_sync.py --backend gloo --worlds 2 4 --budget 2 --out "$OUT/bench_cpu"
fi

# ---- summary ---------------------------------------------------------------------
{
  echo "esper_gate GPU check, $(date -Is), ${GPU_NAME:-no GPU}, $((SECONDS - START))s"
  printf '%s\n' "${RESULTS[@]}"
} > "$OUT/summary.txt"
echo
echo "==== summary ($((SECONDS - START))s, logs in $OUT) ===="
printf '%s\n' "${RESULTS[@]}"
for md in "$OUT/bench/bench.md" "$OUT/bench_cpu/bench.md"; do
  [ -f "$md" ] || continue
  echo "---- benchmark targets ($md) ----"
  awk '/^## Targets/ {t = 1; next} t && /^```/ {n++; if (n == 2) exit; next} t && n == 1' "$md"
done
if printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'; then
  echo "RESULT: FAIL"
  exit 1
fi
if [ "$GPU" = 0 ]; then
  echo "RESULT: SKIPPED (no GPU visible to torch: the CUDA build, CUDA tests, NCCL benchmark and compile check did not run)"
  exit 3
fi
echo "RESULT: PASS"
exit 0
