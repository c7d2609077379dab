"""A world of two on one GPU: the gate's own NCCL communicator on NCCL's real path, one line per case.

    python benchmarks/gpu_world2_check.py [--only NAME ...] [--timeout S] [--figure-budget S] [--double]

Run by benchmarks/gpu_check.sh (step `world2`). Why a world of two: at a world
of one NCCL's in-place SUM launches nothing and starts no thread
(ncclLaunchOneRank, src/enqueue.cc), so an enqueue time, a "no host sync" or
a graph capture measured there never meets NCCL's launch thread, its
ncclInProgress, or a peer.

How, with one GPU: two spawned ranks, both on GPU 0, each with its own
NCCL_HOSTID, which NCCL hashes instead of the host's name (getHostHash,
src/misc/utils.cc): the ranks are two "hosts" to it, so it connects them over
its socket transport on lo instead of refusing a duplicate GPU (init.cc: same
hostHash and busId). GateSync refuses two ranks on one GPU of one host
(_group.shared_devices, from the hostname and GPU UUID each rank reports at
the rendezvous); this check, and only this check, appends the rank's
NCCL_HOSTID to the host it reports (esper_gate._build._where), which is what NCCL sees.
Two processes on one GPU time-slice it: a collective waits for the other
process's slice, so the latencies are upper bounds of two GPUs', and the
designs are compared on the same footing.

All cases share one world (the default group is gloo; the raw op, per-slot
and bare-floor designs use a c10d NCCL group). Each case has a deadline in
both ranks (faulthandler dumps every thread's stack and ends the rank), and
the world one for all; a case the world never reached is a FAIL (a check) or
SKIPPED (a figure). Lines: PASS/FAIL NAME, FIGURE NAME for a measurement
(reported, never asserted), SKIPPED NAME. Exit 0: no FAIL; 1: a FAIL; 3: no
GPU visible to torch (every case SKIPPED).

--double: the dry run on the CPU. tests/owned_double.py replaces NCCL (and
models its ncclInProgress, its abort behind the caller's stream, ...), CPU
tensors, gloo in place of the c10d NCCL group, the double's caller stream in
place of torch.cuda._sleep. The cases that need CUDA (sync debug, graphs) are
SKIPPED; the rest run their GPU code paths, so a GPU run does not spend its
time on a typo.

Cases:
  all_reduce     the owned gate's communicator, 50 all_reduce_ of 64 words: ncclInProgress seen (every
                 call of a world of two should return it), host us per call, the sum correct on both
                 ranks; and one gate call's decisions
  no_host_sync   torch.cuda.set_sync_debug_mode("error") around NcclComm.all_reduce_ (start + the
                 enqueue poll) and a GateSync call + `decisions`
  enqueue        FIGURE: host time of one NcclComm.all_reduce_ and of one GateSync call (no host read),
                 median of 50 queued behind a spin (target <= 30 us for the GateSync call)
  silent_peer    rank 1 stays alive and never makes call 2; rank 0 has 10 s of torch.cuda._sleep on its
                 stream: rank 0's error names rank 1 within the gate's timeout + 5 s; the NCCL abort's
                 duration (it waits behind that stream); then a new gate on both ranks works
  figures        FIGURE per S in {1, 16, 64, 256}: per-slot all_reduce(MIN) + .item(), one bare NCCL
                 all_reduce of the packed size, the raw op (esper_gate.sync on the NCCL group + host
                 read), GateSync + host read (targets: GateSync <= 1.3x the bare floor; >= S/2 x
                 per-slot for S >= 4)
  store_free     200 gate calls with a host read each: the store requests the caller's thread waited
                 for and the verdict keys written (both 0 on the fast path), decisions right
  graph_capture  rank 0: a user's global-mode torch.cuda.graph capture while another thread issues a
                 world-2 all_reduce on the gate's communicator (NCCL's launch thread runs during the
                 capture) and a third polls state(); rank 1 issues its half: the capture succeeds,
                 replays correctly, and the sum is right on both ranks
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpu_gate_check  # noqa: E402  (beside this file)
import gpu_owned_check  # noqa: E402
from esper_gate._spawn import spawn_ranks  # noqa: E402

CASES = ("all_reduce", "no_host_sync", "enqueue", "silent_peer", "figures", "store_free", "graph_capture")
FIGURES = ("enqueue", "figures")
CUDA_ONLY = {"no_host_sync": "CUDA's sync debug mode has nothing to catch on the CPU",
             "graph_capture": "CUDA graphs need a GPU"}
# Per case, in each rank (faulthandler); the figures' own comes from their budget.
LIMITS = {"all_reduce": 45, "no_host_sync": 30, "enqueue": 30, "silent_peer": 75, "store_free": 40,
          "graph_capture": 40}
SLOTS = (1, 16, 64, 256)
DESIGNS = ("per_slot_unanimous", "bare_floor", "raw_op", "esper_gate")
ENQUEUE_TARGET_US = 30.0
FLOOR_MAX = 1.3
# The silent peer: the gate's timeout, and the work queued on rank 0's stream before its call.
SILENT_T = {"gpu": 4.0, "double": 2.0}
STALL_S = 10.0
BOUND_EXTRA_S = 5.0
# How a gate's construction errors begin, and GateSync's refusal of two ranks on one GPU
UNBUILDABLE = ("GateSync construction", "are both on cuda")

VOTES, STAGES, TARGETS = [True, False, True, True], [3] * 4, [4] * 4


def host_id(rank: int) -> str:
    return f"esper-gate-world2-rank{rank}"


def report_host_id(hostid: str) -> None:
    """Check-only: the host this rank reports at GateSync's rendezvous names its NCCL_HOSTID, so that
    _group.shared_devices sees what NCCL sees (two hosts) and lets two ranks share GPU 0."""
    from esper_gate import _build

    original = _build._where

    def where(gate):
        w = original(gate)
        w["host"] = f"{w['host']} (NCCL_HOSTID {hostid})"
        return w

    _build._where = where


class World:
    """One rank's view of the shared world: its device, the NCCL module (or the double), and the
    few things that differ between the GPU and the CPU dry run."""

    def __init__(self, rank: int, world: int, cfg: dict):
        import torch
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        self.rank, self.world, self.cfg = rank, world, cfg
        self.double = cfg["double"]
        if self.double:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            import owned_double

            self.owned, self.dev = owned_double, torch.device("cpu")
        else:
            torch.cuda.set_device(0)
            self.owned, self.dev = None, torch.device("cuda", 0)
        self.store = dist.PrefixStore("gpu_world2/", _get_default_store())
        # The c10d group of the raw op, the per-slot design and the bare floor.
        self.coll = dist.new_group(backend="gloo" if self.double else "nccl")

    def gate(self, slots: int = 4, timeout: float = 30.0):
        import esper_gate

        return esper_gate.GateSync(slots, device=self.dev, timeout=datetime.timedelta(seconds=timeout),
                                   _owned=self.owned)

    def inputs(self):
        import torch

        return (torch.tensor(VOTES, device=self.dev), torch.tensor(STAGES, device=self.dev),
                torch.tensor(TARGETS, device=self.dev))

    def stall(self, seconds: float) -> None:
        """Queue ``seconds`` of work on this rank's current stream; returns at once."""
        if self.double:
            self.owned.caller_stream.sleep(seconds)
            return
        import torch

        khz = getattr(torch.cuda.get_device_properties(self.dev), "clock_rate", 0) or 2_000_000
        torch.cuda._sleep(int(seconds * khz * 1000))

    def spin(self, seconds: float) -> None:
        """A spin for the host to enqueue behind. None on the double, whose all_reduce_ returns only
        after its device work: it would time the spin."""
        if not self.double:
            self.stall(seconds)

    def synchronize(self) -> None:
        if self.double:
            self.owned.caller_stream.wait_idle()
        else:
            import torch

            torch.cuda.synchronize()

    def meet(self, tag: str, seconds: float = 60.0) -> None:
        self.store.set(f"{tag}/{self.rank}", "1")
        self.store.wait([f"{tag}/{r}" for r in range(self.world)], datetime.timedelta(seconds=seconds))


