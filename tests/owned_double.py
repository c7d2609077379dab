"""A CPU test double of the gate's own NCCL communicator (esper_gate/_nccl.py's interface).

It behaves like NCCL where NCCL is inconvenient, so that the owned transport's
failure path meets in CI what it will meet on a GPU. Each behaviour, with the
NCCL source it follows (NVIDIA/nccl, read at tags v2.28.9-1 and v2.30.7-1):

1. **A collective returns "in progress".** On a non-blocking communicator,
   ``ncclGroupEndInternal`` hands every collective of a world of two or more
   to a new thread (``groupLaunchNonBlocking``), sets the async state to
   ``ncclInProgress`` and returns that (src/group.cc); the work is on the
   stream only once ``ncclCommGetAsyncError`` says ``ncclSuccess``. Only a
   world of one returns ``ncclSuccess`` at once (``ncclLaunchOneRank``,
   src/enqueue.cc). Here ``all_reduce_`` starts, reads "in progress" for
   ``LAUNCH_S`` (the modelled launch), and waits in between with
   ``esper_gate._nccl.wait_enqueued``, the very code the real NcclComm runs.
2. **The abort blocks and can wait on the device.** ``ncclCommAbort`` sets
   the abort flags, then runs ``commReclaim`` in the caller's thread (its
   destroyFlag makes the group blocking, src/group.cc ``ncclAsyncLaunch``);
   ``commDestroySync`` synchronizes NCCL's device stream (src/init.cc), which
   waits on the gate stream, which waits on the caller's stream. Here
   ``abort()`` sets the flag, then returns only when this communicator's
   device work has drained, and that work starts only when ``caller_stream``
   is idle: ``caller_stream.sleep(10)`` (``torch.cuda._sleep`` on the
   caller's stream, or DDP's all_reduce stuck on a dead peer) keeps an abort
   from returning for up to 10 s.
3. **An aborted kernel exits, and the stream runs on.** After an abort
   during its device work, ``all_reduce_`` returns normally with the buffer
   holding this rank's contribution only (not the sum), so the transport's
   later stream work (decode, the DONE write) runs on it, as on the GPU.
   A call made after the abort raises, as the real wrapper does.
4. **A unique id's bootstrap root thread stays when a peer never joins.**
   ``bootstrapCreateRoot`` starts a detached thread that accepts until every
   rank connected (src/bootstrap.cc; the listening socket has no abort flag).
   Here ``unique_id()`` starts a daemon thread that waits for the first init
   with the id, then for every rank's; ``live_roots()`` counts those waiting.
5. **``NCCL_COMM_BLOCKING`` overrides the config.** ``envConfigOverride``
   lets 0 or 1 win over ``config.blocking`` (src/init.cc). Here, with 1 in
   the environment at init, the communicator is blocking: init waits for
   every peer, ``all_reduce_`` waits for the peers holding the
   communicator's lock, and ``abort()`` waits for that lock.

Collectives go through the job's store: each rank writes its buffer under a
per-communicator, per-operation key and waits in short polls for the others',
then says it received them and waits until every rank did (a rank completes
only when every rank took part to the end, as in NCCL's ring and tree
algorithms), then sums; nothing times out by itself. A store request that fails (the
store's host died) makes ``state()`` report "error: ..."
(``ncclCommGetAsyncError``) and the collective raise.

Not modelled: more than one caller stream per process, GPU memory, NCCL's
proxy and connection errors other than a broken store.

GateSync takes it as ``GateSync(..., _owned=owned_double)``; spawned ranks
import it by name (tests/ is on their path).
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time

import torch

from esper_gate._nccl import BLOCKING_ENV, wait_enqueued

POLL_S = 0.002
UID_BYTES = 128
# The modelled cost of NCCL's launch thread for one small all_reduce (tens of
# microseconds on a GPU): how long a call reads "in progress" after it started.
LAUNCH_S = 50e-6


class AbortedError(RuntimeError):
    pass


def check_library() -> None:
    pass


class CallerStream:
    """The caller's current stream in this process, as far as the gate's collective waits on it
    (its caller_done event): work queued with ``sleep`` runs before the collective can start."""

    def __init__(self):
        self._lock = threading.Lock()
        self._until = 0.0

    def sleep(self, seconds: float) -> None:
        """Queue ``seconds`` of work (torch.cuda._sleep); returns at once, like a kernel launch."""
        with self._lock:
            self._until = max(self._until, time.monotonic()) + seconds

    def idle(self) -> bool:
        return time.monotonic() >= self._until

    def wait_idle(self) -> None:
        while (left := self._until - time.monotonic()) > 0:
            time.sleep(min(left, 0.01))


caller_stream = CallerStream()


class _BootstrapRoot:
    """Rank 0's bootstrap root of one unique id: waits, like NCCL's accept loop, for every rank."""

    def __init__(self, uid: bytes):
        self._first = threading.Event()
        self._store = None
        self._world = 0
        self.thread = threading.Thread(target=self._run, name=f"owned_double-bootstrap-root-{uid[:4].hex()}",
                                       daemon=True)
        self.thread.start()

    def join(self, store, world: int) -> None:
        if not self._first.is_set():
            self._store, self._world = store, world
            self._first.set()

    def _run(self) -> None:
        self._first.wait()  # blocked in accept until the first rank connects: no timeout
        keys = [f"init/{r}" for r in range(self._world)]
        try:
            while not _exiting.is_set() and not self._store.check(keys):
                time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the store is gone; NCCL's root keeps waiting in accept
            _exiting.wait()


_roots: dict[bytes, _BootstrapRoot] = {}
# NCCL's root waits in accept, in C, through the process's exit. This one polls a c10d store, and a
# store request that returns while the interpreter finalizes ends the process in SIGABRT (see
# esper_gate/gate_sync.py, _stop_watchers_at_exit): the roots stop polling at exit instead.
_exiting = threading.Event()


def _stop_roots_at_exit() -> None:
    _exiting.set()
    for root in list(_roots.values()):
        root.thread.join(timeout=1.0)


atexit.register(_stop_roots_at_exit)


def unique_id() -> bytes:
    uid = os.urandom(UID_BYTES)
    _roots[uid[:8]] = _BootstrapRoot(uid)
    return uid


def live_roots() -> int:
    """Bootstrap root threads of this process still waiting for a rank (NCCL never ends them)."""
    return sum(1 for r in _roots.values() if r.thread.is_alive())


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


def _blocking_from_env() -> bool:
    value = os.environ.get(BLOCKING_ENV)
    try:
        return value is not None and int(value.strip(), 0) == 1
    except ValueError:
        return False


# Every communicator made in this process (tests look at them).
made: list["NcclComm"] = []


class NcclComm:
    def __init__(self, unique_id: bytes, rank: int, world: int, device, store=None):
        import torch.distributed as dist

        if len(unique_id) != UID_BYTES:
            raise ValueError(f"owned_double.NcclComm: unique_id must be {UID_BYTES} bytes, got {len(unique_id)}")
        self.rank, self.world = rank, world
        self.blocking = _blocking_from_env()
        base = store if store is not None else _default_store()
        self._store = dist.PrefixStore(f"owned_double/{bytes(unique_id)[:8].hex()}/", base)
        self._aborted = threading.Event()      # NCCL's abort flag: set first thing in abort()
        self._abort_returned = threading.Event()
        self._mu = threading.Lock()            # held through a collective only when blocking
        self._error: str | None = None
        self._ready = False
        self._op = 0
        self._launch_until: float | None = None
        self._pending: tuple[int, torch.Tensor] | None = None
        self._work: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._done: dict[int, threading.Event] = {}
        self.calls: list[str] = []  # what was called, in order (tests look at it)
        self.enqueue_sleeps = 0
        self.in_progress_calls = 0
        self.abort_seconds: float | None = None
        self._device = threading.Thread(target=self._device_loop, name=f"owned_double-device-{rank}", daemon=True)
        self._device.start()
        root = _roots.get(bytes(unique_id)[:8])
        if root is not None:
            root.join(self._store, world)
        self._guard(lambda: self._store.set(f"init/{rank}", "1"))
        made.append(self)
        if self.blocking:  # a blocking init waits for every peer, with no deadline
            while not self._guard(lambda: self._store.check([f"init/{r}" for r in range(world)])):
                time.sleep(POLL_S)

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
        if not self._ready or (self._launch_until is not None and time.perf_counter() < self._launch_until):
            return "pending"
        return "ready"

    # ---- the collective -----------------------------------------------------------
    def all_reduce_(self, buf: torch.Tensor, enqueue_timeout_s: float = 0.0) -> torch.Tensor:
        self.calls.append("all_reduce_")
        if self.blocking:
            with self._mu:  # a blocking collective waits for the peers inside the lock
                op = self._next_op()
                self._exchange(op, buf)
            return buf
        if self._start(buf):
            self.in_progress_calls += 1
            self.enqueue_sleeps += wait_enqueued(lambda: self._poll(), timeout_s=enqueue_timeout_s,
                                                 what=f"the all_reduce (rank {self.rank} of {self.world})")
        # The host sees the buffer once the device work ran, or exited on an abort.
        done = self._done.get(self._op - 1)
        while done is not None and not done.wait(POLL_S):
            if self._aborted.is_set():
                break
        return buf

    def _next_op(self) -> int:
        op, self._op = self._op, self._op + 1
        return op

    def _start(self, buf: torch.Tensor) -> int:
        """ncclAllReduce: 1 (ncclInProgress) while the launch thread runs, 0 at a world of one."""
        if self._aborted.is_set():
            raise AbortedError(f"owned_double: the communicator of rank {self.rank} was aborted; build a new one")
        state = self.state()
        if state != "ready":
            raise RuntimeError(f"owned_double: the communicator of rank {self.rank} is not ready ({state})")
        if self.world == 1:
            return 0  # ncclLaunchOneRank: an in-place SUM of one rank launches nothing
        self._pending = (self._next_op(), buf)
        self._launch_until = time.perf_counter() + LAUNCH_S
        return 1

    def _poll(self) -> int:
        """ncclCommGetAsyncError after the call: 1 while in progress, 0 once on the stream."""
        if self._aborted.is_set():
            raise AbortedError(f"owned_double: the communicator of rank {self.rank} was aborted while its "
                               f"all_reduce was being enqueued")
        if self._error is not None:
            raise RuntimeError(f"owned_double: all_reduce failed: {self._error}")
        if time.perf_counter() < self._launch_until:
            return 1
        op, buf = self._pending
        self._pending = None
        self._done[op] = threading.Event()
        self._idle.clear()
        self._work.put((op, buf))
        return 0

    def _device_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:  # close(): NCCL's destroy and abort join their threads too
                self._idle.set()  # the work queued before it has run
                return
            op, buf = item
            caller_stream.wait_idle()   # caller_done: the gate stream waits for the caller's stream
            if not self._aborted.is_set():
                try:
                    self._exchange(op, buf)
                except Exception:  # noqa: BLE001 - an aborted or broken exchange leaves the buffer as it was
                    pass
            self._done.pop(op).set()
            if self._work.empty():
                self._idle.set()

    def _exchange(self, op: int, buf: torch.Tensor) -> None:
        keys = [f"op/{op}/{r}" for r in range(self.world)]
        self._guard(lambda: self._store.set(keys[self.rank], buf.numpy().tobytes()))
        while True:
            if self._aborted.is_set():  # the kernel sees the abort flag and exits
                if self.blocking:
                    raise AbortedError(f"owned_double: the collective was aborted on rank {self.rank} (op {op})")
                return
            if self._guard(lambda: self._store.check(keys)):
                break
            time.sleep(POLL_S)
        total = torch.zeros_like(buf)
        for k in keys:
            total += torch.frombuffer(bytearray(self._guard(lambda k=k: self._store.get(k))), dtype=buf.dtype)
        # A rank completes only once every rank has received every contribution, as in
        # NCCL's ring and tree algorithms, where each rank forwards what it received: a
        # rank that aborted (or stopped) before it got the others' data holds the rest up.
        got = [f"op/{op}/got/{r}" for r in range(self.world)]
        self._guard(lambda: self._store.set(got[self.rank], "1"))
        while not self._guard(lambda: self._store.check(got)):
            if self._aborted.is_set():
                if self.blocking:
                    raise AbortedError(f"owned_double: the collective was aborted on rank {self.rank} (op {op})")
                return
            time.sleep(POLL_S)
        buf.copy_(total)

    # ---- the end ------------------------------------------------------------------
    def abort(self) -> None:
        """ncclCommAbort: the flag first (a kernel in flight exits, a poll raises), then the
        device stream's drain, which waits behind the caller's stream."""
        self.calls.append("abort")
        t0 = time.monotonic()
        if self.blocking:
            # The wrapper calls ncclCommAbort under the communicator's lock, which a blocking
            # collective holds while it waits for its peers: the flag comes only after it.
            with self._mu:
                self._aborted.set()
        self._aborted.set()
        self._idle.wait()
        self.abort_seconds = time.monotonic() - t0
        self._abort_returned.set()

    def abort_returned(self) -> bool:
        return self._abort_returned.is_set()

    def destroy(self) -> str:
        self.calls.append("destroy")
        return "destroyed"

    def close(self) -> None:
        self.calls.append("close")
        if not self._closed:
            self._closed = True
            self._work.put(None)  # after any queued device work, which still runs
