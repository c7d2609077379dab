"""GPU-only checks of the gate end to end (OwnedTransport, GateSync, the raw op, the c10d fallback).

    python benchmarks/gpu_gate_check.py [--only NAME ...] [--case-timeout S]

Run by benchmarks/gpu_check.sh (steps `gate_owned` and `c10d_fallback`). As in
gpu_owned_check.py each case runs in a spawned process of its own under a
deadline and prints one line: PASS/FAIL NAME, or FIGURE NAME for a measured
figure that is reported, never asserted. Exit 0: no FAIL; 1: a FAIL; 3: no GPU
visible to torch (every case SKIPPED).

One GPU: NCCL refuses two ranks of one host on one device, so here the owned
transport runs with world = 1 and the real NcclComm (the pack/decode kernels
around a communicator of one, whose in-place SUM NCCL does not launch).
gpu_world2_check.py runs a world of two on the one GPU (an NCCL_HOSTID each).

Cases:
  owned_transport    OwnedTransport(world 1, a HashStore, the real _nccl), as GateSync._build makes it:
                     decisions of CUDA calls equal the CPU reference; the mapped DONE word reaches the
                     call number while the host only reads mapped memory (a spin queued before the call
                     keeps it behind first); invalidate() makes the next call's decisions read false,
                     revalidate() true again; abort() makes failed() true and the next call a GateError
  gate_sync_owned    GateSync(device=cuda) on a one-rank process group, its parent forced (a world of one
                     otherwise decides locally): the whole owned path (rendezvous, watcher, verdict)
                     returns the reference decisions, and `decisions` reads them
  no_host_sync       torch.cuda.set_sync_debug_mode("error") around: the raw op on a one-rank NCCL group,
                     OwnedTransport.sync, GateSync's call and `decisions` (local and owned)
  enqueue            FIGURE: host-side time of one raw sync op and of one OwnedTransport.sync (median of
                     100, queued behind a spin, target <= 30 us)
  kernels            FIGURE: pack and decode kernel times (CUDA events, median of 50) for S in
                     {1, 64, 256, 1024} and W in {1, 4, 64}; the largest buffer is S=1024, W=64
  wire_growth        FIGURE: what the per-slot policies and digests (the slot state, 47-bit slots
                     instead of 13) cost on the GPU: buffer bytes, pack and decode kernel times with
                     and without them at S=64 W=2, S=16 W=8 and S=1024 W=64 (docs/wire-format.md §10)
  c10d_fallback      TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=10: a child process with a one-rank NCCL world
                     builds the gate's c10d group (new_gate_group, backend nccl), syncs on it, aborts it
                     (C10dTransport.abort); for 10 + 20 s no `exception_dump` key appears in the job's
                     store (a TCPStore this process hosts), the child is not killed (no SIGABRT) and
                     its default group still all-reduces afterwards
"""
from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ("owned_transport", "gate_sync_owned", "no_host_sync", "enqueue", "kernels", "wire_growth", "c10d_fallback")
FIGURES = ("enqueue", "kernels", "wire_growth")
# TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC for the c10d case, and the watch after the abort (no SIGABRT and no dump once the gate aborted its group).
HEARTBEAT_S, WATCH_EXTRA_S = 10, 20
KERNEL_GOAL_US = 50.0  # pack and decode each, at S=1024, W=64

VOTES, STAGES, TARGETS = [True, False, True, True], [3, 3, 4, 6], [2, 2, 3, 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device():
    import torch

    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _inputs(dev):
    import torch

    return (torch.tensor(VOTES, device=dev), torch.tensor(STAGES, device=dev), torch.tensor(TARGETS, device=dev))


def _prepared(dev, slots=4):
    from esper_gate._inputs import prepare

    v, s, t = _inputs(dev)
    return prepare(v, s, t, None, num_slots=slots, device=dev, default_site=77, call="gpu check")


def _want(seq=1):
    """The decisions of a world of one: the CPU kernels (pack + decode, no collective)."""
    import torch

    import esper_gate

    v, s, t = (torch.tensor(x) for x in (VOTES, STAGES, TARGETS))
    buf = esper_gate.pack(v, s, t, seq, 77, "unanimous", 0, 1)
    return esper_gate.decode(buf, 4, 1, "unanimous")[0].tolist()


def _spin(torch, dev, seconds):
    khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 0) or 2_000_000
    torch.cuda._sleep(int(seconds * khz * 1000))


