"""The benchmark's command line: ``python -m esper_gate bench`` (quick preset) and
``python benchmarks/bench_sync.py`` (full preset) both end here.

Writes bench.md (tables + PASS/MISS summary), bench.json and bench.png to the
results folder.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

from ... import wire
from .measure import DESIGNS, local_costs, run_sweep
from .render import render_markdown, render_plot
from .targets import evaluate_targets, target_lines

PRESETS = {
    # python -m esper_gate bench: about 20 s on a 2-core machine
    "quick": {"slots": [1, 16, 64], "worlds": [2], "budget": 1.5, "warmup": 2, "min_reps": 5,
              "max_reps": 40, "overhead_pairs": 20},
    # benchmarks/bench_sync.py: a few minutes on a 2-core machine
    "full": {"slots": [1, 4, 16, 64, 256], "worlds": [2, 4], "budget": 8.0, "warmup": 3, "min_reps": 7,
             "max_reps": 150, "overhead_pairs": 300},
}



def _machine() -> tuple[str, int]:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpus} CPU cores" + (f" ({model})" if model else "")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return text, cpus


def _prog(preset_default: str) -> str:
    return "python -m esper_gate bench" if preset_default == "quick" else "python benchmarks/bench_sync.py"


def parse_args(argv, preset_default: str = "quick") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=_prog(preset_default),
        description="Side-by-side gate-sync benchmark: per-slot unanimous, per-slot rank-0 broadcast, "
                    "a bare all_reduce of the same size, esper_gate (GateSync) and the raw op. Writes "
                    "bench.md, bench.json and bench.png to --out.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset_default,
                   help="quick: gloo W=2, S in 1,16,64; full: S in 1..256, W in 2,4 (default %(default)s)")
    p.add_argument("--slots", type=int, nargs="+", help="slot counts S to sweep")
    p.add_argument("--worlds", type=int, nargs="+", help="gloo world sizes")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl", "all"], default="auto",
                   help="auto: gloo, plus NCCL when a GPU is visible (default); all: both, fail without a GPU")
    p.add_argument("--budget", type=float, help="seconds of measurement per (world, S) cell")
    p.add_argument("--warmup", type=int, help="warm-up rounds per design")
    p.add_argument("--min-reps", type=int, help="fewest samples per design")
    p.add_argument("--max-reps", type=int, help="most samples per design")
    p.add_argument("--block-ms", type=float, default=4.0,
                   help="target length of one timed block; fast designs repeat rounds inside it (default 4)")
    p.add_argument("--timeout", type=float, default=None, help="deadline per (backend, world), seconds")
    p.add_argument("--out", default="results", help="results folder (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-local", action="store_true", help="skip the one-process pack/decode costs")
    p.add_argument("--overhead-pairs", type=int,
                   help="back-to-back GateSync / raw op block pairs per S for the bookkeeping bound")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(s < 1 or s > wire.MAX_SLOTS for s in args.slots):
        p.error(f"slots must be in 1..{wire.MAX_SLOTS}")
    if any(w < 2 for w in args.worlds):
        p.error("gloo world sizes must be >= 2 (NCCL runs with the GPUs there are)")
    return args


def main(argv=None, preset_default: str = "quick") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, preset_default)
    machine, cpus = _machine()
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    notes = []
    cells: list[tuple[str, int]] = []
    if args.backend in ("auto", "gloo", "all"):
        cells += [("gloo", w) for w in args.worlds]
    if args.backend in ("auto", "nccl", "all"):
        import esper_gate

        why_not = ("no GPU visible" if ngpu == 0 else
                   "esper_gate was built without CUDA kernels" if esper_gate.BUILD_INFO.get("build") != "cuda"
                   else None)
        if why_not is not None:
            if args.backend in ("nccl", "all"):  # NCCL rows were asked for explicitly
                print(f"[bench] error: --backend {args.backend} but {why_not}", file=sys.stderr)
                return 2
            notes.append(f"{why_not}: NCCL rows skipped")
            print(f"[bench] {why_not}: NCCL rows skipped")
        else:
            nccl_worlds = [w for w in args.worlds if w <= ngpu] or [1]
            cells += [("nccl", w) for w in nccl_worlds]
            if nccl_worlds == [1]:
                notes.append(f"{ngpu} GPU(s): NCCL cannot put two ranks on one GPU, so NCCL runs with one rank")
    if any(b == "gloo" and w > cpus for b, w in cells):
        notes.append(f"gloo with more ranks than the {cpus} CPU cores oversubscribes them: those rows are indicative")

    cfg = {"slots": sorted(set(args.slots)), "designs": DESIGNS, "budget": args.budget, "warmup": args.warmup,
           "min_reps": args.min_reps, "max_reps": args.max_reps, "block_s": args.block_ms / 1000.0,
           "max_inner": 50, "pg_timeout_s": 60.0, "enqueue_calls": 200, "timeout": args.timeout,
           "overhead_pairs": args.overhead_pairs}
    t0 = time.monotonic()
    rows, errors = run_sweep(cells, cfg)
    local = []
    if not args.no_local:
        local = local_costs(cfg["slots"])
        if any(b == "nccl" for b, _ in cells):
            local += local_costs(cfg["slots"], device="cuda")
    import esper_gate

    result = {
        "meta": {"command": " ".join([_prog(preset_default)] + [shlex.quote(a) for a in argv]),
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "machine": machine, "cpu_count": cpus, "gpus": ngpu,
                 "gpu_model": torch.cuda.get_device_name(0) if ngpu else None,
                 "python": platform.python_version(), "torch": torch.__version__,
                 "esper_gate_build": esper_gate.BUILD_INFO.get("build"), "preset": args.preset,
                 "slots": cfg["slots"], "cells": [list(c) for c in cells], "budget_s": args.budget,
                 "warmup": args.warmup, "min_reps": args.min_reps, "max_reps": args.max_reps,
                 "block_ms": args.block_ms, "elapsed_s": None,
                 "buffer_words": {f"{b}/W={w}": {str(s): wire.buffer_words(s, w) for s in cfg["slots"]}
                                  for b, w in cells}},
        "rows": rows, "local": local, "targets": [], "notes": notes, "errors": errors,
    }
    result["targets"] = evaluate_targets(rows)
    result["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)

    os.makedirs(args.out, exist_ok=True)
    md_path, json_path, png_path = (os.path.join(args.out, f"bench.{e}") for e in ("md", "json", "png"))
    plot_note = "--no-plot given: no plot" if args.no_plot else render_plot(result, png_path)
    if plot_note:
        notes.append(plot_note)
        print(f"[bench] {plot_note}")
    md = render_markdown(result)
    with open(md_path, "w") as f:
        f.write(md)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(md)
    print("[bench] summary (targets are reported, never asserted):")
    for line in target_lines(result["targets"]):
        print("  " + line)
    print(f"[bench] wrote {md_path}, {json_path}" + ("" if plot_note else f", {png_path}")
          + f" in {result['meta']['elapsed_s']} s")
    if errors:
        print(f"[bench] {len(errors)} cell(s) failed: " + "; ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