def _median_us(xs) -> float:
    return statistics.median(xs) * 1e6


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- cases: each runs in both ranks and returns this rank's findings ------------------

def case_all_reduce(w: World) -> dict:
    import torch

    gs = w.gate(4)
    comm = gs._transport.comm  # the gate's own communicator
    ip0, sl0 = comm.in_progress_calls, comm.enqueue_sleeps
    buf = torch.empty(64, dtype=torch.int64, device=w.dev)
    times, wrong, n = [], 0, 50
    for i in range(n):
        buf.fill_(w.rank + 1 + i)
        w.synchronize()
        t0 = time.perf_counter()
        comm.all_reduce_(buf)
        times.append(time.perf_counter() - t0)
        w.synchronize()
        want = sum(r + 1 + i for r in range(w.world))
        wrong += int((buf != want).sum().item())
    in_progress, sleeps = comm.in_progress_calls - ip0, comm.enqueue_sleeps - sl0
    decisions = gs(*w.inputs()).host_decisions()
    gs.close()
    return {"calls": n, "in_progress": in_progress, "sleeps": sleeps, "host_us": _median_us(times),
            "max_us": max(times) * 1e6, "wrong": wrong, "decisions": decisions}


def judge_all_reduce(res):
    ok = all(r["wrong"] == 0 and r["in_progress"] > 0 and r["decisions"] == VOTES for r in res)
    parts = [f"rank {i}: ncclInProgress {r['in_progress']}/{r['calls']} calls, {r['sleeps']} sleeps, host "
             f"{r['host_us']:.0f} us median (max {r['max_us']:.0f}), sum {'correct' if not r['wrong'] else 'WRONG'}"
             f", gate call {'= votes' if r['decisions'] == VOTES else r['decisions']}" for i, r in enumerate(res)]
    if not all(r["in_progress"] for r in res):
        parts.append("no ncclInProgress: the double models every call of a world of two as in progress "
                     "(src/group.cc), and the enqueue poll never ran")
    return ok, "; ".join(parts)


