"""A CPU test double of the gate's own NCCL communicator (esper_gate/_nccl.py's interface).

It fails the way NCCL does, so the owned transport's failure path runs in CI:

* ``NcclComm(...)`` returns at once (ncclCommInitRankConfig with
  ``blocking = 0``): the rank publishes that it initialized, and ``state()``
  stays "pending" until every rank has;
* ``all_reduce_`` goes through the job's store: each rank writes its buffer
  under a per-communicator, per-operation key and waits in short polls for
  the others' (then sums). A peer that never calls leaves it waiting: nothing
  in here times out by itself;
* ``abort()`` makes a waiting ``all_reduce_`` raise at once, and ``state()``
  say "aborted", as _nccl.NcclComm does after ncclCommAbort; a store request
  that fails (the store's host died: a broken connection) makes ``state()``
  report "error: ..." (ncclCommGetAsyncError) and the collective raise.

GateSync takes it as ``GateSync(..., _owned=owned_double)``; spawned ranks
import it by name (tests/ is on their path).
"""
from __future__ import annotations

import os
import threading
import time

import torch

POLL_S = 0.002
UID_BYTES = 128


class AbortedError(RuntimeError):
    pass


def unique_id() -> bytes:
    return os.urandom(UID_BYTES)


def check_library() -> None:
    pass


class MappedWords:
    """On the CPU the host and the device word are the same memory."""

    def __init__(self, n: int, device):
        if torch.device(device).type != "cpu":
            raise ValueError(f"owned_double.MappedWords: the double runs on the CPU, got device {device}")
        self.host = torch.zeros(n, dtype=torch.int64)
        self.device = self.host


def _default_store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


# Every communicator made in this process (tests look at them).
made: list["NcclComm"] = []


class NcclComm:
    def __init__(self, unique_id: bytes, rank: int, world: int, device, store=None):
        import torch.distributed as dist

        if len(unique_id) != UID_BYTES:
            raise ValueError(f"owned_double.NcclComm: unique_id must be {UID_BYTES} bytes, got {len(unique_id)}")
        self.rank, self.world = rank, world
        base = store if store is not None else _default_store()
        self._store = dist.PrefixStore(f"owned_double/{bytes(unique_id)[:8].hex()}/", base)
        self._aborted = threading.Event()
        self._error: str | None = None
        self._ready = False
        self._op = 0
        self.calls: list[str] = []  # what was called, in order (tests look at it)
        self._guard(lambda: self._store.set(f"init/{rank}", "1"))
        made.append(self)

    def _guard(self, request):
        try:
            return request()
        except Exception as e:
            if self._error is None:
                self._error = f"store: {type(e).__name__}: {str(e).strip()[:200]}"
            raise

    def state(self) -> str:
        if self._aborted.is_set():
            return "aborted"
        if self._error is not None:
            return f"error: {self._error}"
        if not self._ready:
            try:
                self._ready = self._guard(lambda: self._store.check([f"init/{r}" for r in range(self.world)]))
            except Exception:  # noqa: BLE001 - state() reports it
                return f"error: {self._error}"
        return "ready" if self._ready else "pending"

    def all_reduce_(self, buf: torch.Tensor) -> None:
        self.calls.append("all_reduce_")
        if self._aborted.is_set():
            raise AbortedError(f"owned_double: the communicator of rank {self.rank} was aborted")
        op = self._op
        self._op += 1
        keys = [f"op/{op}/{r}" for r in range(self.world)]
        self._guard(lambda: self._store.set(keys[self.rank], buf.numpy().tobytes()))
        while True:
            if self._aborted.is_set():
                raise AbortedError(f"owned_double: the collective was aborted on rank {self.rank} (op {op})")
            if self._guard(lambda: self._store.check(keys)):
                break
            time.sleep(POLL_S)
        total = torch.zeros_like(buf)
        for k in keys:
            total += torch.frombuffer(bytearray(self._guard(lambda k=k: self._store.get(k))), dtype=buf.dtype)
        buf.copy_(total)

    def abort(self) -> None:
        self.calls.append("abort")
        self._aborted.set()

    def destroy(self) -> None:
        self.calls.append("destroy")

    def close(self) -> None:
        self.calls.append("close")
