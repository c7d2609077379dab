"""Soak: many GateSync calls on spawned gloo ranks; memory growth and rare hangs only show up over thousands.

    python benchmarks/soak.py                          10,000 calls, 4 ranks, 16 slots
    python benchmarks/soak.py --calls 200 --world 2    a short version (tests/test_bench.py)

Every rank makes the same number of GateSync calls with votes that change from
call to call, checks every decision against the unanimous AND of all ranks'
votes, reads the full report every --report-every calls, and samples its
resident memory (/proc/self/statm) after the warm-up and at the end. The run is
bounded by a deadline: a call that never returns fails the soak instead of
hanging it. Prints a summary and writes soak.json to --out; the exit status is
0 when every call returned with the right decisions (memory growth is reported
against the 10 MB target, not asserted).
"""
from __future__ import annotations

import argparse
import array
import datetime
import gc
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RSS_GROWTH_MAX_MB = 10.0
PATTERNS = 16


def rss_mb() -> float:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _votes(world: int, slots: int, seed: int) -> list[list[list[int]]]:
    """PATTERNS vote patterns per rank; every rank derives all of them (to know the answer)."""
    rng = random.Random(seed)
    return [[[int(rng.random() < 0.9) for _ in range(slots)] for _ in range(world)] for _ in range(PATTERNS)]


