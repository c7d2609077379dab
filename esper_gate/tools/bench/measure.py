"""Measuring: five ways to agree on S gate decisions, timed side by side on real ranks.

    per_slot_unanimous        per slot: fill a 1-element int tensor, all_reduce(MIN), .item()
    per_slot_rank0_broadcast  per slot: broadcast_object_list of rank 0's result dict
    bare_floor                one all_reduce of a buffer as large as esper_gate's, nothing else
    esper_gate                GateSync(votes, stages, targets).host_decisions()
    raw_op                    esper_gate.sync(...) on GateSync's group + the same host read

The first two are the designs Esper uses today; the floor is what any fused
design must pay. No design sends per-slot policies or digests, so the gate is
built with ``slot_state=False``: GateSync, the raw op and the floor then move
the same buffer (``wire.buffer_words(S, W)``). All five run in the same ranks, on the same process group
(the dedicated group GateSync builds), interleaved round-robin inside every
repetition so machine drift hits all of them alike.

One *round* is one agreement on all S slots (S collectives for the per-slot
designs). A sample is one barrier-delimited block of n rounds: the slowest
rank's block time divided by n. Rows carry the median and interquartile range
of the samples, in microseconds per round.
"""
from __future__ import annotations

import datetime
import statistics
import time

import torch

from ... import _spawn, wire

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
    # The old designs run on a c10d group of the gate's backend, as Esper's calls do (the
    # gate's own group is not in c10d's registry, so torch.distributed's calls refuse it).
    compared = dist.new_group(backend=backend)
    designs = list(cfg["designs"])
    cells = []
    for num_slots in cfg["slots"]:
        gs = esper_gate.GateSync(num_slots, timeout=datetime.timedelta(seconds=cfg["pg_timeout_s"]),
                                 device=device, slot_state=False)
        # In a world of one GateSync decides locally and builds no group; the
        # collective designs then use the world group.
        group = compared if gs.distributed else dist.group.WORLD
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


# ---- one process, no collective ----------------------------------------------

def local_costs(slots: list[int], device: str = "cpu", min_run_time: float = 0.2) -> list[dict]:
    """pack, decode and a GateSync call outside any process group, per S (torch.utils.benchmark).

    The calls send no per-slot policies or digests (and the GateSync is built without the
    slot state), except ``pack_decode_read_slot_state``: the same call with a policy and a
    digest per slot, the 47-bit slots an Esper round with digests sends."""
    from torch.utils import benchmark

    import esper_gate

    rows = []
    for num_slots in slots:
        world = 2
        votes = torch.tensor([i % 3 != 0 for i in range(num_slots)], device=device)
        stages = torch.full((num_slots,), 3, dtype=torch.int64, device=device)
        targets = torch.full((num_slots,), 4, dtype=torch.int64, device=device)
        policies = torch.zeros(num_slots, dtype=torch.int64, device=device)
        digests = torch.arange(num_slots, dtype=torch.int64, device=device) * 0x9E3779B1 % 2**32
        buf = esper_gate.pack(votes, stages, targets, 1, 7, "unanimous", 0, world)
        gs = esper_gate.GateSync(num_slots, device=device, slot_state=False)
        env = {"esper_gate": esper_gate, "votes": votes, "stages": stages, "targets": targets, "buf": buf,
               "S": num_slots, "W": world, "gs": gs, "torch": torch, "policies": policies, "digests": digests}
        sync = "torch.cuda.synchronize()" if device == "cuda" else ""
        stmts = {
            "pack": f"esper_gate.pack(votes, stages, targets, 1, 7, 'unanimous', 0, W); {sync}",
            "decode": f"esper_gate.decode(buf, S, W, 'unanimous'); {sync}",
            "pack_decode_read": "esper_gate.decode(esper_gate.pack(votes, stages, targets, 1, 7, 'unanimous', 0, W),"
                                " S, W, 'unanimous')[0].tolist()",
            "gate_sync_local": "gs(votes, stages, targets).host_decisions()",
            "pack_decode_read_slot_state": "esper_gate.decode(esper_gate.pack(votes, stages, targets, 1, 7, "
                                           "'unanimous', 0, W, 0, policies, digests), S, W, 'unanimous')[0].tolist()",
        }
        for name, stmt in stmts.items():
            m = benchmark.Timer(stmt=stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=min_run_time)
            rows.append({"slots": num_slots, "what": name, "device": device, "median_us": m.median * 1e6,
                         "iqr_us": m.iqr * 1e6})
    return rows


# ---- the sweep -----------------------------------------------------------------

def run_sweep(backends: list[tuple[str, int]], cfg: dict, log=print) -> tuple[list[dict], list[str]]:
    """Run every (backend, world) cell; return (rows, errors)."""
    rows, errors = [], []
    for backend, world in backends:
        c = dict(cfg, backend=backend)
        deadline = cfg.get("timeout") or (90 + len(c["slots"]) * (3 * c["budget"] + 30))
        t0 = time.monotonic()
        log(f"[bench] {backend} W={world}: S in {c['slots']} (deadline {deadline:.0f} s) ...")
        try:
            vals = _spawn.values(_spawn.spawn_ranks(_bench_rank, world, c, backend=backend, timeout=deadline,
                                                    pg_timeout_s=c["pg_timeout_s"]))
            rows.extend(vals[0]["rows"])
            log(f"[bench] {backend} W={world}: done in {time.monotonic() - t0:.1f} s")
        except Exception as e:  # a failed cell is reported; the others still run
            errors.append(f"{backend} W={world}: {e}")
            log(f"[bench] {backend} W={world}: FAILED: {e}")
    return rows, errors

