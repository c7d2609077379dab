"""A process-group backend that fails the way NCCL does, for machines without GPUs.

When a peer never joins a collective, NCCL neither raises nor times out in
the caller: the collective is accepted and stays pending until the group is
aborted, and once the group's timeout passes, its watchdog ends the process
with SIGABRT (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the default in 2.14). gloo,
the only backend CI has, instead raises in the caller at its timeout, which
hides every bug of the NCCL failure path.

This backend gives a CPU group NCCL's semantics. The reduction itself runs
on an inner gloo group whose own timeout is far away (``INNER_TIMEOUT``):

* ``allreduce`` returns a work at once; its ``wait()`` returns when the inner
  all_reduce is done, raises once the group is aborted, and otherwise waits.
  A peer that dies leaves the collective pending, as on NCCL over NVLink,
  where nothing notices a dead peer (gloo would raise at once);
* a watchdog thread prints one line and calls ``os.abort()`` when a
  collective is still pending at the group's timeout, as NCCL's does.

Register it in each rank before creating a group: ``register()``, then
``dist.new_group(..., backend=BACKEND)``.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _CBackend
from torch._C._distributed_c10d import Work as _CWork
from torch.futures import Future

BACKEND = "abortable"
INNER_TIMEOUT = datetime.timedelta(minutes=10)
_WATCHDOG_POLL_S = 0.05


class AbortedError(RuntimeError):
    pass


class _PendingWork(_CWork):
    def __init__(self, backend: "AbortableBackend", inner, tensors):
        super().__init__()
        self._backend = backend
        self._inner = inner
        self._tensors = tensors
        self.started = time.monotonic()
        self.done = False

    def _finished(self) -> bool:
        if self.done:
            return True
        if self._inner.is_completed():
            try:
                self._inner.wait()
            except Exception:  # noqa: BLE001 - a dead peer: pending until aborted
                return False
            self.done = True
        return self.done

    def wait(self, timeout=None):  # noqa: ARG002 - like NCCL, no timeout of its own here
        while not self._finished():
            if self._backend.aborted.is_set():
                raise AbortedError(f"{BACKEND}: the collective was aborted with its process group "
                                   f"(rank {self._backend.rank()} of {self._backend.size()})")
            time.sleep(0.001)
        return True

    def get_future(self):
        self.wait()
        fut = Future()
        fut.set_result(self._tensors)
        return fut


class AbortableBackend(_CBackend):
    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta):
        super().__init__(rank, size)
        self._inner = dist.ProcessGroupGloo(store, rank, size, INNER_TIMEOUT)
        self._timeout_s = timeout.total_seconds()
        self.aborted = threading.Event()
        self._pending: list[_PendingWork] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._watchdog, name=f"{BACKEND}-watchdog", daemon=True).start()

    def allreduce(self, tensors, opts):
        if self.aborted.is_set():
            raise AbortedError(f"{BACKEND}: the process group was aborted")
        work = _PendingWork(self, self._inner.allreduce(tensors, opts), tensors)
        with self._lock:
            self._pending.append(work)
        return work

    def _watchdog(self) -> None:
        while not self.aborted.wait(_WATCHDOG_POLL_S):
            now = time.monotonic()
            with self._lock:
                self._pending = [w for w in self._pending if not w._finished()]
                late = [w for w in self._pending if now - w.started > self._timeout_s]
            if late:
                print(f"[{BACKEND} watchdog] rank {self.rank()}: a collective is still pending after the "
                      f"group timeout of {self._timeout_s:.1f} s; aborting the process, as NCCL's "
                      f"watchdog does", file=sys.stderr, flush=True)
                os.abort()

    def abort(self):
        self.aborted.set()

    def shutdown(self):
        self.aborted.set()

    def getBackendName(self):
        return BACKEND


def _create(opts, _backend_options):
    return AbortableBackend(opts.store, opts.group_rank, opts.group_size, opts.timeout)


def supported() -> str | None:
    """None when this torch can define a backend in Python, else why not.

    The Python trampoline for c10d's Backend got a constructor in torch 2.14;
    before that, subclassing it fails with "No constructor defined".
    """
    class _Probe(_CBackend):
        pass

    try:
        _Probe(0, 1)
    except TypeError as e:
        return f"torch {torch.__version__} cannot define a process-group backend in Python ({e})"
    return None


def register() -> None:
    """Make ``BACKEND`` available to ``dist.new_group`` in this process (idempotent)."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])


def _self_check() -> None:  # pragma: no cover - a manual smoke test: python tests/nccl_like.py
    register()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    g = dist.new_group([0], backend=BACKEND)
    t = torch.ones(2)
    dist.all_reduce(t, group=g)
    print("ok", t.tolist())


if __name__ == "__main__":
    _self_check()