def _kernel_us(torch, dev, fn) -> float:
    """Median GPU time of ``fn`` in us: CUDA events around each of 50 calls, all queued behind
    a spin before the GPU reaches them, so the events time the kernels, not the host's launch
    gaps (50 x ~4 launches: within CUDA's queue)."""
    for _ in range(5):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(50)]
    torch.cuda.synchronize()
    _spin(torch, dev, 0.05)
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1000


def sync_debug_said(torch, cases) -> dict:
    """{what: "ok" | "SYNC: <error>"} for each (what, fn) run under set_sync_debug_mode("error")."""
    said = {}
    for what, fn in cases:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            said[what] = "ok"
        except RuntimeError as e:
            said[what] = f"SYNC: {str(e)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return said


def _owned(dev, name="gpu_check"):
    import torch.distributed as dist

    from esper_gate._transport import OwnedTransport

    store = dist.HashStore()
    return OwnedTransport(store, 0, 1, dev, time.monotonic() + 60, name, timeout=datetime.timedelta(seconds=60))


def _one_rank_group(backend="nccl", env=None):
    """A one-rank default process group on a TCPStore (the job's store)."""
    import torch.distributed as dist

    os.environ.update(env or {})
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True, timeout=datetime.timedelta(seconds=60))
    kw = {"device_id": _device()} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                            **kw)
    return store


def case_owned_transport(args):
    import torch

    from esper_gate import GateError

    dev = _device()
    t = _owned(dev)
    want = _want()
    # Made before any spin: torch.tensor(list, device=cuda) copies from pageable memory,
    # which waits for the stream.
    p = _prepared(dev)
    got = []
    for seq in (1, 2, 3):
        d, _, _ = t.sync(p, seq, "unanimous")
        got.append(d.tolist())
    # DONE advances on the device; this thread only reads mapped host memory.
    torch.cuda.synchronize()
    _spin(torch, dev, 0.2)  # the next call's decode runs ~200 ms from now
    d, _, _ = t.sync(p, 4, "unanimous")
    seen_before = t.completed_seq()
    t0 = time.monotonic()
    polls = 0
    while t.completed_seq() != 4 and time.monotonic() - t0 < 10:
        polls += 1
        time.sleep(0.001)
    done_s = time.monotonic() - t0
    advanced = seen_before == 3 and t.completed_seq() == 4
    # invalidate: the next call's decisions read false (a host write, no CUDA call)
    t.invalidate()
    d_inv, _, decoded_inv = t.sync(p, 5, "unanimous")
    t.revalidate()
    d_re, _, _ = t.sync(p, 6, "unanimous")
    inv, re, dec_inv = d_inv.tolist(), d_re.tolist(), decoded_inv.tolist()
    failed_before = t.failed()
    t.abort()
    failed_after = t.failed()
    try:
        t.sync(p, 7, "unanimous")
        refused = "no error"
    except GateError as e:
        refused = str(e)
    t.close()
    ok = (all(g == want for g in got) and d.tolist() == want and advanced and inv == [False] * 4 and re == want
          and dec_inv == want and not failed_before and failed_after and "aborted" in refused)
    return ok, (f"3 calls {'= reference' if all(g == want for g in got) else got} {want}; DONE {seen_before} "
                f"right after call 4's enqueue, 4 after {done_s * 1000:.0f} ms of {polls} host reads"
                f"{'' if advanced else ' (WRONG)'}; invalidated call {inv} (decode's own {dec_inv}), revalidated {re}; failed() "
                f"{failed_before} -> {failed_after} after abort; next call: {refused[:80]}")


def forced_gate(dev, owned=None):
    """GateSync(4) on the one-rank default group, its parent forced to that group: a group of
    one otherwise decides locally (_group.parent_group), and NCCL cannot put a second rank on
    the one GPU. So the whole distributed path runs (rendezvous, watcher, verdict, the owned
    transport). ``owned``: a module with _nccl's interface (the CPU test double in tests)."""
    import torch.distributed as dist

    import esper_gate
    from esper_gate import gate_sync

    gate_sync.parent_group = lambda group=None: dist.group.WORLD
    return esper_gate.GateSync(4, device=dev, timeout=datetime.timedelta(seconds=30), _owned=owned)