def case_no_host_sync(w: World) -> dict:
    import torch

    gs = w.gate(4)
    comm = gs._transport.comm
    buf = torch.ones(8, dtype=torch.int64, device=w.dev)
    v, s, t = w.inputs()
    comm.all_reduce_(buf)
    gs(v, s, t).host_decisions()  # warm every path
    torch.cuda.synchronize()
    said = gpu_gate_check.sync_debug_said(torch, (("NcclComm.all_reduce_", lambda: comm.all_reduce_(buf)),
                                                  ("GateSync call + decisions", lambda: gs(v, s, t).decisions)))
    torch.cuda.synchronize()
    gs.close()
    return {"said": said}


def judge_no_host_sync(res):
    ok = all(x == "ok" for r in res for x in r["said"].values())
    return ok, "; ".join(f"rank {i}: " + ", ".join(f"{k} {x}" for k, x in r["said"].items())
                         for i, r in enumerate(res))


def case_enqueue(w: World) -> dict:
    import torch

    gs = w.gate(4)
    comm = gs._transport.comm
    v, s, t = w.inputs()
    buf = torch.ones(64, dtype=torch.int64, device=w.dev)
    for _ in range(5):
        comm.all_reduce_(buf)
        gs(v, s, t).host_decisions()
    w.synchronize()
    n = 50  # ~8 launches a gate call: within CUDA's pending-launch queue (about 1,000 per stream)
    ip0 = comm.in_progress_calls
    w.spin(0.05)  # the calls queue behind it: the host times only their enqueue
    ar = _timed(lambda: comm.all_reduce_(buf), n)
    w.synchronize()
    w.spin(0.05)
    results = []
    calls = _timed(lambda: results.append(gs(v, s, t)), n)
    w.synchronize()
    last = results[-1].host_decisions()
    gs.close()
    return {"all_reduce_us": _median_us(ar), "gate_us": _median_us(calls), "gate_p90_us":
            sorted(calls)[int(0.9 * n)] * 1e6, "in_progress": comm.in_progress_calls - ip0, "n": n, "last": last}


