#!/usr/bin/env bash
# Mutation testing of the pure-logic modules with mutmut 3 ([tool.mutmut] in
# pyproject.toml), one module at a time, against the fast in-process tests;
# then the score per module (scripts/mutation_score.py, which leaves out the
# equivalent mutants of scripts/mutation-equivalent.txt).
#
#   bash scripts/mutation.sh                  every module, then the scores
#   bash scripts/mutation.sh _verdict report  these modules only
#   bash scripts/mutation.sh --score [--survivors]   only print the last results
#
# Knobs: MUTATION_JOBS (parallel mutants, default 2), MUTATION_NICE (default 10),
# MUTATION_MIN (exit 1 when a module but _failure scores below this percentage).
# Results and logs stay in mutants/ (git-ignored); `.venv/bin/mutmut show <name>`
# prints a mutant, `.venv/bin/mutmut browse` walks them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ESPER_GATE_VENV:-.venv}
JOBS=${MUTATION_JOBS:-2}
NICE=${MUTATION_NICE:-10}
ALL=(_verdict _failure _diagnosis _watcher _latch _inputs consensus report kasmina)

score_args=()
[ -n "${MUTATION_MIN:-}" ] && score_args+=(--min "$MUTATION_MIN")
if [ "${1:-}" = "--score" ]; then
  shift
  exec "$VENV/bin/python" scripts/mutation_score.py "${score_args[@]}" "$@"
fi

# The tests import the built extension from the copy in mutants/.
if ! "$VENV/bin/python" -c "import esper_gate" >/dev/null 2>&1; then
  bash scripts/run.sh setup
fi
if ! "$VENV/bin/python" -c "import mutmut" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check 'mutmut>=3,<4'
fi
mods=("$@")
[ ${#mods[@]} -eq 0 ] && mods=("${ALL[@]}")

# mutmut copies the package into mutants/ once and keeps non-Python files it
# finds there: bring a rebuilt extension along.
if [ -d mutants/esper_gate ]; then
  cp -p esper_gate/_C*.so mutants/esper_gate/
fi

t_all=$SECONDS
for mod in "${mods[@]}"; do
  t0=$SECONDS
  log="mutants/run-$mod.log"
  mkdir -p mutants
  echo "[mutation.sh] esper_gate.$mod ..." >&2
  # mutmut exits 0 when the mutants ran, whatever survived; a failing clean run stops here.
  if ! nice -n "$NICE" "$VENV/bin/mutmut" run --max-children "$JOBS" "esper_gate.$mod.*" > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[mutation.sh] mutmut failed on esper_gate.$mod (log: $log)" >&2
    exit 1
  fi
  echo "[mutation.sh] esper_gate.$mod took $((SECONDS - t0)) s" >&2
done
echo "[mutation.sh] all took $((SECONDS - t_all)) s" >&2
"$VENV/bin/python" scripts/mutation_score.py "${score_args[@]}" "${mods[@]}"