def case_gate_sync_owned(args):
    import torch

    dev = _device()
    _one_rank_group("gloo")  # the gate makes its own NCCL communicator; the job's group may be anything
    gs = forced_gate(dev)
    want = _want()
    results = []
    for _ in range(3):
        r = gs(*_inputs(dev))
        results.append(r.decisions.tolist())
    transport = type(gs._transport).__name__
    torch.cuda.synchronize()
    gs.close()
    import torch.distributed as dist

    dist.destroy_process_group()
    ok = transport == "OwnedTransport" and gs.transport == "owned" and all(x == want for x in results)
    return ok, f"transport {transport}, 3 calls' decisions {results[-1]} (reference {want}), all equal {ok}"


def case_no_host_sync(args):
    import torch
    import torch.distributed as dist

    import esper_gate

    dev = _device()
    _one_rank_group("nccl")
    name = dist.group.WORLD.group_name
    t = _owned(dev, "gpu_check_sync")
    local = esper_gate.GateSync(4, device=dev)
    v, s, tg = _inputs(dev)
    # warm every path (first NCCL collective connects; kernels load)
    torch.ops.esper_gate.sync(v, s, tg, 1, 77, "unanimous", name)
    t.sync(_prepared(dev), 1, "unanimous")
    local(v, s, tg).decisions.tolist()
    p = _prepared(dev)
    torch.cuda.synchronize()
    said = sync_debug_said(torch, (
        ("raw op", lambda: torch.ops.esper_gate.sync(v, s, tg, 2, 77, "unanimous", name)),
        ("OwnedTransport.sync", lambda: t.sync(p, 2, "unanimous")),
        ("GateSync (local) call + decisions", lambda: local(v, s, tg).decisions)))
    # the owned GateSync (forced parent, as in gate_sync_owned), its call and decisions
    try:
        gs = forced_gate(dev)
        gs(v, s, tg).decisions.tolist()  # a first call outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gs(v, s, tg).decisions
            said["GateSync (owned) call + decisions"] = "ok"
        except RuntimeError as e:
            said["GateSync (owned) call + decisions"] = f"SYNC: {str(e)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        gs.close()
    except Exception as e:  # noqa: BLE001
        said["GateSync (owned) call + decisions"] = f"ERROR {type(e).__name__}: {str(e)[:120]}"
    torch.cuda.synchronize()
    t.close()
    dist.destroy_process_group()
    ok = all(x == "ok" for x in said.values())
    return ok, "; ".join(f"{k}: {x}" for k, x in said.items())


def _host_us(fn, n=100):
    # n calls of ~5 kernels stay under CUDA's pending-launch queue (about 1,000 per stream),
    # which would block the host once full
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def case_enqueue(args):
    import torch
    import torch.distributed as dist

    dev = _device()
    _one_rank_group("nccl")
    name = dist.group.WORLD.group_name
    t = _owned(dev, "gpu_check_enqueue")
    v, s, tg = _inputs(dev)
    p = _prepared(dev)
    for i in range(20):
        torch.ops.esper_gate.sync(v, s, tg, i, 77, "unanimous", name)
        t.sync(p, i, "unanimous")
    torch.cuda.synchronize()
    _spin(torch, dev, 0.05)  # the calls queue behind a spin: the host times only their enqueue
    raw = _host_us(lambda: torch.ops.esper_gate.sync(v, s, tg, 5, 77, "unanimous", name))
    torch.cuda.synchronize()
    _spin(torch, dev, 0.05)
    owned = _host_us(lambda: t.sync(p, 5, "unanimous"))
    torch.cuda.synchronize()
    t.close()
    dist.destroy_process_group()
    met = "met" if raw <= 30 else "MISSED"
    return raw <= 30, (f"host enqueue of one sync, S=4, median of 100: raw op {raw:.1f} us (target <= 30 us: {met}); "
                       f"OwnedTransport.sync {owned:.1f} us")


