"""Side-by-side microbenchmark: one fused esper_gate sync against Esper's old designs.

    python -m esper_gate bench              quick: gloo W=2, S in {1, 16, 64} (~20 s)
    python benchmarks/bench_sync.py         full: S in {1..256}, W in {2, 4}, NCCL too with a GPU

Five ways to agree on the gate decisions of S slots, measured in the same
ranks, on the same process group (the dedicated group GateSync builds), with
the designs interleaved round-robin inside every repetition so machine drift
hits all of them alike:

    per_slot_unanimous        per slot: fill a 1-element int tensor, all_reduce(MIN), .item()
    per_slot_rank0_broadcast  per slot: broadcast_object_list of rank 0's result dict
    bare_floor                one all_reduce of a buffer as large as esper_gate's, nothing else
    esper_gate                GateSync(votes, stages, targets).host_decisions()
    raw_op                    esper_gate.sync(...) on GateSync's group + the same host read

One *round* is one agreement on all S slots (S collectives for the per-slot
designs). A sample is one barrier-delimited block of n rounds: the slowest
rank's block time divided by n. We report the median and interquartile range
of the samples, in microseconds per round. The targets of the issue are
checked and printed as PASS/MISS with the measured ratio; nothing here
asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable

import torch

from . import _spawn, wire

__all__ = ["main", "spawn_ranks", "run_sweep", "evaluate_targets", "DESIGNS"]

DESIGNS = ("per_slot_unanimous", "per_slot_rank0_broadcast", "bare_floor", "esper_gate", "raw_op")
LABELS = {
    "per_slot_unanimous": "per-slot unanimous (all_reduce MIN + .item() per slot)",
    "per_slot_rank0_broadcast": "per-slot rank-0 broadcast (broadcast_object_list per slot)",
    "bare_floor": "bare floor (one all_reduce of the packed-buffer size)",
    "esper_gate": "esper_gate (GateSync + host read of decisions)",
    "raw_op": "raw op (esper_gate.sync on the same group + host read)",
}
SHORT = {
    "per_slot_unanimous": "per-slot unanimous",
    "per_slot_rank0_broadcast": "per-slot rank-0 broadcast",
    "bare_floor": "bare floor",
    "esper_gate": "esper_gate",
    "raw_op": "raw op",
}
STYLE = {  # matplotlib: color, marker, linestyle
    "per_slot_unanimous": ("tab:red", "o", "-"),
    "per_slot_rank0_broadcast": ("tab:orange", "s", "-"),
    "bare_floor": ("tab:gray", "^", "--"),
    "esper_gate": ("tab:blue", "D", "-"),
    "raw_op": ("tab:cyan", ".", ":"),
}

PRESETS = {
    # python -m esper_gate bench: about 20 s on a 2-core machine
    "quick": {"slots": [1, 16, 64], "worlds": [2], "budget": 1.5, "warmup": 2, "min_reps": 5,
              "max_reps": 40, "overhead_pairs": 20},
    # benchmarks/bench_sync.py: a few minutes on a 2-core machine
    "full": {"slots": [1, 4, 16, 64, 256], "worlds": [2, 4], "budget": 8.0, "warmup": 3, "min_reps": 7,
             "max_reps": 150, "overhead_pairs": 300},
}

# Targets of issue 5 (and the bookkeeping bound of issue 3).
FLOOR_MAX = 1.3
UNANIMOUS_MIN = {64: 10.0, 256: 40.0}
BROADCAST_MIN = {64: 20.0}
FLAT_MAX = 1.5
OVERHEAD_MAX = 0.10


# ---- ranks -------------------------------------------------------------------

def spawn_ranks(fn: Callable, world: int, *args, backend: str = "gloo", timeout: float = 300.0,
                pg_timeout_s: float = 60.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return their values.

    Raises TimeoutError when a rank has not reported by ``timeout`` (a hang),
    RuntimeError with the rank's traceback when one failed.
    """
    return _spawn.values(_spawn.spawn_ranks(fn, world, *args, backend=backend, timeout=timeout,
                                            pg_timeout_s=pg_timeout_s))


# ---- one rank's measurements ---------------------------------------------------