def soak_rank(rank: int, world: int, calls: int, slots: int, warmup: int, report_every: int,
              timeout_s: float) -> dict:
    import esper_gate

    patterns = _votes(world, slots, seed=1234)
    mine = [torch.tensor(p[rank], dtype=torch.bool) for p in patterns]
    want = [[all(p[r][i] for r in range(world)) for i in range(slots)] for p in patterns]
    stages = torch.full((slots,), 3, dtype=torch.int64)
    targets = torch.full((slots,), 4, dtype=torch.int64)
    gs = esper_gate.GateSync(slots, slot_names=[f"r{i // 4}c{i % 4}" for i in range(slots)],
                             timeout=datetime.timedelta(seconds=timeout_s))
    samples = []
    latencies = array.array("d", [0.0]) * calls  # preallocated: the soak's own memory stays flat
    wrong = 0
    reports = 0
    rss_start = None
    t_start = time.perf_counter()
    for i in range(calls):
        k = i % PATTERNS
        t0 = time.perf_counter()
        res = gs(mine[k], stages, targets)
        got = res.host_decisions()
        latencies[i] = time.perf_counter() - t0
        if got != want[k]:
            wrong += 1
        if report_every and (i + 1) % report_every == 0:
            rep = res.report()
            reports += 1
            if not rep.ok:
                wrong += 1
        if i + 1 == warmup:
            gc.collect()
            rss_start = rss_mb()
            samples.append((i + 1, rss_start))
        elif i + 1 > warmup and (i + 1) % max(1, calls // 10) == 0:
            gc.collect()
            samples.append((i + 1, rss_mb()))
    elapsed = time.perf_counter() - t_start
    gc.collect()
    rss_end = rss_mb()
    if rss_start is None:
        rss_start = rss_end
    calls_done = gs.calls
    gs.close()
    after = latencies[warmup:] if warmup < calls else latencies
    after_sorted = sorted(after)
    return {"rank": rank, "calls_returned": calls_done, "wrong_decisions": wrong, "reports_read": reports,
            "rss_after_warmup_mb": round(rss_start, 2), "rss_end_mb": round(rss_end, 2),
            "rss_growth_mb": round(rss_end - rss_start, 2), "rss_samples": samples,
            "latency_median_ms": round(after_sorted[len(after_sorted) // 2] * 1e3, 3),
            "latency_p99_ms": round(after_sorted[min(len(after_sorted) - 1, int(0.99 * len(after_sorted)))] * 1e3, 3),
            "latency_max_ms": round(max(latencies) * 1e3, 3),
            "latency_max_after_warmup_ms": round(max(after) * 1e3, 3),
            "elapsed_s": round(elapsed, 2)}


def main(argv=None) -> int:
    from esper_gate._spawn import spawn_ranks, values

    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="GateSync calls per rank (default %(default)s)")
    p.add_argument("--world", type=int, default=4, help="ranks (default %(default)s)")
    p.add_argument("--slots", type=int, default=16, help="slots per call (default %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="calls before the first memory sample "
                   "(default: min(500, calls // 5))")
    p.add_argument("--report-every", type=int, default=100, help="read the full report every N calls")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds before the soak counts as hung")
    p.add_argument("--call-timeout", type=float, default=60.0, help="GateSync timeout per call, seconds")
    p.add_argument("--out", default="results", help="results folder for soak.json (default %(default)s)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.world < 2:
        p.error("need --calls >= 1 and --world >= 2")
    warmup = args.warmup if args.warmup is not None else min(500, args.calls // 5)
    warmup = max(1, min(warmup, args.calls))

    print(f"[soak] {args.calls} GateSync calls x {args.world} ranks (gloo, CPU), {args.slots} slots, "
          f"deadline {args.deadline:.0f} s ...", flush=True)
    t0 = time.monotonic()
    result = {"meta": {"command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__, "calls": args.calls, "world": args.world,
                       "slots": args.slots, "warmup_calls": warmup, "deadline_s": args.deadline},
              "ranks": [], "error": None}
    try:
        result["ranks"] = values(spawn_ranks(soak_rank, args.world, args.calls, args.slots, warmup,
                                             args.report_every, args.call_timeout, timeout=args.deadline,
                                             pg_timeout_s=args.call_timeout))
    except TimeoutError as e:
        result["error"] = f"hang: {e}"
    except Exception as e:  # a rank failed: report it
        result["error"] = str(e)
    wall = time.monotonic() - t0
    ranks = result["ranks"]
    all_returned = bool(ranks) and all(r["calls_returned"] == args.calls for r in ranks)
    all_right = bool(ranks) and all(r["wrong_decisions"] == 0 for r in ranks)
    growth = max((r["rss_growth_mb"] for r in ranks), default=None)
    result["summary"] = {
        "no_hang": result["error"] is None or not result["error"].startswith("hang"),
        "all_calls_returned": all_returned, "all_decisions_right": all_right,
        "max_rss_growth_mb": growth, "rss_target_mb": RSS_GROWTH_MAX_MB,
        "rss_status": None if growth is None else ("PASS" if growth < RSS_GROWTH_MAX_MB else "MISS"),
        "max_call_latency_ms": max((r["latency_max_ms"] for r in ranks), default=None),
        "max_call_latency_after_warmup_ms": max((r["latency_max_after_warmup_ms"] for r in ranks), default=None),
        "median_call_latency_ms": max((r["latency_median_ms"] for r in ranks), default=None),
        "wall_s": round(wall, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "soak.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    s = result["summary"]
    if result["error"]:
        print(f"[soak] FAILED: {result['error']}")
    for r in ranks:
        print(f"  rank {r['rank']}: {r['calls_returned']} calls returned, {r['wrong_decisions']} wrong, "
              f"RSS {r['rss_after_warmup_mb']:.1f} -> {r['rss_end_mb']:.1f} MB ({r['rss_growth_mb']:+.2f} MB), "
              f"latency median {r['latency_median_ms']:.2f} ms, p99 {r['latency_p99_ms']:.2f} ms, "
              f"max {r['latency_max_ms']:.1f} ms ({r['elapsed_s']:.1f} s)")
    print(f"[soak] summary: every call returned: {'yes' if all_returned else 'NO'}; decisions right on every "
          f"rank: {'yes' if all_right else 'NO'}; max call latency "
          f"{s['max_call_latency_ms']} ms")
    if growth is not None:
        print(f"  {s['rss_status']:4s}  resident memory growth per rank after warm-up < {RSS_GROWTH_MAX_MB:g} MB: "
              f"max {growth:+.2f} MB")
    print(f"[soak] wrote {path} in {wall:.1f} s")
    return 0 if (result["error"] is None and all_returned and all_right) else 1


if __name__ == "__main__":
    sys.exit(main())