def case_kernels(args):
    import torch

    import esper_gate

    dev = _device()
    rows = []
    for slots in (1, 64, 256, 1024):
        v = torch.tensor([i % 3 != 0 for i in range(slots)], device=dev)
        st = torch.full((slots,), 3, dtype=torch.int64, device=dev)
        tg = torch.full((slots,), 4, dtype=torch.int64, device=dev)
        for world in (1, 4, 64):
            buf = esper_gate.pack(v, st, tg, 1, 7, "unanimous", 0, world)
            cost = {}
            for what, fn in (("pack", lambda: esper_gate.pack(v, st, tg, 1, 7, "unanimous", 0, world)),
                             ("decode", lambda: esper_gate.decode(buf, slots, world, "unanimous"))):
                cost[what] = _kernel_us(torch, dev, fn)
            rows.append(f"S={slots} W={world} ({buf.numel()} words): pack {cost['pack']:.1f} us, "
                        f"decode {cost['decode']:.1f} us")
            big = cost  # the last: S=1024, W=64
    met = "met" if max(big.values()) <= KERNEL_GOAL_US else "MISSED"
    return True, (f"S=1024 W=64: pack {big['pack']:.1f} us, decode {big['decode']:.1f} us (goal <= "
                  f"{KERNEL_GOAL_US:.0f} us each: {met}). GPU time per kernel (CUDA events, queued behind a spin, "
                  f"median of 50): " + "; ".join(rows))


def case_wire_growth(args):
    import torch

    import esper_gate

    dev = _device()

    def gpu_us(fn):
        return _kernel_us(torch, dev, fn)

    rows = []
    for slots, world in ((64, 2), (16, 8), (1024, 64)):
        v = torch.tensor([i % 3 != 0 for i in range(slots)], device=dev)
        st = torch.full((slots,), 3, dtype=torch.int64, device=dev)
        tg = torch.full((slots,), 4, dtype=torch.int64, device=dev)
        cells = []
        for slot_state in (False, True):
            extra = (torch.zeros(slots, dtype=torch.int64, device=dev),
                     torch.arange(slots, dtype=torch.int64, device=dev)) if slot_state else (None, None)
            pack = lambda: esper_gate.pack(v, st, tg, 1, 7, "unanimous", 0, world, 0, *extra)  # noqa: E731
            buf = pack()  # decode's work does not depend on the values (as in case_kernels)
            cells.append(f"{'with' if slot_state else 'without'} {buf.numel() * 8} B, pack {gpu_us(pack):.1f} us, "
                         f"decode {gpu_us(lambda: esper_gate.decode(buf, slots, world, 'unanimous')):.1f} us")
        rows.append(f"S={slots} W={world}: " + " / ".join(cells))
    return True, ("the slot state (per-slot policies and digests) on the GPU, kernel times by CUDA events, "
                  "median of 50: " + "; ".join(rows))


def _c10d_child(port, out):
    """The job: a one-rank NCCL world whose gate group (the c10d fallback) is aborted."""
    try:
        import torch
        import torch.distributed as dist

        os.environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] = str(HEARTBEAT_S)
        from esper_gate._group import new_gate_group
        from esper_gate._transport import C10dTransport

        dev = _device()
        store = dist.TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                                device_id=dev)
        group = new_gate_group([0], "nccl", dev, datetime.timedelta(seconds=20), "esper_gate.gpu_check")
        t = C10dTransport(group, "nccl", dev)
        d, _, _ = t.sync(_prepared(dev), 1, "unanimous")
        first = d.tolist()
        x = torch.ones(4, device=dev)
        dist.all_reduce(x)  # the default group works
        torch.cuda.synchronize()
        # C10dTransport.abort logs (never raises) when ProcessGroup.abort fails: catch that here
        failures = []

        class Catch(logging.Handler):
            def emit(self, record):
                failures.append(record.getMessage())

        logging.getLogger("esper_gate").addHandler(Catch(logging.ERROR))
        if not callable(getattr(group, "abort", None)):
            raise RuntimeError(f"this torch's ProcessGroup has no abort(): {type(group)}")
        t.abort()
        if failures:
            raise RuntimeError(f"the gate group's abort failed: {failures}")
        out.put(("aborted", first, time.time()))
        time.sleep(HEARTBEAT_S + WATCH_EXTRA_S + 2)
        y = torch.ones(4, device=dev)
        dist.all_reduce(y)  # the default group still works after the gate group's abort
        torch.cuda.synchronize()
        out.put(("alive", y.tolist(), time.time()))
        dist.destroy_process_group()
        out.put(("done", None, time.time()))
    except BaseException as e:  # noqa: BLE001
        out.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time()))


