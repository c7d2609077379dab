#!/usr/bin/env bash
# Apply the epoch-round patch to a fresh esper-lite at 2016337e and run the checks:
# Esper's kasmina and simic/training tests, then run_heuristic_episode on two gloo ranks.
#
#   integrations/esper/check.sh [ESPER_GIT] [WORKDIR]
#
# ESPER_GIT: a clone URL or a local git dir of esper-lite (default: GitHub).
# WORKDIR:   where the fresh copy goes (default: a new temp dir; kept for reading).
# PYTHON:    an interpreter with torch, torchvision, esper_gate and Esper's test
#            dependencies (README.md says how the recorded runs built one).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ESPER_GIT="${1:-https://github.com/tachyon-beep/esper-lite.git}"
WORK="${2:-$(mktemp -d)}"
PY="${PYTHON:-python}"
BASE=2016337e
COPY="$WORK/esper-lite"

"$PY" -c 'import torch, torchvision, esper_gate; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, esper_gate at {esper_gate.__file__}")'

if [ -e "$COPY" ]; then
  echo "check.sh: $COPY exists; give an empty WORKDIR" >&2
  exit 2
fi
git clone -q "$ESPER_GIT" "$COPY"
git -C "$COPY" checkout -q "$BASE"
for p in "$HERE"/patches/*.patch; do
  git -C "$COPY" apply --check "$p"
  git -C "$COPY" apply "$p"
  echo "applied $(basename "$p")"
done

cd "$COPY"
# pytest.ini puts src/ on sys.path; its addopts deselect the slow lanes, restated here
# so that the run does not depend on pytest-asyncio's settings or a cache dir.
start=$(date +%s)
"$PY" -m pytest tests/kasmina tests/simic/training -q -o addopts="" \
  -m "not integration and not stress and not property and not slow" \
  -p no:cacheprovider --import-mode=importlib
echo "esper tests: $(( $(date +%s) - start )) s"

start=$(date +%s)
"$PY" "$HERE/run_heuristic_2rank.py" --esper "$COPY" --epochs 9 --prune-epoch 3
echo "two-rank episode: $(( $(date +%s) - start )) s"
