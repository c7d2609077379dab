"""The full side-by-side gate-sync benchmark: esper_gate against Esper's per-slot designs.

    python benchmarks/bench_sync.py                  S in {1,4,16,64,256}, gloo W in {2,4}, NCCL with a GPU
    python benchmarks/bench_sync.py --out results/x  another results folder
    python benchmarks/bench_sync.py --help           every option (the same as python -m esper_gate bench)

Writes bench.md (tables + PASS/MISS summary), bench.json and bench.png (latency
against S, log-log) to the results folder (default results/). The harness is
esper_gate.tools.bench; `python -m esper_gate bench` runs its quick preset.
"""
import os
import sys

# Run from a source checkout without installing (an in-place build is enough).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from esper_gate.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], preset_default="full"))