def case_c10d_fallback(args):
    import torch.distributed as dist

    # the job's store, hosted here so that it outlives the child and can be read
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    env_before = os.environ.get("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC")
    os.environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] = str(HEARTBEAT_S)  # inherited by the child
    child = ctx.Process(target=_c10d_child, args=(port, out))
    child.start()
    if env_before is None:
        os.environ.pop("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC")
    try:
        kind, first, aborted_at = out.get(timeout=90)
    except queue.Empty:
        child.kill()
        return False, f"the child did not reach the abort within 90 s (exit {child.exitcode})"
    if kind != "aborted":
        child.join(10)
        return False, f"child failed before the abort: {first}"
    dump_at = None
    end = aborted_at + HEARTBEAT_S + WATCH_EXTRA_S
    while time.time() < end and child.exitcode is None:
        if dump_at is None and store.check(["exception_dump"]):
            dump_at = time.time() - aborted_at
        time.sleep(0.5)
    watched = time.time() - aborted_at
    if dump_at is None and store.check(["exception_dump"]):
        dump_at = watched
    child.join(30)  # it lives 2 s past the watch, checks its default group, and exits
    if child.is_alive():
        child.kill()
        child.join(5)
        exit_text = "exit hung (killed after 30 s)"
    else:
        exit_text = f"exit {child.exitcode}" + (" (SIGABRT)" if child.exitcode == -signal.SIGABRT else "")
    notes = []
    while True:
        try:
            notes.append(out.get_nowait())
        except queue.Empty:
            break
    kinds = [n[0] for n in notes]
    ok = (dump_at is None and child.exitcode == 0 and "alive" in kinds and "done" in kinds
          and first == _want())
    errors = [n[1] for n in notes if n[0] == "error"]
    return ok, (f"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC={HEARTBEAT_S}: gate group synced {first}, aborted; watched "
                f"{watched:.0f} s: exception_dump key {'never appeared' if dump_at is None else f'AT {dump_at:.1f} s'}"
                f"; child {exit_text}; default group after the watch: "
                f"{'works' if 'alive' in kinds else 'NOT REACHED'}{'; ' + errors[0][:300] if errors else ''}")


def _run_case(name, args, out):
    try:
        ok, figure = globals()[f"case_{name}"](args)
        out.put((name, ok, figure, False))
    except BaseException as e:  # noqa: BLE001
        out.put((name, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", True))


def verdict_word(name: str, ok: bool, broke: bool) -> str:
    """PASS/FAIL for a check; FIGURE for a measurement that ran (a missed target shows in its
    text, never fails the run); FAIL for any case that raised, hung or crashed."""
    if broke:
        return "FAIL"
    if name in FIGURES:
        return "FIGURE"
    return "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=CASES)
    p.add_argument("--case-timeout", type=float, default=60.0, help="per case; c10d_fallback gets 2x")
    args = p.parse_args(argv)
    import torch

    cases = args.only or list(CASES)
    if not torch.cuda.is_available():
        for name in cases:
            print(f"SKIPPED {name}: no GPU visible to torch", flush=True)
        return 3
    ctx = mp.get_context("spawn")
    failed = 0
    for name in cases:
        out = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(name, args, out))
        t0 = time.monotonic()
        proc.start()
        limit = args.case_timeout * (2 if name == "c10d_fallback" else 1)
        try:
            _, ok, figure, broke = out.get(timeout=limit)
        except queue.Empty:
            ok, broke, figure = False, True, f"no result within {limit:.0f} s (hang or crash, exit {proc.exitcode})"
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        elif proc.exitcode not in (0, None) and not broke:
            broke, figure = True, f"{figure}; but the process exited {proc.exitcode}"
        word = verdict_word(name, ok, broke)
        failed += word == "FAIL"
        print(f"{word} {name} ({time.monotonic() - t0:.1f}s): {figure}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
