"""Transports: how one gate call's packed buffer meets the other ranks.

What a gate needs from a transport (``Transport`` below says it as a
protocol): run a prepared call's pack, collective and decode and return
``(decisions, report)``; say, with no CUDA call, how far its calls have
completed and whether the communicator failed; make a call's decisions read
false with no CUDA call (``invalidate``); abort a stuck collective; be
closed.

* ``OwnedTransport``: the gate's own communicator (the NCCL communicator of
  ``esper_gate._nccl``, or a test double with its interface), used for every
  CUDA gate. No c10d work, watchdog or heartbeat monitor is involved.
* ``C10dTransport``: ``torch.ops.esper_gate.sync`` on a dedicated c10d group:
  gloo for CPU gates, and ProcessGroupNCCL only as the opt-in fallback
  (``GateSync(transport="c10d")``).
* ``LocalTransport``: a world of one, no collective.
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Protocol

import torch

from . import ops
from ._group import free_gate_group, not_started_error, self_timing
from ._inputs import Prepared, timeout_text
from .errors import GateError, GateTimeoutError

__all__ = ["Transport", "C10dTransport", "LocalTransport", "OwnedTransport", "mapped_words"]

log = logging.getLogger("esper_gate")

# The two host-mapped words of a CUDA gate (MappedWords): decode's decisions are
# and-ed with VALID on the device, and the last completed call is written to
# DONE on the device after decode; the host reads and writes both with no CUDA call.
#
# The and-ing writes a new tensor and leaves decode's own: the device-side
# decisions read false once a call was invalidated, but a rank whose deadline
# passed just as its collective completed, and whose claim then lost to a
# peer's "completed" (FailurePath.expire: revalidate), must still read the
# call's decisions on the host like every other rank. Host reads take decode's
# tensor after the verdict, so they cannot split there.
VALID, DONE = 0, 1
# How often construction polls a non-blocking communicator's state.
INIT_POLL_S = 0.005


class Transport(Protocol):
    name: str | None
    self_timing: bool  # raises in the caller at its own timeout (gloo): abort is a no-op
    abort_what: str    # what abort() is, for an error that says it has not returned

    # (decisions for the device, the report, decode's own decisions for host reads after the
    # verdict, or None where nothing masks them)
    def sync(self, p: Prepared, seq: int, policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...
    def completed_seq(self) -> int | None: ...   # last call completed on the device; None: unknown
    def failed(self) -> bool: ...                # the communicator reports an error (no CUDA call)
    def invalidate(self) -> None: ...            # decisions read false from here on (no CUDA call)
    def revalidate(self) -> None: ...            # undo invalidate (a peer completed the call)
    def void(self) -> bool: ...                  # invalidated (not restored) or aborted: no host reads
    def abort(self) -> None: ...
    def close(self) -> None: ...


def mapped_words(device: torch.device, nccl=None):
    """Two host-mapped int64 words on ``device`` (VALID = 1, DONE = -1), from ``_nccl.MappedWords``
    (or ``nccl``'s, a test double), for the transports of CUDA gates."""
    if nccl is None:
        from . import _nccl as nccl  # built with the CUDA extension only
    words = nccl.MappedWords(2, device)
    words.host[VALID] = 1
    words.host[DONE] = -1  # no call completed yet, not even construction's warm-up (call 0)
    return words


def mark_done(words, seq: int) -> None:
    """On the device, after decode: DONE = ``seq`` where VALID still holds, else DONE stays.

    An aborted collective's kernel exits and the stream runs on (NCCL), so
    this write runs after an abort too; a plain ``fill_(seq)`` there made the
    failed call read as completed (the watcher's heartbeat and the error's
    "last call completed" said so). VALID is 0 or 1:
    DONE += VALID * (seq - DONE), two kernels, no host sync."""
    d = words.device
    d[DONE:DONE + 1].addcmul_(d[VALID:VALID + 1], torch.rsub(d[DONE:DONE + 1], seq))


def _broken(state: str) -> bool:
    """An NcclComm state that no call can succeed on: "error: <NCCL's text>" (ncclCommGetAsyncError),
    "aborted" or "destroyed" ("pending" is an init or enqueue in progress)."""
    return state.startswith("error") or state in ("aborted", "destroyed")


class LocalTransport:
    """A world of one: pack and decode here, no collective."""

    name = None
    self_timing = True
    abort_what = "abort"

    def sync(self, p: Prepared, seq: int, policy: str):
        buf = ops.pack(p.votes, p.stages, p.targets, seq, p.site, policy, 0, 1, p.poison, p.policies, p.digests)
        decision, report = ops.decode(buf, p.votes.shape[0], 1, policy)
        return decision, report, None

    def completed_seq(self) -> int | None:
        return None

    def failed(self) -> bool:
        return False

    def invalidate(self) -> None:
        pass

    def revalidate(self) -> None:
        pass

    def void(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class C10dTransport:
    """Gate calls on a dedicated c10d process group.

    On CUDA (the ProcessGroupNCCL fallback) every call's decisions are and-ed
    with a host-mapped word that ``invalidate`` clears from the host (no CUDA
    call, so nothing waits behind a stuck stream), and the call number is
    written to a second mapped word after decode, which the watcher reads
    instead of querying a CUDA event.
    """

    abort_what = "process group abort"

    def __init__(self, group, backend: str, device: torch.device, words=None):
        self.group = group
        self.name = group.group_name
        self.device = device
        # gloo raises in the caller at its own timeout; other backends must be aborted.
        self.self_timing = self_timing(backend, device)
        self._words = words if words is not None or device.type != "cuda" else mapped_words(device)

    def sync(self, p: Prepared, seq: int, policy: str):
        args = (p.votes, p.stages, p.targets, seq, p.site, policy, self.name, p.poison, p.policies, p.digests)
        if self._words is None:
            decision, report = torch.ops.esper_gate.sync.default(*args)
            return decision, report, None
        # The gate device's current stream, whatever the thread's current device is
        # (ProcessGroupNCCL orders its stream after the caller's current stream).
        with torch.cuda.device(self.device):
            decoded, report = torch.ops.esper_gate.sync.default(*args)
            decision = torch.logical_and(decoded, self._words.device[VALID])
            mark_done(self._words, seq)
        return decision, report, decoded

    def completed_seq(self) -> int | None:
        return None if self._words is None else int(self._words.host[DONE])

    def failed(self) -> bool:
        """Whether the backend reports an error on the group (NCCL's watchdog aborted it).
        ProcessGroupNCCL::getError reads a field under a mutex: no CUDA call. False when it
        cannot tell."""
        if self.group is None:
            return False
        try:
            from torch._C._distributed_c10d import ErrorType

            return self.group._get_backend(self.device).get_error() != ErrorType.SUCCESS
        except Exception:  # noqa: BLE001 - a backend without error reporting
            return False

    def invalidate(self) -> None:
        """Make every CUDA call's decisions read false from here on: a host write to mapped
        memory, no CUDA call and no stream to wait behind (decode's and-ing reads it on the GPU)."""
        if self._words is not None:
            self._words.host[VALID] = 0

    def revalidate(self) -> None:
        if self._words is not None:
            self._words.host[VALID] = 1

    def void(self) -> bool:
        return self._words is not None and int(self._words.host[VALID]) == 0

    def abort(self) -> None:
        """Stop a stuck collective (nothing to do where the backend times out by itself).
        ProcessGroup.abort -> ProcessGroupNCCL::abort -> ncclCommAbort on its communicators."""
        if self.self_timing or self.group is None:
            return
        try:
            if self.device.type == "cuda":
                # this thread's first CUDA call: on the gate's device, not on device 0
                with torch.cuda.device(self.device):
                    self.group.abort()
            else:
                self.group.abort()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: aborting the gate's process group failed")

    def close(self) -> None:
        """Free the group: its name, threads, sockets and communicator (its name is never reused)."""
        group, self.group = self.group, None
        if group is None:
            return
        try:
            free_gate_group(group)
        except Exception:  # noqa: BLE001 - already gone with the job's teardown
            pass


class OwnedTransport:
    """Gate calls on the gate's own communicator (``_nccl.NcclComm`` or a double of it).

    Construction (every rank of the gate, after the rendezvous met them):
    rank 0 makes the unique id (ncclGetUniqueId) and publishes it under the
    gate's store prefix; every rank starts a non-blocking init
    (ncclCommInitRankConfig with ``blocking = 0``: it returns at once) and
    publishes that it did; then polls ``state()`` (ncclCommGetAsyncError)
    until the communicator is ready, at most until ``deadline``. A rank that
    never started its init is named on the others in a GateTimeoutError.

    A call packs on the caller's stream, all-reduces (SUM, int64; the
    communicator orders its stream after the caller's and back), decodes,
    ands the decisions with the mapped VALID word and writes the call number
    to the mapped DONE word on the device where VALID still holds, which the
    watcher reads on the host. On the CPU double ``all_reduce_`` returns when
    the (modelled) device work ran, or exited on an abort, as on a GPU.

    Args:
        store: the gate's prefix store (the rendezvous's).
        rank, world: this rank in the gate's group and its size.
        device: the gate's device.
        deadline: ``time.monotonic()`` by which the communicator must be ready.
        nccl: the module with ``unique_id``, ``NcclComm`` and ``MappedWords`` (default
            ``esper_gate._nccl``; tests pass ``tests/owned_double.py``).
    """

    self_timing = False
    abort_what = "NCCL abort"

    def __init__(self, store, rank: int, world: int, device: torch.device, deadline: float, name: str,
                 nccl=None, timeout: datetime.timedelta | None = None):
        from . import _nccl as real  # importable in every build

        real.check_blocking_env()  # NCCL_COMM_BLOCKING=1 would make every wait unbounded: GateConfigError
        if nccl is None:
            nccl = real
            nccl.check_library()  # no NCCL, two copies, or one older than the gate needs: GateConfigError
        self.name = name
        self.rank, self.world, self.device = rank, world, device
        self._store = store
        self._aborted = False
        self.comm = None
        timeout_s = timeout.total_seconds() if timeout is not None else max(deadline - time.monotonic(), 0.0)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        uid = self._unique_id(nccl, deadline)
        self.comm = nccl.NcclComm(uid, rank, world, device)
        store.set(f"owned/started/{rank}", "1")
        self._words = mapped_words(device, nccl)
        self._wait_ready(deadline)

    def _unique_id(self, nccl, deadline: float) -> bytes:
        key = "owned/uid"
        if self.rank == 0:
            uid = bytes(nccl.unique_id())
            self._store.set(key, uid)
            return uid
        left = deadline - time.monotonic()
        try:
            self._store.wait([key], datetime.timedelta(seconds=max(left, 0.001)))
        except Exception as e:  # noqa: BLE001 - a timeout, or no store
            raise GateTimeoutError(
                f"GateSync construction: rank 0 did not publish the gate communicator's unique id within "
                f"{timeout_text(self._timeout)} ({type(e).__name__}); no collective was issued.", [0], {0: -1},
                call=0) from e
        return bytes(self._store.get(key))

    def _wait_ready(self, deadline: float) -> None:
        while True:
            state = self.comm.state()
            if state == "ready":
                return
            if _broken(state):
                self.abort()
                raise GateError(f"GateSync construction: the gate's communicator failed to initialize on rank "
                                f"{self.rank} ({state}); build a new GateSync on every rank to retry")
            if time.monotonic() >= deadline:
                break
            time.sleep(INIT_POLL_S)
        # ncclCommInitRankConfig (non-blocking) never gives up by itself: abort it.
        self.abort()
        raise not_started_error(self._store, "owned/started", self.world, lambda who: (
            f"GateSync construction: {who} did not initialize the gate's communicator within "
            f"{timeout_text(self._timeout)} (every rank of the group must construct GateSync); the initialization "
            f"was aborted. Build a new GateSync on every rank to retry."))

    def sync(self, p: Prepared, seq: int, policy: str):
        if self._aborted:
            raise GateError(f"the gate's communicator on rank {self.rank} was aborted; build a new GateSync on every "
                            f"rank")
        if self.device.type != "cuda":
            return self._sync(p, seq, policy)
        # Every kernel on the gate device's current stream, whatever this thread's current device is.
        with torch.cuda.device(self.device):
            return self._sync(p, seq, policy)

    def _sync(self, p: Prepared, seq: int, policy: str):
        buf = ops.pack(p.votes, p.stages, p.targets, seq, p.site, policy, self.rank, self.world, p.poison,
                       p.policies, p.digests)
        self.comm.all_reduce_(buf)  # CUDA: enqueued (ncclAllReduce, SUM, int64); CPU double: device work done
        decoded, report = ops.decode(buf, p.votes.shape[0], self.world, policy)
        decision = torch.logical_and(decoded, self._words.device[VALID])
        mark_done(self._words, seq)
        return decision, report, decoded

    def completed_seq(self) -> int | None:
        """The last call whose decode ran on the device: a host read of mapped memory."""
        return int(self._words.host[DONE])

    def failed(self) -> bool:
        """ncclCommGetAsyncError reports an error (a peer's connection broke, or an abort)."""
        if self.comm is None:
            return False
        try:
            return _broken(self.comm.state())
        except Exception:  # noqa: BLE001
            return True

    def invalidate(self) -> None:
        """Decisions read false from here on: a host write to mapped memory, no CUDA call."""
        self._words.host[VALID] = 0

    def revalidate(self) -> None:
        self._words.host[VALID] = 1

    def void(self) -> bool:
        """Invalidated (and not restored by a peer's completion), or aborted: a host read of
        mapped memory and a flag, no CUDA call."""
        return self._aborted or int(self._words.host[VALID]) == 0

    def abort(self) -> None:
        """ncclCommAbort: stops this rank's part of a stuck collective; the communicator is unusable after.
        Blocks while this rank's stream is stuck (csrc/nccl/nccl_comm.cpp, comm_abort): the failure path
        calls it on a thread of its own, after the call's failure is latched."""
        self._aborted = True
        if self.comm is None:
            return
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: aborting the gate's communicator failed")

    @property
    def aborted(self) -> bool:
        return self._aborted

    def close(self) -> None:
        """Free the communicator. After an abort, only the handle is released: an abort still
        blocked on the stream keeps what it frees until it returns, and close() does not wait."""
        comm, self.comm = self.comm, None
        if comm is None:
            return
        try:
            if self._aborted:
                comm.close()
            else:
                comm.destroy()
                comm.close()
        except Exception:  # noqa: BLE001 - already gone
            log.debug("esper_gate: closing the gate's communicator failed", exc_info=True)