def _make_designs(rank: int, world: int, num_slots: int, gs, group, device: torch.device):
    """The five ways to agree on ``num_slots`` gate decisions, one round each."""
    import torch.distributed as dist

    import esper_gate

    vote_list = [i % 3 != 0 for i in range(num_slots)]
    votes = torch.tensor(vote_list, dtype=torch.bool, device=device)
    stages = torch.full((num_slots,), 3, dtype=torch.int64, device=device)   # TRAINING
    targets = torch.full((num_slots,), 4, dtype=torch.int64, device=device)  # to BLENDING (G2)
    one = torch.zeros(1, dtype=torch.int32, device=device)
    floor_buf = torch.zeros(wire.buffer_words(num_slots, world), dtype=torch.int64, device=device)
    payloads = [{"gate": 2, "passed": v, "score": 0.5 + 1e-3 * i, "checks_passed": ["improvement", "stability"],
                 "checks_failed": [] if v else ["gradient_health"], "message": f"G2 slot {i}",
                 "timestamp": 1.7e9 + i} for i, v in enumerate(vote_list)]
    bcast_device = device if device.type == "cuda" else None
    is_cuda = device.type == "cuda"
    group_name = group.group_name
    seq = [0]

    def per_slot_unanimous():
        out = []
        for v in vote_list:
            one.fill_(int(v))
            dist.all_reduce(one, op=dist.ReduceOp.MIN, group=group)
            out.append(bool(one.item()))
        return out

    def per_slot_rank0_broadcast():
        out = []
        for p in payloads:
            obj = [p if rank == 0 else None]
            dist.broadcast_object_list(obj, src=0, group=group, device=bcast_device)
            out.append(bool(obj[0]["passed"]))
        return out

    def bare_floor():
        dist.all_reduce(floor_buf, op=dist.ReduceOp.SUM, group=group)
        if is_cuda:
            torch.cuda.synchronize()
        return None

    def esper():
        return gs(votes, stages, targets).host_decisions()

    def raw_op():
        seq[0] += 1
        decisions, _report = esper_gate.sync(votes, stages, targets, seq[0], gs.site, "unanimous", group_name)
        return [bool(x) for x in decisions.tolist()]

    fns = {"per_slot_unanimous": per_slot_unanimous, "per_slot_rank0_broadcast": per_slot_rank0_broadcast,
           "bare_floor": bare_floor, "esper_gate": esper, "raw_op": raw_op}
    return fns, vote_list, (votes, stages, targets)


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _enqueue_times(inputs, site: int, group_name: str, n: int) -> dict:
    """Host time from calling the op to its return, GPU not waited for (sync outside the timing)."""
    votes, stages, targets = inputs
    op = torch.ops.esper_gate.sync.default
    times = []
    torch.cuda.synchronize()
    for i in range(n):
        t0 = time.perf_counter()
        op(votes, stages, targets, 10_000_000 + i, site, "unanimous", group_name, 0)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((t1 - t0) * 1e6)
    q1, med, q3 = _quartiles(times)
    return {"median_us": med, "p25_us": q1, "p75_us": q3, "min_us": min(times), "calls": n}


