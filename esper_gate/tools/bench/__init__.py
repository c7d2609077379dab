"""Side-by-side microbenchmark: one fused esper_gate sync against Esper's per-slot designs.

    python -m esper_gate bench              quick: gloo W=2, S in {1, 16, 64} (~20 s)
    python benchmarks/bench_sync.py         full: S in {1..256}, W in {2, 4}, NCCL too with a GPU

``measure`` times the designs on spawned ranks, ``targets`` checks the
medians against the targets (reported as PASS/MISS, never asserted),
``render`` writes the markdown and the plot, and ``cli`` ties them together.
"""
from .cli import PRESETS, main, parse_args
from .measure import DESIGNS, LABELS, SHORT, local_costs, run_sweep
from .render import render_markdown, render_plot
from .targets import evaluate_targets, target_lines

__all__ = ["main", "parse_args", "PRESETS", "DESIGNS", "LABELS", "SHORT", "local_costs", "run_sweep",
           "evaluate_targets", "target_lines", "render_markdown", "render_plot"]
