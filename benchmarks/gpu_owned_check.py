"""GPU-only checks of the gate's own NCCL communicator (esper_gate/_nccl.py), one PASS/FAIL line each.

    python benchmarks/gpu_owned_check.py [--cycles 100] [--only NAME ...] [--double]

Run by benchmarks/gpu_check.sh (step `owned_nccl`). Each case runs in a
process of its own, spawned from here, under a deadline, so a hang or a crash
is one FAIL line with a figure, not the end of the run. A case that cannot
say anything on this machine is SKIPPED with the reason. Exit 0: no FAIL;
1: a FAIL; 3: no GPU visible to torch (every case SKIPPED).

Most cases here run at a world of one, or of two whose rank 1 never
initializes (the init stays pending: the bootstrap waits for rank 1, and its
abort is what is measured). The gate's communicator on NCCL's real path, a
world of two on one GPU, is benchmarks/gpu_world2_check.py.

--double: the dry run on the CPU: init_timeout_abort and cycles on
tests/owned_double.py (the bootstrap root it leaves per pending id
included), every other case SKIPPED.

Cases:
  init_timeout_abort   world 2, rank 1 never joins: init pending for 1 s, abort within 2 s
  stuck_abort_then_new world 2, both ranks on the one GPU in two processes, rank 1 never calls: rank 0's
                       all_reduce is stuck, abort from another thread within 2 s. NCCL refuses two ranks
                       of one host on one GPU ("Duplicate GPU detected", init.cc: same hostHash and
                       busId), so each process gets its own NCCL_HOSTID (getHostHash, misc/utils.cc)
                       and they meet over the socket transport on lo, with NCCL_RUNTIME_CONNECT=0 so
                       the connections are made at init and the all_reduce is enqueued and stuck on
                       the device. If NCCL still refuses, the VARIANT (said in the line): an all_reduce_
                       refused on the failed communicator, then its abort. Then a new world-1
                       communicator all-reduces correctly
  one_context          two GPUs or more: the gate on the last one, the thread's current device left at
                       0 (never made current): after init, all_reduce, abort from another thread and
                       mapped words, a primary context is active on the gate's device only (and
                       nvidia-smi shows one of this process). SKIPPED on one GPU, where the gate's
                       device is the current one and a context on the wrong device cannot show
  cycles               N init/abort cycles (world 2, pending), then N/4 world-1 init/all_reduce/destroy,
                       each phase measured on its own. Each pending unique id leaves NCCL's bootstrap
                       root (a detached thread blocked in accept, and its listening socket) for the
                       process's life (bootstrapCreateRoot, src/bootstrap.cc), so the first phase may
                       grow by at most one thread and one fd per cycle plus a small constant; the
                       healthy phase by the constant alone; GPU memory by < 64 MiB in each
  graph_capture        a user's global-mode torch.cuda.graph capture while another thread issues a gate
                       all_reduce (queued behind a spin, so in flight) and a third polls state(): the
                       capture succeeds and replays correctly (world 1; gpu_world2_check.py repeats it
                       at a world of two, where NCCL's launch thread runs during the capture)
  capture_refused      esper_gate.pack and nccl all_reduce_ under capture raise the clear error
  sync_debug           torch.cuda.set_sync_debug_mode("error") around all_reduce_ and state()
  mapped_words         a kernel-side write through .device is read on .host with no CUDA call
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cycles last: the longest, so that a hang there costs no other case the step's time
CASES = ("init_timeout_abort", "stuck_abort_then_new", "one_context", "graph_capture", "capture_refused",
         "sync_debug", "mapped_words", "cycles")


def _device():
    import torch

    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


# The cases that run on the CPU double too (--double): their code paths, not NCCL's figures.
DOUBLE_CASES = ("init_timeout_abort", "cycles")
_double_store = []


def _owned(args):
    """A case's NCCL module and device: esper_gate._nccl on GPU 0, or (--double) tests/owned_double.py
    on the CPU, which models what these cases meet (a pending init, its bootstrap root thread)."""
    if not getattr(args, "double", False):
        from esper_gate import _nccl

        return _nccl, _device()
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import owned_double

    if not _double_store:
        _double_store.append(dist.HashStore())
    return owned_double, torch.device("cpu")


def _comm(nccl, uid, rank, world, dev):
    if getattr(nccl, "__name__", "") == "owned_double":  # its collectives go through a store
        return nccl.NcclComm(uid, rank, world, dev, store=_double_store[0])
    return nccl.NcclComm(uid, rank, world, dev)


def _world1_comm(nccl, dev, wait_s=30.0):
    comm = _comm(nccl, nccl.unique_id(), 0, 1, dev)
    t0 = time.monotonic()
    while (s := comm.state()) == "pending" and time.monotonic() - t0 < wait_s:
        time.sleep(0.001)
    if s != "ready":
        raise RuntimeError(f"world-1 init did not become ready in {wait_s}s: {s}")
    return comm


def case_init_timeout_abort(args):
    nccl, dev = _owned(args)
    comm = _comm(nccl, nccl.unique_id(), 0, 2, dev)
    t0 = time.monotonic()
    states = set()
    while time.monotonic() - t0 < 1.0:
        states.add(comm.state())
        time.sleep(0.01)
    t1 = time.monotonic()
    comm.abort()
    abort_s = time.monotonic() - t1
    after = comm.state()
    comm.close()
    ok = states == {"pending"} and abort_s < 2.0 and after == "aborted"
    return ok, f"states during 1 s {sorted(states)}, abort {abort_s * 1000:.0f} ms, then {after!r}"


# Two ranks of one GPU as two "hosts" (see stuck_abort_then_new): read by NCCL at its first init in
# the process (ncclGetUniqueId / ncclCommInitRankConfig), so set before any NCCL call.
TWO_HOSTS_ENV = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "NCCL_RUNTIME_CONNECT": "0",
                 "NCCL_MNNVL_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}


def _two_hosts(rank):
    os.environ.update(TWO_HOSTS_ENV)
    os.environ["NCCL_HOSTID"] = f"esper-gate-gpu-check-rank{rank}"


def _silent_peer(uid, ready, release):
    """Rank 1 of a world of 2 on the same GPU: initializes, then never calls."""
    _two_hosts(1)
    from esper_gate import _nccl

    comm = _nccl.NcclComm(uid, 1, 2, _device())
    t0 = time.monotonic()
    while (s := comm.state()) == "pending" and time.monotonic() - t0 < 30:
        time.sleep(0.001)
    ready.put(s)
    release.wait(60)
    comm.abort()
    comm.close()


def case_stuck_abort_then_new(args):
    import torch

    _two_hosts(0)
    from esper_gate import _nccl

    dev = _device()
    uid = _nccl.unique_id()
    ctx = mp.get_context("spawn")
    ready, release = ctx.Queue(), ctx.Event()
    peer = ctx.Process(target=_silent_peer, args=(uid, ready, release), daemon=True)
    peer.start()
    comm = _nccl.NcclComm(uid, 0, 2, dev)
    t0 = time.monotonic()
    while (mine := comm.state()) == "pending" and time.monotonic() - t0 < 30:
        time.sleep(0.001)
    try:
        theirs = ready.get(timeout=30)
    except queue.Empty:
        theirs = "no answer"
    buf = torch.ones(64, dtype=torch.int64, device=dev)
    if mine == "ready" and theirs == "ready":
        # two ranks on one GPU: a real all_reduce that the peer never joins
        how = "two processes on one GPU"
        done = threading.Event()
        err = []

        def start():
            try:
                comm.all_reduce_(buf, enqueue_timeout_s=30)
            except RuntimeError as e:
                err.append(str(e))
            done.set()

        threading.Thread(target=start, daemon=True).start()
        time.sleep(1.0)
        stuck = not torch.cuda.current_stream().query() or not done.is_set()
    else:
        # NCCL refused a second rank on this GPU: the peer never initializes, so the
        # all_reduce is refused (never run unmatched) and the init stays pending
        how = (f"VARIANT, no stuck all_reduce: two ranks on one GPU refused (rank 0 {mine[:160]!r}, rank 1 "
               f"{theirs[:80]!r}): all_reduce_ refused, then abort")
        try:
            comm.all_reduce_(buf)
            stuck = False
        except RuntimeError as e:
            stuck = "not ready" in str(e) or "failed" in str(e)
    t1 = time.monotonic()
    finished = threading.Event()
    threading.Thread(target=lambda: (comm.abort(), finished.set()), daemon=True).start()
    aborted = finished.wait(10)
    abort_s = time.monotonic() - t1
    torch.cuda.synchronize()  # the aborted kernel has ended
    release.set()
    peer.join(15)
    if peer.is_alive():
        peer.kill()
    comm.close()
    new = _world1_comm(_nccl, dev)
    x = torch.arange(8, dtype=torch.int64, device=dev)
    new.all_reduce_(x)
    good = x.tolist() == list(range(8))
    end = new.destroy()
    new.close()
    ok = stuck and aborted and abort_s < 2.0 and good and end == "destroyed"
    where = "on the host (enqueue)" if mine == "ready" and theirs == "ready" and not done.is_set() else ""
    return ok, (f"{how}: stuck {stuck} {where}; abort from another thread {abort_s * 1000:.0f} ms; a new world-1 "
                f"comm all_reduce {'correct' if good else 'WRONG'}, {end}")


def _contexts():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory,gpu_uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split(", ") for line in out.strip().splitlines() if line.strip()]


def _primary_contexts():
    """CUDA devices on which this process's primary context is active (CUDA driver API:
    cuDevicePrimaryCtxGetState), whatever nvidia-smi can see from inside a container."""
    import ctypes

    cu = ctypes.CDLL("libcuda.so.1")
    n = ctypes.c_int(0)
    if cu.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return None
    active = []
    for i in range(n.value):
        d, flags, on = ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_int(0)
        if cu.cuDeviceGet(ctypes.byref(d), i) == 0 and \
                cu.cuDevicePrimaryCtxGetState(d, ctypes.byref(flags), ctypes.byref(on)) == 0 and on.value:
            active.append(i)
    return active


def case_one_context(args):
    import torch

    from esper_gate import _nccl

    count = torch.cuda.device_count()
    if count < 2:
        return None, (f"{count} GPU: the gate's device is the thread's current one, so a context made on the "
                      f"wrong device cannot show (needs two: the gate on the last, the current device left at 0)")
    # Never made current (torch.cuda.set_device would create device 0's context): the thread's
    # current device stays 0, and every context must be on the gate's device alone.
    dev = torch.device("cuda", count - 1)
    comm = _world1_comm(_nccl, dev)
    x = torch.ones(4, dtype=torch.int64, device=dev)
    comm.all_reduce_(x)
    words = _nccl.MappedWords(4, dev)
    stuck = _nccl.NcclComm(_nccl.unique_id(), 0, 2, dev)
    # another thread polls and aborts, as the gate's deadline thread does
    t = threading.Thread(target=lambda: ([stuck.state() for _ in range(100)], stuck.abort()))
    t.start()
    t.join(10)
    torch.cuda.synchronize(dev)
    current = torch.cuda.current_device()
    primary = _primary_contexts()
    try:
        rows = _contexts()
    except Exception as e:  # noqa: BLE001 - no nvidia-smi
        rows, smi = [], f"nvidia-smi failed: {e}"
    else:
        smi = ""
    mine = [c for c in rows if c[0].strip().isdigit() and int(c[0]) == os.getpid()]
    comm.destroy()
    comm.close()
    stuck.close()
    del words
    if mine:
        smi_ok, smi = len(mine) == 1, f"nvidia-smi: {len(mine)} compute context(s) of this pid {mine}"
    else:
        # Another pid namespace (a container) or no listing: nvidia-smi cannot tell this process's
        # contexts from those of other steps; it is reported, not judged.
        smi_ok, smi = True, smi or f"nvidia-smi lists no row of this pid (another pid namespace?): {rows}"
    ok = primary == [dev.index] and smi_ok
    return ok, (f"primary contexts active on devices {primary} (gate's device {dev.index}, the thread's current "
                f"device {current}); {smi}")


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _snapshot(torch, dev):
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
    return (_fds(), len(os.listdir("/proc/self/task")), free)


def _growth(torch, dev, before):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    time.sleep(0.5)  # threads NCCL is still joining
    after = _snapshot(torch, dev)
    return after[0] - before[0], after[1] - before[1], (before[2] - after[2]) / 2**20


# What NCCL can promise over init/abort cycles. A unique id whose peers never join leaves NCCL's
# bootstrap root for the process's life: a detached thread blocked in accept on its listening socket,
# which has no abort flag (bootstrapCreateRoot, src/bootstrap.cc; tests/owned_double.py models it).
# So a pending cycle may keep one thread and one fd; anything beyond that, and any growth of the
# healthy cycles, is a leak. SLACK: helpers NCCL starts lazily, once.
PER_PENDING_ID = 1
SLACK = 8
GPU_MIB = 64


def cycle_bound(kind: str, n: int) -> int:
    """The most threads (and the most fds) ``n`` cycles may leave: one per pending unique id."""
    return (PER_PENDING_ID * n if kind == "pending" else 0) + SLACK


def case_cycles(args):
    import torch

    nccl, dev = _owned(args)

    def pending_then_abort():  # world 2, rank 1 never comes: the deadline's path at construction
        c = _comm(nccl, nccl.unique_id(), 0, 2, dev)
        c.abort()
        c.close()

    def healthy():  # world 1: init, one all_reduce, finalize + destroy
        w = _world1_comm(nccl, dev)
        x = torch.ones(16, dtype=torch.int64, device=dev)
        w.all_reduce_(x)
        w.destroy()
        w.close()

    figures, ok = [], True
    for kind, name, cycle, n in (("pending", "init/abort (pending id)", pending_then_abort, args.cycles),
                                 ("healthy", "init/all_reduce/destroy", healthy, max(args.cycles // 4, 5))):
        for _ in range(3):  # NCCL's and CUDA's one-time state
            cycle()
        before = _snapshot(torch, dev)
        t0 = time.monotonic()
        for _ in range(n):
            cycle()
        took = time.monotonic() - t0
        fds, tasks, mib = _growth(torch, dev, before)
        bound = cycle_bound(kind, n)
        ok &= fds <= bound and tasks <= bound and mib < GPU_MIB
        figures.append(f"{n} x {name} in {took:.1f} s: fds {fds:+d}, OS threads {tasks:+d} (bound {bound}: "
                       f"{PER_PENDING_ID if kind == 'pending' else 0} per cycle + {SLACK}), GPU memory {mib:+.1f} MiB")
    return ok, "; ".join(figures)


def stream_done(torch, seconds: float, stream=None) -> bool:
    """Whether ``stream`` (default: the current one) finished its work within ``seconds``; polls
    with no sync, so that a collective whose peer never came cannot hang the case."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    deadline = time.monotonic() + seconds
    while not stream.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def capture_during_gate_call(torch, comm, dev):
    """A user's global-mode torch.cuda.graph capture while another thread issues ``comm``'s
    all_reduce (queued behind a spin, so in flight) and a third polls state(). At a world of
    two NCCL's launch thread runs during the capture (the peer issues its half). Returns
    (ok, text)."""
    khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 0) or 2_000_000
    stop, capture_on, issued, finish = (threading.Event() for _ in range(4))
    polls = [0]
    errors = []

    def poll():  # the gate's watcher: state() only, no CUDA call
        while not stop.is_set():
            comm.state()
            polls[0] += 1

    buf = torch.ones(1024, dtype=torch.int64, device=dev)  # allocated before: no cudaMalloc during capture
    gate_caller = torch.cuda.Stream()

    def gate_call():  # a gate call made by another thread while the user captures
        try:
            torch.cuda.set_device(dev)
            with torch.cuda.stream(gate_caller):
                capture_on.wait(10)
                torch.cuda._sleep(int(0.3 * khz * 1000))  # the all_reduce stays queued behind ~300 ms
                comm.all_reduce_(buf, enqueue_timeout_s=30)
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))
        issued.set()
        finish.wait(10)

    poller = threading.Thread(target=poll, daemon=True)
    caller = threading.Thread(target=gate_call, daemon=True)
    poller.start()
    caller.start()
    a = torch.zeros(1024, device=dev)
    user = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    captured = "ok"
    try:
        # torch.cuda.graph synchronizes before capture_begin, so the gate call starts inside
        with torch.cuda.graph(g, stream=user):  # capture_error_mode defaults to "global"
            capture_on.set()
            issued.wait(10)
            a.add_(1.0)
    except RuntimeError as e:
        captured = f"capture failed: {e}"
    in_flight = not gate_caller.query()
    finish.set()
    stop.set()
    poller.join(5)
    caller.join(5)
    done = stream_done(torch, 20, gate_caller)
    if not done:
        comm.abort()  # the peer's half never came: end the kernel so that the replay can run
    g.replay()
    torch.cuda.synchronize()
    good = done and buf[0].item() == comm.world and a[0].item() == 1.0
    ok = captured == "ok" and good and not errors
    return ok, (f"global-mode capture {captured} while another thread issued a world-{comm.world} gate all_reduce "
                f"({'still in flight after the capture' if in_flight else 'done before the capture ended'}"
                f"{', error ' + errors[0] if errors else ''}{'' if done else ', STUCK: aborted'}) and "
                f"{polls[0]} state() polls; replay and sum {'correct' if good else 'WRONG'}")


