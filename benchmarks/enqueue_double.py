"""The host's wait while NCCL enqueues one gate all_reduce, on the CPU double.

On a non-blocking communicator every all_reduce of a world of two or more
returns ncclInProgress and is enqueued by NCCL's launch thread; the host must
wait for it before it orders its stream after the collective
(csrc/nccl/nccl_comm.cpp, all_reduce_start_). This measures that wait on the
double (tests/owned_double.py), whose launch reads "in progress" for
``owned_double.LAUNCH_S``, at a world of two (two threads), with the buffer
of a real S=64 call:

* before: the loop the C++ op had (one look, then a fixed 200 us sleep between
  looks), replayed over the double's poll;
* after: ``esper_gate._nccl.wait_enqueued`` (spin, then back off), the code
  both the real NcclComm and the double run.

The figure is the excess: host time of the wait minus the modelled launch.

    python benchmarks/enqueue_double.py [--calls 300] [--launch-us 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import owned_double  # noqa: E402
from esper_gate import ops  # noqa: E402
from esper_gate._nccl import wait_enqueued  # noqa: E402


def old_wait(poll) -> None:
    """The enqueue loop of nccl_all_reduce_ before: look, then sleep 200 us, until enqueued."""
    while poll():
        time.sleep(200e-6)


def measure(wait, calls: int, slots: int) -> list[float]:
    store = dist.HashStore()
    uid = owned_double.unique_id()
    a, b = (owned_double.NcclComm(uid, r, 2, "cpu", store=store) for r in range(2))
    z = torch.zeros(slots, dtype=torch.int64)
    buf = ops.pack(z.bool(), z + 3, z + 4, 1, 7, "unanimous", 0, 2)
    stop = threading.Event()

    def peer():
        for _ in range(calls):
            b.all_reduce_(buf.clone())
    t = threading.Thread(target=peer, daemon=True)
    t.start()
    excess = []
    for _ in range(calls):
        mine = buf.clone()
        t0 = time.perf_counter()
        assert a._start(mine) == 1
        ready_at = a._launch_until
        wait(a._poll)
        excess.append(time.perf_counter() - ready_at)
        a._idle.wait(10)
    stop.set()
    t.join(10)
    return excess


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--launch-us", type=float, default=owned_double.LAUNCH_S * 1e6)
    args = p.parse_args(argv)
    owned_double.LAUNCH_S = args.launch_us * 1e-6
    rows = []
    for name, wait in (("before: look, sleep 200 us", old_wait), ("after: wait_enqueued", wait_enqueued)):
        ex = sorted(x * 1e6 for x in measure(wait, args.calls, args.slots))
        rows.append((name, statistics.median(ex), ex[int(0.9 * len(ex))], ex[-1]))
    print(f"enqueue wait on the double, world 2, S={args.slots}, modelled launch {args.launch_us:.0f} us, "
          f"{args.calls} calls; excess = host wait - launch (us)")
    print(f"| policy | median | p90 | max |\n|---|---|---|---|")
    for name, med, p90, mx in rows:
        print(f"| {name} | {med:.1f} | {p90:.1f} | {mx:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
