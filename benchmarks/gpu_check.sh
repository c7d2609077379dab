#!/usr/bin/env bash
# One-command GPU check for esper_gate: what a CPU-only machine cannot test (the CUDA build and
# kernels, NCCL, CUDA graphs, torch.compile) in one bounded run on a lent GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# On a machine with an NVIDIA GPU and this repository checked out, it runs,
# the most important first (every file under OUT_DIR):
#
#   1. the machine (nvidia-smi, torch, nvcc)                             env.log
#   2. the build, in place, for the local GPU's arch only                build.log
#      (ESPER_GATE_FORCE_CUDA=1, ESPER_GATE_CUDA_ARCHS=<capability>, MAX_JOBS=nproc)
#   3. the build info says "cuda"                                        info.log
#      which NCCL: the loaded libnccl's path and version,                nccl.log
#        torch.cuda.nccl.version(), `pip show nvidia-nccl-cu13`, and
#        whether the gate would use it (_nccl.library_info(): usable,
#        why, differs); the first lines of summary.txt
#   4. in the background while step 5 runs (other processes, one GPU):
#      c10d_fallback: TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=10, the gate's    c10d_fallback.log
#        c10d NCCL group aborted: no exception_dump key in the job's
#        store and no SIGABRT for 10 + 20 s (gpu_gate_check.py)
#      compile_sync_nccl: torch.compile(fullgraph=True) of a function    compile_sync_nccl.log
#        that calls the sync op, CUDA + NCCL, one rank
#      gate_owned: OwnedTransport (world 1, the real NcclComm) end to    gate_owned.log
#        end: decisions, the mapped DONE word, invalidate(); GateSync
#        on the owned path; no host sync (set_sync_debug_mode("error"))
#        around the raw op, OwnedTransport.sync, GateSync's call and
#        `decisions` (gpu_gate_check.py)
#      nccl_lib: tests/test_nccl_lib.py, tests/test_graph_safety.py      nccl_lib.log
#      test_cuda_ranks: the CUDA tests that spawn 2-4 ranks              test_cuda_ranks.{log,xml}
#   5. every other CUDA test (tests/test_cuda.py; a skipped test FAILS) test_cuda.log, test_cuda.xml
#   6. world2: a world of two on the one GPU, the GPU to itself          world2.log
#      (gpu_world2_check.py: two processes, each its own NCCL_HOSTID, so
#      NCCL connects them over its socket transport): the owned gate's
#      all_reduce (ncclInProgress seen, host us per call, the sum);
#      no host sync under set_sync_debug_mode("error"); enqueue time
#      (target <= 30 us); a silent peer with 10 s of torch.cuda._sleep
#      on the caller's stream: named within the timeout + 5 s, the
#      abort's duration, then a new gate works; per S in
#      {1,16,64,256} per-slot MIN+.item(), the bare NCCL floor, the
#      raw op and GateSync with its host read (targets <= 1.3x the
#      floor, >= S/2 x per-slot); a global-mode capture while NCCL's
#      launch thread runs
#   7. owned_nccl: the gate's NCCL communicator alone, with the GPU     owned_nccl.log
#      to itself (gpu_owned_check.py): init that times out then aborts;
#      a stuck all_reduce aborted within 2 s and a new communicator
#      after it; one CUDA context, on the gate's device (two GPUs or
#      more; SKIPPED on one); 100 init/abort cycles: at most one
#      thread and one fd per pending unique id (NCCL's bootstrap
#      root) plus a constant, healthy cycles the constant alone; a
#      user's global-mode capture while a gate call is in flight;
#      capture refused with the clear error (no replay of a stale
#      call number); set_sync_debug_mode("error")
#   8. figures, GPU to itself: host enqueue time of one sync at world  gate_figures.log
#      1 (NCCL launches nothing there; world2 has the real one);
#      pack/decode kernel times up to S=1024, W=64 (goal <= 50 us); what
#      per-slot policies and digests cost (bytes, kernel times, with
#      and without them)
#   9. the benchmark's NCCL rows with one rank, S in {1,4,16,64,256}     bench.log, bench/bench.{md,json,png}
#      (optional: world2 has the world-of-two figures; run when 60 s
#      of the budget are left)
#  10. Esper's run on CUDA tensors: SKIPPED (integrations/esper/check.sh
#      clones esper-lite, which the lent machine cannot reach, and its
#      runner trains on the CPU)
#  11. the scripts' own CPU tests and tests/test_wire.py (optional)      cpu_tests.log
# and prints one PASS/FAIL/SKIPPED/FIGURE line per step and per case (also
# in summary.txt; FIGURE lines are measurements, never a failure).
#
# Every step has a timeout and the whole run a budget (GPU_CHECK_BUDGET_S,
# default 450 s: with the 15 s a timed-out step gets to die, the run ends
# within 8 minutes, so that a rerun fits in 15 minutes of device time).
# Estimated on an H100/H200 with 16 cores (nothing measured yet): env + GPU
# probe ~10 s, build ~60-90 s, info + nccl ~8 s; test_cuda ~50 s while the
# background steps run (c10d_fallback ~50 s, test_cuda_ranks ~50 s,
# compile ~30 s, gate_owned ~30 s, nccl_lib ~20 s): ~60 s; world2 ~70-100 s
# (start ~10, all_reduce ~5, no_host_sync ~3, enqueue ~3, silent_peer ~20,
# figures ~30-50: two processes time-slice the GPU, store_free ~3,
# graph_capture ~5);
# owned_nccl ~60 s; gate_figures ~20 s: ~310-360 s, then bench ~30 s and
# cpu_tests ~20 s when the budget allows. Steps that find less than their
# need left are skipped (FAIL for the checks, SKIPPED for the optional
# ones). Exit status: 0 every step passed; 1 a step failed or timed out; 3
# no GPU is visible to torch: the GPU steps are SKIPPED (the scripts' no-GPU
# paths, their dry runs on the CPU double of NCCL (tests/owned_double.py),
# a CPU test subset and a quick gloo benchmark still run, so the script
# itself can be tried anywhere).
#
# Knobs: PYTHON (default python3), CUDA_HOME (default: the toolkit of the nvcc
# on PATH, else /usr/local/cuda), MAX_JOBS (default nproc), GPU_CHECK_BUDGET_S,
# GPU_CHECK_NCCL_CYCLES (default 100: init/abort cycles of owned_nccl),
# GPU_CHECK_SKIP_BUILD=1 (use the build that is there).
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
BUDGET=${GPU_CHECK_BUDGET_S:-450}
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