def judge_enqueue(res):
    r = res[0]
    met = "met" if r["gate_us"] <= ENQUEUE_TARGET_US else "MISSED"
    ok = all(x["last"] == VOTES for x in res)
    return ok, (f"host enqueue, world 2, median of {r['n']} queued behind a spin: GateSync call {r['gate_us']:.1f} us "
                f"(p90 {r['gate_p90_us']:.1f}; target <= {ENQUEUE_TARGET_US:.0f} us: {met}), NcclComm.all_reduce_ "
                f"{r['all_reduce_us']:.1f} us ({r['in_progress']} of {2 * r['n']} calls in progress); rank 1: "
                f"{res[1]['gate_us']:.1f} / {res[1]['all_reduce_us']:.1f} us"
                + ("" if ok else f"; decisions WRONG {[x['last'] for x in res]}"))


def _one_call(gs, inputs=None) -> tuple:
    import esper_gate

    t0 = time.monotonic()
    try:
        out = ("applied", gs(*(inputs or (VOTES, STAGES, TARGETS))).host_decisions())
    except esper_gate.GateError as e:
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300],
               list(getattr(e, "__notes__", [])))
    return out, time.monotonic() - t0


def case_silent_peer(w: World) -> dict:
    timeout = SILENT_T["double" if w.double else "gpu"]
    gs = w.gate(4, timeout=timeout)
    out = {"timeout": timeout, "first": _one_call(gs)[0]}
    w.meet("silent/first")
    if w.rank == 0:
        # Made before the stall: a tensor made from a list is copied from pageable memory, which
        # waits for the stream; the gate call itself must not.
        inputs = w.inputs()
        # 10 s of other work on the caller's stream (DDP's all_reduce stuck on a dead peer, say):
        # the gate's abort waits behind it (ncclCommAbort synchronizes NCCL's device stream).
        w.stall(STALL_S)
        out["outcome"], out["elapsed"] = _one_call(gs, inputs)
        abort = gs._failure.abort
        out["abort_returned_at_raise"] = abort is not None and abort.returned
        t0 = time.monotonic()
        gs.close()
        out["close_s"] = time.monotonic() - t0
        gs._failure.wait_abort(30)
        out["abort_s"] = abort.seconds if abort is not None and abort.returned else None
        w.synchronize()
        w.store.set("silent/done", "1")
    else:
        # silent: alive, its watcher running, never makes call 2
        w.store.wait(["silent/done"], datetime.timedelta(seconds=60))
        t0 = time.monotonic()
        gs.close()
        out["close_s"] = time.monotonic() - t0
    w.meet("silent/after")
    gs = w.gate(4, timeout=30)
    out["after"] = _one_call(gs)[0]
    gs.close()
    return out


def judge_silent_peer(res):
    r0, r1 = res
    ok_call = ("applied", VOTES)
    bound = r0["timeout"] + BOUND_EXTRA_S
    outcome = r0["outcome"]
    named = outcome[0] == "raised" and outcome[1] == "GateTimeoutError" and outcome[2] == [1]
    notes = outcome[4] if outcome[0] == "raised" else []
    stuck_note = any("has not returned after" in n for n in notes)
    ok = (all(tuple(r["first"]) == ok_call for r in res) and named and r0["elapsed"] <= bound
          and r0["abort_s"] is not None and all(tuple(r["after"]) == ok_call for r in res))
    abort = (f"the NCCL abort took {r0['abort_s']:.1f} s" if r0["abort_s"] is not None
             else "the NCCL abort had NOT returned 30 s after the error")
    said = outcome[3][:200] if outcome[0] == "raised" else f"{outcome} (no error)"
    after = "works on both" if all(tuple(r["after"]) == ok_call for r in res) else [r["after"] for r in res]
    return ok, (f"{STALL_S:.0f} s on rank 0's stream, timeout {r0['timeout']:.0f} s: "
                f"{'rank 1 named' if named else 'NOT named'} after {r0['elapsed']:.1f} s (bound {bound:.0f} s); "
                f"{abort} (returned before the raise: {r0['abort_returned_at_raise']}; note on the error: "
                f"{'yes' if stuck_note else 'no'}); close {r0['close_s']:.1f} s on rank 0, {r1['close_s']:.1f} s on "
                f"the silent rank; a new gate: {after}; the error: {said}")