def _bench_rank(rank: int, world: int, cfg: dict) -> dict | None:
    """Measure every design for every S on this rank; rank 0 returns the results."""
    import torch.distributed as dist

    import esper_gate

    backend = cfg["backend"]
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    ctrl = dist.new_group(backend="gloo")  # barriers, calibration and gathering; never timed
    designs = list(cfg["designs"])
    cells = []
    for num_slots in cfg["slots"]:
        gs = esper_gate.GateSync(num_slots, timeout=datetime.timedelta(seconds=cfg["pg_timeout_s"]),
                                 device=device)
        # In a world of one GateSync decides locally and builds no group; the
        # collective designs then use the world group.
        group = gs.group if gs.distributed else dist.group.WORLD
        fns, vote_list, inputs = _make_designs(rank, world, num_slots, gs, group, device)

        # warm-up, a correctness check, and the per-design round time for calibration
        warm: dict[str, float] = {}
        for name in designs:
            best = float("inf")
            for _ in range(max(1, cfg["warmup"])):
                t0 = time.perf_counter()
                got = fns[name]()
                best = min(best, time.perf_counter() - t0)
                if got is not None and got != vote_list:
                    raise AssertionError(f"{name} decided {got[:8]}..., expected {vote_list[:8]}...")
            warm[name] = best
        plan = [None]
        if rank == 0:
            inner = {n: max(1, min(cfg["max_inner"], round(cfg["block_s"] / max(warm[n], 1e-7))))
                     for n in designs}
            per_rep = sum(inner[n] * warm[n] for n in designs)
            reps = int(min(cfg["max_reps"], max(cfg["min_reps"], cfg["budget"] // max(per_rep, 1e-6))))
            plan = [(inner, reps)]
        dist.broadcast_object_list(plan, src=0, group=ctrl)
        inner, reps = plan[0]

        samples: dict[str, list[float]] = {n: [] for n in designs}
        for rep in range(reps):
            k = rep % len(designs)
            for name in designs[k:] + designs[:k]:
                fn, n = fns[name], inner[name]
                dist.barrier(group=ctrl)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
        # The bookkeeping bound compares GateSync with the raw op on the same
        # group; the effect is a few microseconds under a noisy all_reduce, so
        # it gets its own long run of back-to-back pairs, order alternating.
        if "esper_gate" in designs and "raw_op" in designs:
            for key in ("pair:esper_gate", "pair:raw_op"):
                samples[key] = []
            # the same number of rounds per block for both, so the barrier's
            # exit skew is amortized alike
            n_pair = max(inner["esper_gate"], inner["raw_op"])
            for rep in range(cfg.get("overhead_pairs", 0)):
                order = ("esper_gate", "raw_op") if rep % 2 == 0 else ("raw_op", "esper_gate")
                for name in order:
                    fn, n = fns[name], n_pair
                    dist.barrier(group=ctrl)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    samples["pair:" + name].append((time.perf_counter() - t0) / n)
        enqueue = None
        if device.type == "cuda":
            enqueue = _enqueue_times(inputs, gs.site, group.group_name, cfg["enqueue_calls"])
        everyone = [None] * world
        dist.all_gather_object(everyone, samples, group=ctrl)
        gs.close()
        if rank != 0:
            continue
        blocks = {name: [max(r[name][i] for r in everyone) * 1e6 for i in range(reps)] for name in designs}
        # GateSync and the raw op run back to back in every repetition, so the
        # median of their per-repetition ratio cancels the machine's drift,
        # which the difference of two medians does not.
        paired = None
        pairs = len(everyone[0].get("pair:esper_gate", []))
        if pairs:
            gs_blocks = [max(r["pair:esper_gate"][i] for r in everyone) for i in range(pairs)]
            raw_blocks = [max(r["pair:raw_op"][i] for r in everyone) for i in range(pairs)]
            paired = statistics.median(e / r for e, r in zip(gs_blocks, raw_blocks) if r > 0) - 1
        elif "esper_gate" in blocks and "raw_op" in blocks:
            paired = statistics.median(e / r for e, r in zip(blocks["esper_gate"], blocks["raw_op"]) if r > 0) - 1
        for name in designs:
            per_block = blocks[name]
            q1, med, q3 = _quartiles(per_block)
            cells.append({"backend": backend, "device": device.type, "world": world, "slots": num_slots,
                          "design": name, "median_us": med, "p25_us": q1, "p75_us": q3, "iqr_us": q3 - q1,
                          "mean_us": statistics.fmean(per_block),
                          "samples": reps, "rounds_per_sample": inner[name],
                          "buffer_words": wire.buffer_words(num_slots, world),
                          "gate_sync_distributed": gs.distributed,
                          **({"paired_overhead_vs_raw": paired} if name == "esper_gate" and paired is not None else {})})
        if enqueue is not None:
            cells.append({"backend": backend, "device": device.type, "world": world, "slots": num_slots,
                          "design": "enqueue", **enqueue})
    return {"rows": cells} if rank == 0 else None


# ---- local (one process, no collective) --------------------------------------

def local_costs(slots: list[int], device: str = "cpu", min_run_time: float = 0.2) -> list[dict]:
    """pack, decode and a GateSync call outside any process group, per S (torch.utils.benchmark)."""
    from torch.utils import benchmark

    import esper_gate

    rows = []
    for num_slots in slots:
        world = 2
        votes = torch.tensor([i % 3 != 0 for i in range(num_slots)], device=device)
        stages = torch.full((num_slots,), 3, dtype=torch.int64, device=device)
        targets = torch.full((num_slots,), 4, dtype=torch.int64, device=device)
        buf = esper_gate.pack(votes, stages, targets, 1, 7, "unanimous", 0, world)
        gs = esper_gate.GateSync(num_slots, device=device)
        env = {"esper_gate": esper_gate, "votes": votes, "stages": stages, "targets": targets, "buf": buf,
               "S": num_slots, "W": world, "gs": gs, "torch": torch}
        sync = "torch.cuda.synchronize()" if device == "cuda" else ""
        stmts = {
            "pack": f"esper_gate.pack(votes, stages, targets, 1, 7, 'unanimous', 0, W); {sync}",
            "decode": f"esper_gate.decode(buf, S, W, 'unanimous'); {sync}",
            "pack_decode_read": "esper_gate.decode(esper_gate.pack(votes, stages, targets, 1, 7, 'unanimous', 0, W),"
                                " S, W, 'unanimous')[0].tolist()",
            "gate_sync_local": "gs(votes, stages, targets).host_decisions()",
        }
        for name, stmt in stmts.items():
            m = benchmark.Timer(stmt=stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=min_run_time)
            rows.append({"slots": num_slots, "what": name, "device": device, "median_us": m.median * 1e6,
                         "iqr_us": m.iqr * 1e6})
    return rows


# ---- sweep, targets, outputs -------------------------------------------------

def run_sweep(backends: list[tuple[str, int]], cfg: dict, log=print) -> tuple[list[dict], list[str]]:
    """Run every (backend, world) cell; return (rows, errors)."""
    rows, errors = [], []
    for backend, world in backends:
        c = dict(cfg, backend=backend)
        deadline = cfg.get("timeout") or (90 + len(c["slots"]) * (3 * c["budget"] + 30))
        t0 = time.monotonic()
        log(f"[bench] {backend} W={world}: S in {c['slots']} (deadline {deadline:.0f} s) ...")
        try:
            vals = spawn_ranks(_bench_rank, world, c, backend=backend, timeout=deadline,
                               pg_timeout_s=c["pg_timeout_s"])
            rows.extend(vals[0]["rows"])
            log(f"[bench] {backend} W={world}: done in {time.monotonic() - t0:.1f} s")
        except Exception as e:  # a failed cell is reported; the others still run
            errors.append(f"{backend} W={world}: {e}")
            log(f"[bench] {backend} W={world}: FAILED: {e}")
    return rows, errors


def _cell(rows, backend, world, slots, design):
    for r in rows:
        if (r["backend"], r["world"], r["slots"], r["design"]) == (backend, world, slots, design):
            return r
    return None


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each PASS, MISS or n/a with the measured ratios."""
    out = []
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS})

    def add(name, status, worst, detail, backend, world, threshold):
        out.append({"name": name, "status": status, "value": worst, "threshold": threshold,
                    "backend": backend, "world": world, "detail": detail})

    def med(b, w, s, d):
        c = _cell(rows, b, w, s, d)
        return c["median_us"] if c else None

    for b, w in configs:
        slots = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w) and r["design"] in DESIGNS})
        where = f"{b}, W={w}"
        local = b == "nccl" and w == 1  # GateSync decides locally in a world of one
        fused = "raw_op" if local else "esper_gate"

        if b == "gloo" and w == 2:
            ratios = {s: med(b, w, s, "esper_gate") / med(b, w, s, "bare_floor") for s in slots
                      if med(b, w, s, "esper_gate") and med(b, w, s, "bare_floor")}
            if ratios:
                worst_s = max(ratios, key=ratios.get)
                add(f"esper_gate <= {FLOOR_MAX}x the bare floor at every S ({where})",
                    "PASS" if ratios[worst_s] <= FLOOR_MAX else "MISS", ratios[worst_s],
                    {str(s): round(v, 3) for s, v in ratios.items()}, b, w, FLOOR_MAX)

        if b == "gloo":
            for design, mins in (("per_slot_unanimous", UNANIMOUS_MIN), ("per_slot_rank0_broadcast", BROADCAST_MIN)):
                for s, need in mins.items():
                    name = f"esper_gate >= {need:g}x faster than {SHORT[design]} at S={s} ({where})"
                    old, new = med(b, w, s, design), med(b, w, s, "esper_gate")
                    if old is None or new is None:
                        add(name, "n/a", None, f"S={s} not measured", b, w, need)
                    else:
                        add(name, "PASS" if old / new >= need else "MISS", old / new, None, b, w, need)
        if b == "nccl":
            ratios = {s: med(b, w, s, "per_slot_unanimous") / med(b, w, s, fused) for s in slots
                      if s >= 4 and med(b, w, s, fused) and med(b, w, s, "per_slot_unanimous")}
            name = (f"{SHORT[fused]} >= S/2 x faster than per-slot unanimous for every S >= 4 ({where}"
                    + (", raw op: GateSync issues no collective in a world of one)" if local else ")"))
            if ratios:
                margin = {s: v / (s / 2) for s, v in ratios.items()}
                worst_s = min(margin, key=margin.get)
                add(name, "PASS" if margin[worst_s] >= 1 else "MISS", ratios[worst_s],
                    {str(s): f"{v:.1f}x (need {s / 2:g}x)" for s, v in ratios.items()}, b, w, "S/2")
            else:
                add(name, "n/a", None, "no S >= 4 measured", b, w, "S/2")

        a, z = med(b, w, 16, fused), med(b, w, 256, fused)
        name = f"{SHORT[fused]} nearly flat in S: S=256 <= {FLAT_MAX}x S=16 ({where})"
        if a and z:
            add(name, "PASS" if z / a <= FLAT_MAX else "MISS", z / a, None, b, w, FLAT_MAX)
        else:
            add(name, "n/a", None, "needs S=16 and S=256", b, w, FLAT_MAX)

        name = (f"GateSync bookkeeping <= {OVERHEAD_MAX:.0%} of the sync (median of back-to-back GateSync / raw op pairs - 1)"
                f" at every S ({where})")
        if local:
            add(name, "n/a", None, "world of one: GateSync issues no collective", b, w, OVERHEAD_MAX)
        else:
            def overhead(s):
                cell = _cell(rows, b, w, s, "esper_gate")
                if cell and cell.get("paired_overhead_vs_raw") is not None:
                    return cell["paired_overhead_vs_raw"]
                if med(b, w, s, "esper_gate") and med(b, w, s, "raw_op"):
                    return med(b, w, s, "esper_gate") / med(b, w, s, "raw_op") - 1
                return None

            over = {s: overhead(s) for s in slots if overhead(s) is not None}
            if over:
                worst_s = max(over, key=over.get)
                add(name, "PASS" if over[worst_s] <= OVERHEAD_MAX else "MISS", over[worst_s],
                    {str(s): f"{v:+.1%}" for s, v in over.items()}, b, w, OVERHEAD_MAX)
    return out


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        if t["value"] is None:
            val = ""
        elif "GateSync bookkeeping" in t["name"]:
            val = f": worst {t['value']:+.1%}"
        else:
            val = f": {'worst ' if isinstance(t['detail'], dict) else ''}{_fmt_ratio(t['value'])}"
        detail = ""
        if isinstance(t["detail"], dict):
            detail = " [" + ", ".join(f"S={k}: {v}" for k, v in t["detail"].items()) + "]"
        elif t["detail"]:
            detail = f" ({t['detail']})"
        lines.append(f"{t['status']:4s}  {t['name']}{val}{detail}")
    return lines


def _config_title(backend: str, world: int) -> str:
    if backend == "gloo":
        return f"gloo (CPU tensors), world size {world}"
    return f"NCCL (CUDA tensors), world size {world}"


def render_markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    out = ["# esper_gate microbenchmark", "",
           f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; machine: {meta['machine']}",
           f"- torch {meta['torch']}, esper_gate build: {meta['esper_gate_build']}; "
           f"budget {meta['budget_s']:g} s per (world, S) cell, warm-up {meta['warmup']} rounds per design",
           "",
           "Latency per gate round (agreement on all S slots), median µs [25th–75th percentile]. One sample "
           "is a barrier-delimited block of consecutive rounds: the slowest rank's block time divided by the "
           "rounds in it; the designs take turns inside every repetition.", ""]
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS},
                     key=lambda c: (c[0] != "gloo", c[1]))
    for b, w in configs:
        slots = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w) and r["design"] in DESIGNS})
        out += [f"## {_config_title(b, w)}", ""]
        if b == "gloo" and w > (meta.get("cpu_count") or w):
            out += [f"W={w} ranks share {meta['cpu_count']} CPU cores (oversubscribed): treat these numbers as "
                    f"indicative.", ""]
        if b == "nccl" and w == 1:
            out += ["In a world of one GateSync decides locally (pack + decode, no collective); the raw op line "
                    "goes through NCCL.", ""]
        out.append("| design | " + " | ".join(f"S={s}" for s in slots) + " |")
        out.append("|---|" + "---:|" * len(slots))
        out.append("| packed buffer (int64 elements) | "
                   + " | ".join(str(wire.buffer_words(s, w)) for s in slots) + " |")
        for d in DESIGNS:
            cells = []
            for s in slots:
                c = _cell(rows, b, w, s, d)
                cells.append("–" if c is None else f"{c['median_us']:,.0f} [{c['p25_us']:,.0f}–{c['p75_us']:,.0f}]")
            out.append(f"| {LABELS[d]} | " + " | ".join(cells) + " |")
        ratio_rows = [("esper_gate / bare floor", "esper_gate", "bare_floor", False),
                      ("per-slot unanimous / esper_gate", "per_slot_unanimous", "esper_gate", False),
                      ("rank-0 broadcast / esper_gate", "per_slot_rank0_broadcast", "esper_gate", False),
                      ("GateSync / raw op - 1", "esper_gate", "raw_op", True)]
        for label, num, den, pct in ratio_rows:
            cells = []
            for s in slots:
                a, z = _cell(rows, b, w, s, num), _cell(rows, b, w, s, den)
                if a is None or z is None:
                    cells.append("–")
                else:
                    r = a["median_us"] / z["median_us"]
                    cells.append(f"{r - 1:+.1%}" if pct else _fmt_ratio(r))
            out.append(f"| *{label}* | " + " | ".join(cells) + " |")
        paired = []
        for s in slots:
            c = _cell(rows, b, w, s, "esper_gate")
            v = c.get("paired_overhead_vs_raw") if c else None
            paired.append("–" if v is None else f"{v:+.1%}")
        out.append("| *GateSync / raw op - 1, median of back-to-back pairs* | " + " | ".join(paired) + " |")
        samples = [f"{_cell(rows, b, w, s, 'esper_gate')['samples']}" if _cell(rows, b, w, s, 'esper_gate') else "–"
                   for s in slots]
        out.append("| *samples per design* | " + " | ".join(samples) + " |")
        out.append("")
        enq = [r for r in rows if (r["backend"], r["world"], r["design"]) == (b, w, "enqueue")]
        if enq:
            out += ["Host-side enqueue time of one `torch.ops.esper_gate.sync` on CUDA (call to return, GPU not "
                    "waited for), µs:", "",
                    "| S | median | 25th–75th | min |", "|---:|---:|---:|---:|"]
            out += [f"| {r['slots']} | {r['median_us']:.1f} | {r['p25_us']:.1f}–{r['p75_us']:.1f} | "
                    f"{r['min_us']:.1f} |" for r in sorted(enq, key=lambda r: r["slots"])]
            out.append("")
    for dev in sorted({r["device"] for r in result.get("local", [])}):
        local = [r for r in result["local"] if r["device"] == dev]
        out += [f"## One process, no collective ({'CUDA' if dev == 'cuda' else 'CPU'}; torch.utils.benchmark)", "",
                "Where esper_gate's own time goes, W=2 buffer layout, µs per call (median)"
                + (", each kernel followed by a device synchronize:" if dev == "cuda" else ":"), "",
                "| S | pack | decode | pack + decode + host read | GateSync call + host read, local path "
                "| GateSync's Python around the kernels |",
                "|---:|---:|---:|---:|---:|---:|"]
        by = {(r["slots"], r["what"]): r["median_us"] for r in local}
        for s in sorted({r["slots"] for r in local}):
            out.append(f"| {s} | {by[(s, 'pack')]:.1f} | {by[(s, 'decode')]:.1f} | "
                       f"{by[(s, 'pack_decode_read')]:.1f} | {by[(s, 'gate_sync_local')]:.1f} | "
                       f"{by[(s, 'gate_sync_local')] - by[(s, 'pack_decode_read')]:.1f} |")
        out.append("")
    out += ["## Targets", "", "```"] + target_lines(result["targets"]) + ["```", ""]
    if result.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    if result.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(out)


def render_plot(result: dict, path: str) -> str | None:
    """Latency against S, log-log, one panel per (backend, world). None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, or bash scripts/run.sh setup)"
    rows = result["rows"]
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS},
                     key=lambda c: (c[0] != "gloo", c[1]))
    if not configs:
        return "no rows to plot"
    fig, axes = plt.subplots(1, len(configs), figsize=(5.2 * len(configs), 4.4), squeeze=False)
    for ax, (b, w) in zip(axes[0], configs):
        for d in DESIGNS:
            pts = sorted((r["slots"], r) for r in rows if (r["backend"], r["world"], r["design"]) == (b, w, d))
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ys = [r["median_us"] for _, r in pts]
            err = [[r["median_us"] - r["p25_us"] for _, r in pts], [r["p75_us"] - r["median_us"] for _, r in pts]]
            color, marker, ls = STYLE[d]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, linestyle=ls, capsize=3,
                        linewidth=1 if d == "raw_op" else 1.8, label=SHORT[d])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs_all = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w)})
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel("slots S")
        ax.set_ylabel("µs per gate round (median, IQR bars)")
        ax.set_title(_config_title(b, w), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"esper_gate vs per-slot gate sync ({result['meta']['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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