# finish NAME RC SECONDS LIMIT: the PASS/FAIL line of a step that ran.
finish() {
  local name=$1 rc=$2 took=$3 limit=$4
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

left() { echo $((BUDGET - (SECONDS - START))); }

# limit_for TIMEOUT_S: the timeout a step gets: TIMEOUT_S, or what is left of
# the budget; fails when less than 15 s is left.
limit_for() {
  local limit=$1 l
  l=$(left)
  [ "$l" -lt 15 ] && return 1
  [ "$limit" -gt "$l" ] && limit=$l
  echo "$limit"
}

# run_bounded LIMIT LOG CMD...: CMD with its output in LOG. timeout(1) runs
# programs, not shell functions: run those in a child bash (they are exported
# below). timeout signals the whole process group, so spawned ranks die with
# their step.
run_bounded() {
  local limit=$1 logf=$2
  shift 2
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$logf" 2>&1
  else
    timeout --kill-after=15 "$limit" "$@" > "$logf" 2>&1
  fi
}

# step NAME TIMEOUT_S CMD...: run CMD with its output in $OUT/NAME.log, bounded
# by TIMEOUT_S and by what is left of the budget.
step() {
  local name=$1 limit t0=$SECONDS rc
  if ! limit=$(limit_for "$2"); then
    record "$name" FAIL 0 "not run: the ${BUDGET}s budget is spent"
    return 1
  fi
  shift 2
  log "== $name (timeout ${limit}s): $*"
  run_bounded "$limit" "$OUT/$name.log" "$@"
  rc=$?
  finish "$name" "$rc" $((SECONDS - t0)) "$limit"
}

# bg_start NAME TIMEOUT_S CMD...: the same in the background; bg_wait NAME
# waits for it (at most its timeout + 15 s) and records its line.
declare -A BG_PID BG_T0 BG_LIMIT
bg_start() {
  local name=$1 limit
  if ! limit=$(limit_for "$2"); then
    record "$name" FAIL 0 "not run: the ${BUDGET}s budget is spent"
    return 1
  fi
  shift 2
  log "== $name (background, timeout ${limit}s): $*"
  rm -f "$OUT/$name.rc"
  ( t0=$SECONDS; run_bounded "$limit" "$OUT/$name.log" "$@"; echo "$? $((SECONDS - t0))" > "$OUT/$name.rc" ) &
  BG_PID[$name]=$!
  BG_T0[$name]=$SECONDS
  BG_LIMIT[$name]=$limit
}
bg_wait() {
  local name=$1 rc took
  [ -n "${BG_PID[$name]:-}" ] || return 1
  wait "${BG_PID[$name]}"
  read -r rc took < "$OUT/$name.rc" 2>/dev/null || { rc=125; took=$((SECONDS - BG_T0[$name])); }
  finish "$name" "$rc" "$took" "${BG_LIMIT[$name]}"
}

# cases SPEC...: the per-case lines of steps' logs (benchmarks/gpu_summary.py) into the summary.
cases() {
  local l
  while IFS= read -r l; do
    RESULTS+=("$l")
    echo "    $l" | tee -a "$OUT/gpu_check.log"
  done < <("$PY" benchmarks/gpu_summary.py "$@")
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

# Which NCCL: "NCCL ..." lines, the first of summary.txt. On a GPU, FAIL when the gate could
# not use it (every owned step would fail for that one reason).
nccl_info() {
  local pip_out pip_nccl
  pip_out=$("$PY" -m pip show nvidia-nccl-cu13 2>&1)
  pip_nccl=$(awk -F': ' '/^(Version|Location): / {printf "%s%s %s", sep, $1, $2; sep="; "}' <<< "$pip_out")
  PIP_NCCL=${pip_nccl:-"no version (not installed, or no pip): $(head -n 1 <<< "$pip_out")"} "$PY" - <<'EOF'
import os, sys
import torch
from esper_gate import _nccl
info = _nccl.library_info()
v = lambda t: ".".join(map(str, t)) if t else "none"
try:
    torch_v = torch.cuda.nccl.version()
except Exception as e:  # noqa: BLE001 - a CPU torch
    torch_v = f"failed: {e}"
copies = f"; {len(info['copies'])} copies mapped: {info['copies']}" if len(info["copies"]) > 1 else ""
print(f"NCCL loaded libnccl: {info['path'] or 'none'} (version {v(info['version'])}{copies})")
print(f"NCCL torch.cuda.nccl.version(): {torch_v} (torch's build-time nccl.h)")
print(f"NCCL pip show nvidia-nccl-cu13: {os.environ['PIP_NCCL']}")
print(f"NCCL the gate would use it: usable {info['usable']}; why: {info['why'] or '-'}; "
      f"differs: {info['differs'] or '-'}")
sys.exit(0 if info["usable"] or os.environ.get("GPU") != "1" else 1)
EOF
}
export GPU
export -f nccl_info
step nccl 60 nccl_info

# ---- 4. in the background: the c10d fallback, compile, the gate end to end, the NCCL library ---------
# cuda_tests NAME -k EXPR: the CUDA tests EXPR selects, with $OUT/NAME.xml.
cuda_tests() {
  local name=$1
  shift
  "$PY" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@" || return 1
  # A CUDA test that skips (no GPU, a CPU-only build) checked nothing: count it as a failure.
  "$PY" - "$OUT/$name.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"CUDA tests: {tests} collected, {skipped} skipped")
sys.exit(1 if skipped or not tests else 0)
EOF
}

cat > "$OUT/compile_sync_nccl.py" <<'EOF'
# torch.compile(fullgraph=True) of a function that calls torch.ops.esper_gate.sync, CUDA tensors, NCCL, one rank.
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
# A fresh inductor cache: the on-disk cache does not key on a custom op's output sizes.
compile_sync() { TORCHINDUCTOR_CACHE_DIR="$OUT/inductor_cache" "$PY" "$OUT/compile_sync_nccl.py"; }
# dry SCRIPT: a GPU script's no-GPU path: SKIPPED for every case, exit 3.
dry() { "$PY" "$@"; [ $? -eq 3 ]; }
export -f cuda_tests compile_sync dry

RANK_TESTS="gloo_with_cuda_tensors or two_ranks_on_one_gpu"
GPU_OK=0
[ "$GPU" = 1 ] && [ "$BUILD_OK" = 1 ] && GPU_OK=1
not_run() {  # NAME: FAIL on a GPU machine (the build failed), SKIPPED without a GPU
  if [ "$GPU" = 1 ]; then record "$1" FAIL 0 "not run: no usable CUDA build"; else skip "$1" "no GPU"; fi
}
if [ "$GPU_OK" = 1 ]; then
  # Each in processes of its own on the one GPU while the CUDA tests run: none of them
  # measures a time or device-wide memory (those run later, with the GPU to themselves).
  bg_start c10d_fallback 100 "$PY" benchmarks/gpu_gate_check.py --only c10d_fallback
  bg_start compile_sync_nccl 120 compile_sync
  bg_start gate_owned 120 "$PY" benchmarks/gpu_gate_check.py --only owned_transport gate_sync_owned no_host_sync
  bg_start nccl_lib 90 "$PY" -m pytest tests/test_nccl_lib.py tests/test_graph_safety.py -q -rs -p no:cacheprovider
  # The CUDA tests that spawn 2-4 ranks (through gloo), apart from the others, to halve the wall time.
  bg_start test_cuda_ranks 150 cuda_tests test_cuda_ranks -k "$RANK_TESTS"
else
  for s in c10d_fallback compile_sync_nccl gate_owned nccl_lib test_cuda_ranks; do not_run "$s"; done
  step gate_check_dry 60 dry benchmarks/gpu_gate_check.py
  cases "cases:gate:$OUT/gate_check_dry.log"
fi

# ---- 5. CUDA tests ----------------------------------------------------------------------
if [ "$GPU_OK" = 1 ]; then
  step test_cuda 150 cuda_tests test_cuda -k "not ($RANK_TESTS)"
  grep -E '^CUDA tests: ' "$OUT/test_cuda.log" | sed 's/^/    /'
  bg_wait test_cuda_ranks
  grep -E '^CUDA tests: ' "$OUT/test_cuda_ranks.log" | sed 's/^/    /'
  bg_wait c10d_fallback
  cases "cases:c10d:$OUT/c10d_fallback.log"
  bg_wait compile_sync_nccl
  bg_wait gate_owned
  cases "cases:gate:$OUT/gate_owned.log"
  bg_wait nccl_lib
else
  not_run test_cuda
fi

# ---- 6. a world of two on the one GPU: NCCL's real path, the GPU to itself ------------------
# Without a GPU, its dry run: the same cases on the CPU double of NCCL (those that need CUDA SKIPPED).
if [ "$GPU_OK" = 1 ]; then
  step world2 180 "$PY" benchmarks/gpu_world2_check.py --timeout 160
  cases "cases:world2:$OUT/world2.log"
else
  not_run world2
  step world2_double 120 "$PY" benchmarks/gpu_world2_check.py --double --figure-budget 1 --timeout 100
  cases "cases:world2:$OUT/world2_double.log"
fi

# ---- 7. the gate's own NCCL communicator, the GPU to itself --------------------------------
if [ "$GPU_OK" = 1 ]; then
  step owned_nccl 150 "$PY" benchmarks/gpu_owned_check.py --cycles "${GPU_CHECK_NCCL_CYCLES:-100}"
  cases "cases:owned:$OUT/owned_nccl.log"
else
  not_run owned_nccl
  step owned_nccl_double 90 "$PY" benchmarks/gpu_owned_check.py --double --cycles "${GPU_CHECK_NCCL_CYCLES:-100}"
  cases "cases:owned:$OUT/owned_nccl_double.log"
fi

# ---- 8. figures, the GPU to itself: enqueue time, pack/decode kernel times ----------------
if [ "$GPU_OK" = 1 ]; then
  step gate_figures 90 "$PY" benchmarks/gpu_gate_check.py --only enqueue kernels wire_growth
  cases "cases:gate:$OUT/gate_figures.log"
else
  not_run gate_figures
fi

# ---- 9. benchmark (optional: skipped when less than 60 s is left) --------------------------
if [ "$GPU_OK" = 1 ] && [ "$(left)" -lt 60 ]; then
  skip bench "optional (world2 has the world-of-two figures), and only $(left)s of the budget is left (60 s needed)"
elif [ "$GPU_OK" = 1 ]; then
  # NCCL with one rank (the harness puts one rank per GPU; world2 has the world of two): per-slot unanimous with .item(),
  # rank-0 broadcast, bare floor, GateSync, raw op, for S in {1, 4, 16, 64, 256}.
  step bench 60 "$PY" benchmarks/bench_sync.py --backend nccl --preset quick \
    --slots 1 4 16 64 256 --budget 1 --out "$OUT/bench"
  cases "bench:$OUT/bench.log"
else
  not_run bench
  step bench_cpu_quick 90 "$PY" -m esper_gate bench --preset quick --budget 1 --out "$OUT/bench"
  cases "bench:$OUT/bench_cpu_quick.log"
fi

# ---- 10. Esper on CUDA tensors (optional) ----------------------------------------------------
skip esper "optional, not run: integrations/esper/check.sh clones esper-lite (the lent machine has no network), and its runner trains on the CPU (run_heuristic_2rank.py passes device=cpu)"

# ---- 11. CPU subset (optional on a GPU machine: CI runs it) -----------------------------------
if [ "$GPU" = 1 ] && [ "$(left)" -lt 40 ]; then
  skip cpu_tests "optional, and only $(left)s of the budget is left"
else
  # Not the spawned ones (the scripts' dry runs on the double: world2_double and owned_nccl_double
  # ran them above, or the GPU ran the real thing); CI runs every one.
  step cpu_tests 60 "$PY" -m pytest tests/test_wire.py tests/test_gpu_scripts.py -q \
    -p no:cacheprovider -m "not multiprocess and not slow"
fi

# ---- summary ---------------------------------------------------------------------
NCCL_LINES=$(grep -E '^NCCL ' "$OUT/nccl.log" 2>/dev/null || echo "NCCL: no information (the nccl step printed none: $OUT/nccl.log)")
{
  echo "$NCCL_LINES"
  echo "esper_gate GPU check, $(date -Is), ${GPU_NAME:-no GPU}, $((SECONDS - START))s"
  printf '%s\n' "${RESULTS[@]}"
} > "$OUT/summary.txt"
echo
echo "==== summary ($((SECONDS - START))s, logs in $OUT) ===="
echo "$NCCL_LINES"
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