def case_figures(w: World) -> dict:
    import torch.distributed as dist

    from esper_gate.tools.bench.measure import _make_designs

    budget = w.cfg["figure_budget"]
    rows = {}
    for slots in w.cfg["slots"]:
        gs = w.gate(slots, timeout=60)
        fns, vote_list, _ = _make_designs(w.rank, w.world, slots, gs, w.coll, w.dev)
        warm = {}
        for name in DESIGNS:
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                got = fns[name]()
                best = min(best, time.perf_counter() - t0)
                if got is not None and got != vote_list:
                    raise AssertionError(f"S={slots} {name} decided {got[:8]}..., expected {vote_list[:8]}...")
            warm[name] = best
        plan = [None]
        if w.rank == 0:  # blocks of ~20 ms, as many repetitions as the budget allows (3..30)
            inner = {n: max(1, min(50, round(0.02 / max(warm[n], 1e-7)))) for n in DESIGNS}
            per_rep = sum(inner[n] * warm[n] for n in DESIGNS)
            plan = [(inner, int(min(30, max(3, budget // max(per_rep, 1e-6)))))]
        dist.broadcast_object_list(plan, src=0)
        inner, reps = plan[0]
        samples = {n: [] for n in DESIGNS}
        for rep in range(reps):
            k = rep % len(DESIGNS)  # round-robin order, so drift hits every design alike
            for name in DESIGNS[k:] + DESIGNS[:k]:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fns[name]()
                samples[name].append((time.perf_counter() - t0) / inner[name])
        everyone = [None] * w.world
        dist.all_gather_object(everyone, samples)
        from esper_gate import wire

        # a block's time is its slowest rank's
        rows[slots] = {"reps": reps, "words": wire.buffer_words(slots, w.world),
                       **{n: statistics.median(max(r[n][i] for r in everyone) for i in range(reps)) * 1e6
                          for n in DESIGNS}}
        gs.close()
    return {"rows": rows}


def figure_lines(rows: dict, double: bool) -> list[tuple[str, str]]:
    where = "gloo + the CPU double" if double else "NCCL, 2 processes time-slicing one GPU"
    out = []
    for slots, r in sorted(rows.items()):
        floor, gate, raw, per = r["bare_floor"], r["esper_gate"], r["raw_op"], r["per_slot_unanimous"]
        floor_met = "met" if gate <= FLOOR_MAX * floor else "MISSED"
        text = (f"S={slots}, W=2 ({where}; medians of {r['reps']}, us per round): per-slot MIN+.item() {per:.0f}, "
                f"bare all_reduce of {r['words']} words {floor:.0f}, raw op {raw:.0f} ({raw / floor:.2f}x floor), "
                f"GateSync+host read {gate:.0f} ({gate / floor:.2f}x floor, target <= {FLOOR_MAX}x: {floor_met})")
        if slots >= 4:
            need = slots / 2
            text += (f"; per-slot / GateSync {per / gate:.1f}x (target >= S/2 = {need:g}x: "
                     f"{'met' if per / gate >= need else 'MISSED'})")
        out.append((f"figures_s{slots}", text))
    return out


def case_store_free(w: World) -> dict:
    """Calls that succeed, each read on the host at once: no store request on the caller's
    path (the verdict's fast path), counted at the gate's store worker."""
    import threading as _threading

    gs = w.gate(4)
    worker = gs._watcher._worker
    waited, keys = [], []
    request, store = worker.request, worker.store

    class Counting:
        def __getattr__(self, name):
            fn = getattr(store, name)
            return lambda *a, **k: keys.append(str(a[0]) if a else "") or fn(*a, **k)
    worker.store = Counting()
    worker.request = lambda fn, bound_s: waited.append(_threading.current_thread().name) or request(fn, bound_s)
    v, s, t = w.inputs()
    n, outs = 200, []
    t0 = time.monotonic()
    for _ in range(n):
        outs.append(gs(v, s, t).host_decisions())
    took = time.monotonic() - t0
    worker.request, worker.store = request, store
    gs.close()
    return {"n": n, "waited": len(waited), "verdict": sum(k.startswith(("v/", "ack/")) for k in keys),
            "all": len(keys), "us": took / n * 1e6, "right": all(o == VOTES for o in outs)}


def judge_store_free(res):
    ok = all(r["right"] and r["waited"] == 0 and r["verdict"] == 0 for r in res)
    r = res[0]
    return ok, (f"{r['n']} calls with a host read each: the caller waited for {r['waited']} store requests, "
                f"{r['verdict']} verdict keys written, {r['all']} requests in all (heartbeats), "
                f"{r['us']:.0f} us a call; rank 1: {res[1]['waited']} / {res[1]['verdict']} / {res[1]['all']}"
                + ("" if all(x["right"] for x in res) else "; decisions WRONG"))


def case_graph_capture(w: World) -> dict:
    import torch

    from esper_gate import _nccl

    key = "capture/uid"
    if w.rank == 0:
        w.store.set(key, _nccl.unique_id())
    w.store.wait([key], datetime.timedelta(seconds=30))
    comm = _nccl.NcclComm(bytes(w.store.get(key)), w.rank, w.world, w.dev)
    t0 = time.monotonic()
    while (state := comm.state()) == "pending" and time.monotonic() - t0 < 30:
        time.sleep(0.001)
    if state != "ready":
        comm.close()
        return {"ok": False, "text": f"the world-2 communicator did not become ready in 30 s: {state}"}
    if w.rank == 0:
        ok, text = gpu_owned_check.capture_during_gate_call(torch, comm, w.dev)
    else:
        buf = torch.ones(1024, dtype=torch.int64, device=w.dev)
        comm.all_reduce_(buf, enqueue_timeout_s=30)  # its half of rank 0's all_reduce
        done = gpu_owned_check.stream_done(torch, 20)
        good = done and buf[0].item() == w.world
        ok, text = good, f"its half {'correct' if good else 'WRONG' if done else 'STUCK (aborted)'}"
        if not done:
            comm.abort()
    comm.destroy()
    comm.close()
    return {"ok": ok, "text": text}


def judge_graph_capture(res):
    ok = all(r["ok"] for r in res)
    return ok, f"rank 0: {res[0]['text']}; rank 1: {res[1]['text']}"


def _rank_main(rank: int, world: int, cfg: dict, progress) -> str:
    import torch.distributed as dist

    hostid = host_id(rank)
    if not cfg["double"]:
        # Two ranks of one GPU as two "hosts", as gpu_owned_check.py's stuck_abort_then_new:
        # NCCL reads these at its first init in the process, before which they are set here.
        os.environ.update(gpu_owned_check.TWO_HOSTS_ENV)
        os.environ["NCCL_HOSTID"] = hostid
    report_host_id(hostid)
    w = World(rank, world, cfg)
    for name in cfg["cases"]:
        if w.double and name in CUDA_ONLY:
            if rank == 0:
                progress.put(("line", "SKIPPED", name, 0.0, f"the dry run on the CPU double: {CUDA_ONLY[name]}"))
            continue
        limit = cfg["limits"][name]
        w.meet(f"case/{name}")
        if rank == 0:
            progress.put(("start", name, limit))
        faulthandler.dump_traceback_later(limit, exit=True)  # a hang: every thread's stack, then the end
        t0 = time.monotonic()
        try:
            mine = globals()[f"case_{name}"](w)
        except BaseException as e:  # noqa: BLE001
            mine = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        both = [None] * world
        dist.all_gather_object(both, mine)
        faulthandler.cancel_dump_traceback_later()
        errors = [f"rank {i}: {r['error']}" for i, r in enumerate(both) if "error" in r]
        # Every case builds gates: once a world of two cannot, the rest would each wait out a
        # construction timeout for the same reason (both ranks read the same `both`).
        unbuildable = any(u in e for e in errors for u in UNBUILDABLE)
        if rank != 0:
            if unbuildable:
                break
            continue
        took = time.monotonic() - t0
        if errors:
            for r in both:
                if "traceback" in r:
                    print(r["traceback"], file=sys.stderr, flush=True)
            progress.put(("line", "FAIL", name, took, "; ".join(errors)))
        elif name == "figures":
            for fig, text in figure_lines(both[0]["rows"], w.double):
                progress.put(("line", "FIGURE", fig, took, text))
        else:
            judge = globals().get(f"judge_{name}")
            ok, text = judge(both) if judge else (all(r["ok"] for r in both), both[0]["text"])
            word = "FIGURE" if name in FIGURES and ok else ("PASS" if ok else "FAIL")
            progress.put(("line", word, name, took, text))
        if unbuildable:
            progress.put(("stop", f"{name}: a world of two could not build a gate ({'; '.join(errors)[:200]})"))
            break
    return "done"


def case_limit(name: str, cfg: dict) -> float:
    if name == "figures":  # per S: its budget, the warm-up, a gate's construction
        return len(cfg["slots"]) * (cfg["figure_budget"] + 15) + 10
    return LIMITS[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=CASES)
    p.add_argument("--timeout", type=float, default=None, help="the whole world (default: the cases' limits + 40 s)")
    p.add_argument("--figure-budget", type=float, default=4.0, help="seconds of timed blocks per S")
    p.add_argument("--slots", type=int, nargs="*", default=list(SLOTS))
    p.add_argument("--double", action="store_true", help="the dry run on the CPU: tests/owned_double.py for NCCL")
    args = p.parse_args(argv)
    cases = args.only or list(CASES)
    if not args.double:
        import torch

        if not torch.cuda.is_available():
            for name in cases:
                print(f"SKIPPED {name}: no GPU visible to torch", flush=True)
            return 3
    cfg = {"cases": cases, "double": args.double, "figure_budget": args.figure_budget, "slots": args.slots}
    cfg["limits"] = {n: case_limit(n, cfg) for n in cases}
    # the world's deadline; a rank still alive then is given 5 s to leave, then killed (_spawn)
    total = args.timeout or sum(cfg["limits"].values()) + 40
    progress = mp.get_context("spawn").Queue()
    outcome = {}

    def run():
        try:
            outcome["results"] = spawn_ranks(_rank_main, 2, cfg, progress, timeout=total, pg_timeout_s=120)
        except BaseException as e:  # noqa: BLE001 - a hang or a dead rank: reported below
            outcome["error"] = f"{type(e).__name__}: {e}"

    runner = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    runner.start()
    current, finished, failed, stopped = None, set(), 0, None

    def emit(word, name, took, text):
        nonlocal failed
        failed += word == "FAIL"
        print(f"{word} {name} ({took:.1f}s): {text}", flush=True)

    while runner.is_alive() or not progress.empty():
        try:
            msg = progress.get(timeout=0.2)
        except queue.Empty:
            continue
        if msg[0] == "start":
            current = (msg[1], time.monotonic())
        elif msg[0] == "stop":
            stopped = msg[1]
        else:
            _, word, name, took, text = msg
            emit(word, name, took, text)
            finished.add(name.split("_s")[0] if name.startswith("figures_s") else name)
            current = None
    why = outcome.get("error") or stopped
    if why is None:
        rank_errors = [f"rank {r.rank} raised {r.error_type}: {r.error}" for r in outcome["results"]
                       if r.error is not None]
        why = "; ".join(rank_errors) or None
    if current is not None and current[0] not in finished:
        emit("FAIL", current[0], time.monotonic() - current[1],
             f"no result within its {cfg['limits'][current[0]]:.0f} s limit or the world's {total:.0f} s "
             f"(a hang: the rank's stacks are in this log), or a rank died: {why}")
        finished.add(current[0])
    for name in [n for n in cases if n not in finished]:
        if args.double and name in CUDA_ONLY:
            emit("SKIPPED", name, 0.0, f"the dry run on the CPU double: {CUDA_ONLY[name]}")
        else:
            emit("SKIPPED" if name in FIGURES else "FAIL", name, 0.0,
                 f"not reached: {why or 'the world ended early'}")
    print(f"world of 2 ended after {time.monotonic() - start:.0f} s" + (f": {why}" if why else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
