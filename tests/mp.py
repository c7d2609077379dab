"""Run a function on W real ranks (spawned processes, gloo) with a hard deadline.

Every rank's return value or exception comes back to the test. Ranks that
are still alive at the deadline are killed, so a hang fails one test with a
clear message instead of freezing the run.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: BaseException | None = None
    error_type: str | None = None
    traceback: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, backend, pg_timeout_s, args, out):
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world, *args)
        out.put(RankResult(rank, value=value))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the test
        try:
            out.put(RankResult(rank, error=e, error_type=type(e).__name__, traceback=traceback.format_exc()))
        except Exception:  # unpicklable exception
            out.put(RankResult(rank, error=RuntimeError(repr(e)), error_type=type(e).__name__,
                               traceback=traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn: Callable, world: int, *args, timeout: float = 60.0, backend: str = "gloo",
              pg_timeout_s: float = 30.0, expect_dead: tuple[int, ...] = ()) -> list[RankResult]:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned ranks; return their results.

    Ranks in ``expect_dead`` may die without reporting (the test kills them).
    A rank that neither reports nor exits by ``timeout`` raises TimeoutError.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, backend, pg_timeout_s, args, out),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) < world - len(expect_dead):
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                missing = sorted(set(range(world)) - set(results) - set(expect_dead))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hang)")
            try:
                r = out.get(timeout=min(left, 0.5))
                results[r.rank] = r
            except queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and i not in results and i not in expect_dead]
                if dead:
                    # give the queue a moment: a rank may have reported just before exiting
                    try:
                        r = out.get(timeout=1.0)
                        results[r.rank] = r
                        continue
                    except queue.Empty:
                        raise RuntimeError(f"ranks {dead} exited without reporting "
                                           f"(exit codes {[procs[i].exitcode for i in dead]})")
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results.get(r, RankResult(r, error=RuntimeError("died"), error_type="died")) for r in range(world)]


def values(results: list[RankResult]) -> list[Any]:
    """The ranks' return values; re-raise the first rank error with its traceback."""
    for r in results:
        if r.error is not None:
            raise AssertionError(f"rank {r.rank} raised {r.error_type}: {r.error}\n{r.traceback}")
    return [r.value for r in results]