def case_graph_capture(args):
    import torch

    from esper_gate import _nccl

    dev = _device()
    comm = _world1_comm(_nccl, dev)
    ok, text = capture_during_gate_call(torch, comm, dev)
    comm.destroy()
    comm.close()
    return ok, text


def case_capture_refused(args):
    import torch

    import esper_gate
    from esper_gate import _nccl

    dev = _device()
    comm = _world1_comm(_nccl, dev)
    votes = torch.tensor([True, False], device=dev)
    stages = torch.tensor([3, 4], device=dev)
    said = {}
    buf = torch.ones(8, dtype=torch.int64, device=dev)
    for what, fn in (("pack", lambda: esper_gate.pack(votes, stages, stages, 1, 7, "unanimous", 0, 1)),
                     ("all_reduce_", lambda: comm.all_reduce_(buf))):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        try:
            with torch.cuda.graph(g, stream=s):
                fn()
            said[what] = "captured"
        except RuntimeError as e:
            said[what] = str(e)
    torch.cuda.synchronize()
    comm.destroy()
    comm.close()
    ok = ("resend the call number" in said["pack"] and "replay would resend" in said["all_reduce_"])
    return ok, "; ".join(f"{k}: {v[:100]}" for k, v in said.items())


def case_sync_debug(args):
    import torch

    from esper_gate import _nccl

    dev = _device()
    comm = _world1_comm(_nccl, dev)
    buf = torch.ones(8, dtype=torch.int64, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    err = None
    t0 = time.perf_counter()
    try:
        for _ in range(10):
            comm.all_reduce_(buf)
            comm.state()
    except RuntimeError as e:
        err = str(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host_us = (time.perf_counter() - t0) / 10 * 1e6
    torch.cuda.synchronize()
    comm.destroy()
    comm.close()
    return err is None, f"10 all_reduce_ + state(): {'no sync' if err is None else err}, {host_us:.0f} us each on the host"


def case_mapped_words(args):
    import torch

    from esper_gate import _nccl

    dev = _device()
    w = _nccl.MappedWords(4, dev)
    w.host[0] = 7  # host write, no CUDA call
    w.device[1].fill_(w.device[0] + 5)  # a kernel reads it and writes another word
    torch.cuda.synchronize()
    ok = w.host.tolist()[:2] == [7, 12] and w.device.device == dev and not w.host.is_cuda
    return ok, f"host view after the kernel: {w.host.tolist()}"


def _run_case(name, args, out):
    try:
        ok, figure = globals()[f"case_{name}"](args)  # ok None: SKIPPED, with the reason
        out.put((name, ok, figure))
    except BaseException as e:  # noqa: BLE001
        out.put((name, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--only", nargs="*", choices=CASES)
    p.add_argument("--case-timeout", type=float, default=40.0, help="per case; the cycles case gets 2x")
    p.add_argument("--double", action="store_true",
                   help=f"the dry run on the CPU: {', '.join(DOUBLE_CASES)} on tests/owned_double.py, the rest SKIPPED")
    args = p.parse_args(argv)
    import torch

    cases = args.only or list(CASES)
    if args.double:
        for name in [c for c in cases if c not in DOUBLE_CASES]:
            print(f"SKIPPED {name}: the dry run on the CPU double runs {', '.join(DOUBLE_CASES)} only", flush=True)
        cases = [c for c in cases if c in DOUBLE_CASES]
    elif not torch.cuda.is_available():
        for name in cases:
            print(f"SKIPPED {name}: no GPU visible to torch", flush=True)
        return 3
    else:
        from esper_gate import _nccl

        info = _nccl.library_info()
        print(f"NCCL: {info['path']} {info['version']} (torch {info['torch_version']}), usable {info['usable']} "
              f"{info['why']}", flush=True)
    ctx = mp.get_context("spawn")
    failed = 0
    for name in cases:
        out = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(name, args, out))
        t0 = time.monotonic()
        proc.start()
        limit = args.case_timeout * (2 if name == "cycles" else 1)
        try:
            _, ok, figure = out.get(timeout=limit)
        except queue.Empty:
            ok, figure = False, f"no result within {limit:.0f} s (hang or crash, exit {proc.exitcode})"
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        elif proc.exitcode not in (0, None) and ok is not False:
            ok, figure = False, f"{figure}; but the process exited {proc.exitcode}"
        failed += ok is False
        word = "SKIPPED" if ok is None else "PASS" if ok else "FAIL"
        print(f"{word} {name} ({time.monotonic() - t0:.1f}s): {figure}", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
