"""Run a function on W local ranks (spawned processes) under a hard deadline.

Used by the demo, the benchmark and the tests. Every rank's return value or exception
comes back to the parent; ranks still alive at the deadline are killed, so a
hang costs one bounded wait, never the whole run. Ranks leave together (rank 0
hosts the store that the others may still be reading when it finishes).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(rank, world, port, port_ready, timeout: datetime.timedelta):
    """The job's TCPStore: rank 0 binds a port the system picks and passes it on; the others
    connect to it. (A port picked in the parent and bound later by rank 0 could be taken in
    between by another process: seen once as EADDRINUSE in a loaded CI run.)"""
    import torch.distributed as dist

    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        port.value = store.port
        port_ready.set()
        return store
    if not port_ready.wait(timeout=timeout.total_seconds()):
        raise TimeoutError(f"rank 0 did not start the job's store within {timeout.total_seconds():.0f} s")
    return dist.TCPStore("127.0.0.1", port.value, world, is_master=False, timeout=timeout)


def _entry(fn, rank, world, port, port_ready, backend, pg_timeout_s, args, out, release):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        dist.init_process_group(backend, store=_store(rank, world, port, port_ready, timeout), rank=rank,
                                world_size=world, timeout=timeout)
        out.put(RankResult(rank, value=fn(rank, world, *args)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            out.put(RankResult(rank, error=e, error_type=type(e).__name__, traceback=tb))
        except Exception:  # an exception that does not pickle
            out.put(RankResult(rank, error=RuntimeError(repr(e)), error_type=type(e).__name__, traceback=tb))
    finally:
        release.wait(timeout=60)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def release_and_reap(procs, release, join_s: float = 5.0) -> None:
    """Let the ranks leave together, then kill whatever has not exited."""
    release.set()
    for p in procs:
        p.join(timeout=join_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def spawn_ranks(fn: Callable, world: int, *args, backend: str = "gloo", timeout: float = 300.0,
                pg_timeout_s: float = 60.0, expect_dead: tuple[int, ...] = ()) -> list[RankResult]:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned ranks; return every rank's result.

    Ranks in ``expect_dead`` may die without reporting (a test kills them).
    Raises TimeoutError when another rank has not reported by ``timeout``
    and RuntimeError when one exited without reporting.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    release = ctx.Event()
    port, port_ready = ctx.Value("i", 0), ctx.Event()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, port_ready, backend, pg_timeout_s, args, out,
                                              release), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world - len(expect_dead):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(results) - set(expect_dead))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (hang)")
            try:
                r = out.get(timeout=min(left, 0.5))
                results[r.rank] = r
            except queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and i not in results and i not in expect_dead]
                if dead:
                    try:  # it may have reported just before exiting
                        r = out.get(timeout=1.0)
                        results[r.rank] = r
                    except queue.Empty:
                        raise RuntimeError(f"ranks {dead} exited without reporting "
                                           f"(exit codes {[procs[i].exitcode for i in dead]})") from None
    finally:
        release_and_reap(procs, release)
    return [results.get(r, RankResult(r, error=RuntimeError("died"), error_type="died")) for r in range(world)]


def values(results: list[RankResult]) -> list[Any]:
    """The ranks' return values; raise with the first failing rank's traceback."""
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"rank {r.rank} raised {r.error_type}: {r.error}\n{r.traceback}")
    return [r.value for r in results]
