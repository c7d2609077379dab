"""GateSync: the object a training loop holds for cross-rank gate consensus.

A façade over parts with one job each:

* ``_inputs.prepare``: a call's inputs as tensors the op takes (pure);
* ``_group.Rendezvous`` and ``new_gate_group``: meeting every rank in the
  store, then the gate's dedicated process group;
* ``_transport``: the call's one collective, its completion and error state
  (read with no CUDA call), its invalidation and its abort: the gate's own
  NCCL communicator for CUDA gates (``OwnedTransport``), a c10d group for
  CPU gates (gloo) and for the opt-in NCCL fallback (``transport="c10d"``);
* ``_watcher.Watcher``: heartbeats, GPU completion and deadlines, on a
  thread of its own (a call only appends to a deque and sets an int);
* ``_failure.FailurePath``: a failed call's steps, in order (invalidate,
  publish, abort, diagnose);
* ``_diagnosis.Diagnosis``: which ranks a failed call names, from heartbeats;
* ``_verdict.Verdict``: each call's one outcome, shared through the store,
  so every rank applies the call or raises the same error;
* ``_latch.FailureLatch``: the gate's first failure, raised by later calls
  and by every read of the failed call's results (``consensus.GateConsensus``).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import socket
import time
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

from . import wire
from ._diagnosis import Diagnosis
from ._failure import FailurePath
from ._group import (Rendezvous, config_error, gate_group_timeout, new_gate_group, not_started_error, parent_group,
                     self_timing, set_group_timeout, shared_devices, supports_set_timeout)
from ._inputs import as_timedelta, check_settings, prepare, site_fingerprint, slot_state_defaults, timeout_text
from ._latch import FailureLatch
from ._transport import C10dTransport, LocalTransport, OwnedTransport
from ._verdict import Verdict
from ._watcher import Call, Watcher
from .consensus import GateConsensus, GateView
from .errors import GateConfigError, GateError, GateInputError

__all__ = ["GateSync", "GateConsensus", "site_fingerprint"]

log = logging.getLogger("esper_gate")

# After a rank that met the others last at the rendezvous, the least time the
# others give construction's remaining steps (its communicator and warm-up).
BUILD_GRACE_S = 3.0


def _left(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.05))


# Every GateSync whose watcher thread may still run, for _stop_watchers_at_exit.
EXIT_JOIN_S = 5.0
_live: "weakref.WeakSet[GateSync]" = weakref.WeakSet()


def _stop_watchers_at_exit() -> None:
    """Stop the watcher threads of the GateSyncs still open when the interpreter exits.

    The watcher is a daemon thread that makes c10d Store requests (TCPStore set/get/check,
    bound with ``py::call_guard<py::gil_scoped_release>`` in torch 2.14.1's
    torch/csrc/distributed/c10d/init.cpp). When a request returns after Py_FinalizeEx has
    marked the runtime as finalizing, CPython 3.11 ends the thread in take_gil
    (Python/ceval_gil.h) with PyThread_exit_thread(), that is pthread_exit(); its forced
    unwind runs through ``~gil_scoped_release()``, which is noexcept, so libstdc++ calls
    std::terminate: "terminate called without an active exception", SIGABRT (seen under
    gdb: take_gil <- PyEval_RestoreThread <- ~gil_scoped_release <- a Store lambda).
    Py_FinalizeEx runs the atexit callbacks before it marks the runtime as finalizing, so
    joining the watchers here closes that window. The gates' groups are left to the
    process's own teardown, as before; only the threads stop.
    """
    watchers = [w for w in (gs._watcher for gs in list(_live)) if w is not None]
    for w in watchers:  # all stop at once, then each is waited for
        w._stop.set()
    for w in watchers:
        # Its last store request (milliseconds when the store is alive) must return first.
        # Bounded, so that exit never hangs on a dead store.
        w._thread.join(timeout=EXIT_JOIN_S)
        # A failure in progress (SIGTERM from a launcher often lands during one): its
        # diagnosis waits through Watcher.pause, which the stop cuts short, and then
        # makes its last store requests.
        for t in list(w.failure_threads):
            t.join(timeout=EXIT_JOIN_S)


atexit.register(_stop_watchers_at_exit)


class GateSync:
    """Cross-rank gate consensus for ``num_slots`` slots; build it on every rank.

    Args:
        num_slots: slots synchronized per call (1..1024).
        policy: "unanimous" (default), "rank0", "majority" (strict) or "any".
        group: the ranks that must agree (default: the world).
        timeout: how long a call (and the construction) waits for the slowest
            rank before raising GateTimeoutError naming the ranks that did not
            arrive.
        slot_names: names used in reports (default "0", "1", ...); they also
            enter the layout fingerprint, so ranks with other names fail.
        device: the device of the inputs and results (default: the current
            CUDA device when the group's backend serves CUDA, e.g. "nccl" or
            "cpu:gloo,cuda:nccl", else the CPU). Inputs on another device are
            bad input, reported on every rank in the same call.
        backend: the backend of the dedicated c10d group of a CPU gate or of
            the c10d fallback (default: the group's).
        transport: how a CUDA gate's collective runs: None or "owned" (the
            gate's own NCCL communicator, whatever the backend string), or
            "c10d" (the opt-in ProcessGroupNCCL fallback; see
            docs/integrating-esper.md §5 for what each guarantees). CPU gates
            always use a c10d group.
        vocabulary: a ``report.Vocabulary`` naming stage and target ids in
            reports (default: the ids themselves, "stage 3 -> target 2").
        slot_state: whether calls carry each slot's own policy and state
            digest (default True: ``policies`` and ``digests`` may be given
            per call). False halves the wire or better (13 bits per slot
            instead of 47: 80 int64 words instead of 254 at 64 slots and 2
            ranks) and makes pack and decode cheaper; such a gate refuses
            digests and per-slot policies other than its own as bad input.
            The buffer's size depends on it, so every rank must pass the
            same: it enters the slot layout fingerprint, and ranks built
            otherwise get the GateConfigError of mismatched settings at
            construction, before any collective.

    Construction is collective: a store rendezvous, a dedicated group and
    one warm-up sync that creates its communicator, together bounded by
    ``timeout`` from this rank's start (or BUILD_GRACE_S after the last rank
    met the others, if that is later). Outside an initialized process group, or in a world of one,
    it decides locally and issues no collective.
    """

    def __init__(self, num_slots: int, *, policy: str = "unanimous", group=None,
                 timeout=datetime.timedelta(seconds=60), slot_names: Sequence[str] | None = None,
                 device: torch.device | str | None = None, backend: str | None = None, vocabulary=None,
                 transport: str | None = None, slot_state: bool = True, _owned=None):
        # _owned: a module with _nccl's interface (unique_id, NcclComm, MappedWords) that
        # replaces esper_gate._nccl, on any device: the tests' CPU double (tests/owned_double.py).
        start = time.monotonic()
        if transport not in (None, "owned", "c10d"):
            raise GateInputError(f"transport must be None, 'owned' or 'c10d', got {transport!r}")
        self.num_slots, self.policy, self.timeout = num_slots, policy, as_timedelta(timeout)
        self.slot_names = check_settings(num_slots, policy, slot_names)
        if not isinstance(slot_state, bool):
            raise GateInputError(f"slot_state must be True or False, got {slot_state!r}")
        self.slot_state = slot_state
        # The slot state sizes the buffer, like the slot count: it is part of the layout.
        self.site = site_fingerprint(num_slots, None if slot_names is None else self.slot_names,
                                     tag="" if slot_state else "no slot state")
        self._slot_state_defaults = None
        self.vocabulary = vocabulary
        self.latch = FailureLatch()
        self._seq = 0
        self._config_error: GateConfigError | None = None
        self._watcher: Watcher | None = None
        self._transport = LocalTransport()
        self._verdict: Verdict | None = None
        parent = parent_group(group)
        self.distributed = parent is not None
        if parent is None:
            self.rank, self.world_size, self.ranks = 0, 1, [0]
            self.device = torch.device(device if device is not None else "cpu")
            self._make_slot_state_defaults()
            return
        self.ranks = dist.get_process_group_ranks(parent)
        self.world_size, self.rank = len(self.ranks), dist.get_rank(parent)
        if self.rank < 0:
            raise GateError("GateSync: this process is not a member of the given group")
        if self.world_size > wire.MAX_WORLD:
            raise GateInputError(f"esper_gate supports up to {wire.MAX_WORLD} ranks, the group has {self.world_size}")
        self.backend = str(backend) if backend is not None else str(dist.get_backend(parent))
        if device is None and "nccl" in self.backend:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # The owned communicator whenever the gate's device is CUDA, whatever the backend string.
        self._owned = _owned
        self.transport = "owned" if _owned is not None or (self.device.type == "cuda" and transport != "c10d") \
            else "c10d"
        self._make_slot_state_defaults()
        self._build(parent, start)

    def _make_slot_state_defaults(self) -> None:
        """The policies and digests every call of a gate with the slot state sends where the
        caller gives none, built once. Complete before the first call: a call may run on
        another stream than this one."""
        if not self.slot_state:
            return
        self._slot_state_defaults = slot_state_defaults(self.num_slots, self.policy, self.device)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # ---- construction ---------------------------------------------------
    def _where(self) -> dict:
        """Where this rank runs, for the rendezvous: its host and (CUDA) its GPU's UUID."""
        where = {"host": socket.gethostname()}
        if self.device.type == "cuda":
            try:
                uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            except Exception:  # noqa: BLE001
                uuid = "?"
            where["device"] = f"{self.device} (GPU {uuid})"
        return where

    def _build(self, parent, start: float) -> None:
        rendezvous = Rendezvous(parent.group_name, self.rank, self.world_size, self.timeout)
        mine = {"num_slots": self.num_slots, "policy": self.policy, "site": self.site, "world": self.world_size,
                "slot_state": self.slot_state}
        configs = rendezvous.meet({**mine, **self._where()})
        # Construction as a whole returns or raises within the timeout and a few
        # seconds of this rank's start (invariant 4 of the failure path): the steps
        # after the rendezvous share one deadline instead of a timeout each (a rank
        # late to the rendezvous, then slow to set up its communicator, then gone
        # before the warm-up made it about three timeouts). A rank that met late
        # still leaves the others BUILD_GRACE_S (or the timeout, if shorter).
        total = self.timeout.total_seconds()
        deadline = max(start + total, time.monotonic() + min(total, BUILD_GRACE_S))
        self._config_error = config_error(configs, mine, self.rank)
        if self.device.type == "cuda":
            shared = shared_devices(configs)
            if shared is not None:
                rendezvous.abandon()
                raise shared
        cuda = self.device.type == "cuda"
        watcher = Watcher(rendezvous.store, self.rank, self._expire,
                          (lambda: self._transport.failed()) if cuda or self._owned is not None else None,
                          whereabouts=(rendezvous.parent_store, rendezvous.index),
                          progress=(lambda: self._transport.completed_seq()) if cuda else None,
                          news=lambda call: self._failure.news(call))
        self._watcher = watcher
        _live.add(self)
        self._verdict = Verdict(watcher.store_request, rank=self.rank)
        store_host = self.ranks.index(0) if 0 in self.ranks else None
        self._diagnosis = Diagnosis(watcher.read_heartbeats, self.rank, self.world_size, store_host, self.timeout,
                                    read_whereabouts=watcher.read_whereabouts, gate_index=rendezvous.index,
                                    sleep=watcher.pause)
        self._failure = FailurePath(lambda: self._transport, watcher, self._diagnosis, self._verdict, self.latch,
                                    self.timeout, self.rank, self.world_size, store_host)
        try:
            if self.transport == "owned":
                self._transport = OwnedTransport(rendezvous.store, self.rank, self.world_size, self.device,
                                                 deadline, rendezvous.group_name, nccl=self._owned,
                                                 timeout=self.timeout)
                if self._config_error is None:  # ranks with other slot counts would all_reduce other sizes
                    self._warm_up(deadline)
            else:
                timing = self_timing(self.backend, self.device)
                calls_timeout = gate_group_timeout(self.timeout, timing)
                # gloo times its own ops (the watcher does not abort it): its connect and
                # the warm-up get what is left of the deadline, later calls the timeout.
                bounded = timing and supports_set_timeout()
                group = self._new_group(rendezvous, _left(deadline) if bounded else calls_timeout)
                self._transport = C10dTransport(group, self.backend, self.device)
                if self._config_error is None:
                    if bounded:
                        set_group_timeout(group, _left(deadline))
                    self._warm_up(deadline)
                if bounded:
                    set_group_timeout(group, calls_timeout)
        except BaseException as e:
            rendezvous.abandon()
            watcher.close()
            self._watcher = None
            self._transport.abort()
            self._transport.close()
            if self.latch.error is not None:
                raise self.latch.error from e
            raise
        rendezvous.commit()

    def _new_group(self, rendezvous, timeout: datetime.timedelta):
        """The gate's c10d group; a rank that does not set it up in time is named (not c10d's raw
        store or connect error)."""
        store = rendezvous.store
        store.set(f"group/started/{self.rank}", "1")
        try:
            return new_gate_group(self.ranks, self.backend, self.device, timeout, rendezvous.group_name)
        except Exception as e:  # noqa: BLE001 - a connect or store timeout, a peer gone
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            raise not_started_error(store, "group/started", self.world_size, lambda who: (
                f"GateSync construction: {who} did not set up the gate's {self.backend} group within what was "
                f"left of the {timeout_text(self.timeout)} timeout ({why}); build a new GateSync on every rank "
                f"to retry.")) from e

    def _warm_up(self, deadline: float) -> None:
        """One sync at construction: it creates the communicator (NCCL sets it up
        lazily on the first collective, which blocks the host) and loads the
        kernels, under the gate's deadline, so that the first gate call costs
        what every later one does."""
        zeros = torch.zeros(self.num_slots, dtype=torch.int64, device=self.device)
        result = self._run(prepare(zeros.bool(), zeros, zeros, None, num_slots=self.num_slots,
                                   device=self.device, default_site=self.site, call="warm-up",
                                   slot_state=self._slot_state_defaults), 0, deadline=deadline)
        result.report_words()

    # ---- failures ---------------------------------------------------------
    def _expire(self, call: Call) -> None:
        """The watcher's deadline for ``call`` passed (or its communicator failed, or a
        peer published its failure): _failure.FailurePath.expire, on the watcher's thread."""
        self._failure.expire(call)

    # ---- calls ----------------------------------------------------------
    def _run(self, prepared, seq: int, names: Sequence[str] | None = None,
             deadline: float | None = None) -> GateConsensus:
        ready = None
        if not self.distributed:
            decision, report, decoded = self._transport.sync(prepared, seq, self.policy)
        else:
            if deadline is None:
                deadline = time.monotonic() + self.timeout.total_seconds()
            call = self._watcher.begin(seq, deadline)
            try:
                decision, report, decoded = self._transport.sync(prepared, seq, self.policy)
                if decision.is_cuda:
                    # Recorded on the gate device's current stream (the one the call ran
                    # on), not the thread's current device's: there it would fire at once.
                    # Only the caller's reads query it; the watcher reads the mapped word.
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(self.device))
                    call.event = ready
                else:
                    self._watcher.end_host(seq)
            except Exception as e:
                raise self._failure.failed_in_call(call, e) from e
            except BaseException:
                # Ctrl-C lands between bytecodes, so after the op returned: the
                # collective completed on every rank; only this caller stops.
                self._watcher.forget(seq)
                raise
            if ready is None:
                self._verdict.confirm(seq, self.latch)
        view = GateView(self.rank, self.policy, self.slot_names if names is None else names, self.vocabulary)
        return GateConsensus(seq, decision, report, gate=view, latch=self.latch, prepared=prepared, ready=ready,
                             verdict=self._verdict if ready is not None else None, decoded=decoded)

    def __call__(self, votes, stages, targets, *, site: int | None = None, names: Sequence[str] | None = None,
                 policies: Sequence[str | None] | None = None, digests=None) -> GateConsensus:
        """One sync of all slots. Every rank of the group must call it, in the same order.

        ``votes`` (bool or 0/1), ``stages`` and ``targets`` (ids 0..63) are
        tensors on the gate's device or sequences of ints, of length
        ``num_slots``. A slot with no gate this call sends target
        ``esper_gate.NO_GATE``: it is never passed, and every rank learns
        whether the ranks diverge on it. ``site`` overrides the layout
        fingerprint for this call (the per-slot adapter passes the slot id's
        fingerprint so ranks at different slots are told apart).

        Per call, per slot (each a sequence of ``num_slots``, or None):

        * ``names``: the slots' names in this call's reports and errors (e.g.
          env-qualified "env3/r0c0"); unless ``site`` is given they also make
          the call's fingerprint, so ranks that name the call's slots
          differently are at different calls.
        * ``policies``: each slot's policy name (None: the gate's), on the
          wire; ranks that differ on a slot's policy diverge on that slot.
        * ``digests``: each slot's state digest, an int in 0..2**32-1
          (``esper_gate.state_digest`` makes one; None: 0), or an int64
          tensor on the gate's device; ranks that differ diverge on the slot,
          and the report names which ranks hold which digest.

        A gate built with ``slot_state=False`` takes ``policies`` only when
        they all name its own policy, and no ``digests``.

        Bad input of any kind on one rank is a GateInputError there and a
        GatePeerInputError on the others, in the same call.
        """
        if self.distributed and self._watcher is None:
            raise GateError("this GateSync was closed; build a new one on every rank")
        self.latch.check_usable()
        if self._config_error is not None:
            raise self._config_error
        if names is not None and not isinstance(names, (str, bytes)):
            names = [str(n) for n in names]  # a wrong count travels as bad input (prepare)
        prepared = prepare(votes, stages, targets, site, num_slots=self.num_slots, device=self.device,
                           default_site=self.site, call=f"esper_gate call {self._seq + 1} on rank {self.rank}",
                           policies=policies, digests=digests, default_policy=self.policy, names=names,
                           slot_state=self._slot_state_defaults)
        self._seq += 1
        result = self._run(prepared, self._seq, names if prepared.problem is None else None)
        if prepared.problem is not None:
            raise GateInputError(prepared.problem)
        if not result.decisions.is_cuda:
            # CPU results are already on the host: fail fast, in the same call
            # on every rank, for bad input and for ranks at different calls.
            result.raise_if_call_failed()
        return result

    @property
    def group(self):
        """The dedicated process group gate traffic runs on (None when local). ``close()``
        frees it: it is not yours to destroy, and after close there is none."""
        if self.distributed and self._watcher is None:
            raise GateError("this GateSync was closed, and close() freed its process group")
        return getattr(self._transport, "group", None)

    @property
    def group_name(self) -> str | None:
        return self._transport.name

    @property
    def index(self) -> int:
        """This gate's place among the gates built on its group, as errors name it ("gate #3")."""
        return self._diagnosis.gate_index if self.distributed else 0

    @property
    def calls(self) -> int:
        """Number of calls made so far (the seq of the last call)."""
        return self._seq

    @property
    def failure(self) -> GateError | None:
        """The error that made this GateSync unusable, or None."""
        return self.latch.error

    def close(self) -> None:
        """Stop the watcher thread and free the dedicated group (its threads and sockets).
        Every rank closes its own; later calls raise, and a new GateSync works as before."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._transport.close()

    def __repr__(self) -> str:
        return (f"GateSync(num_slots={self.num_slots}, policy={self.policy!r}, rank={self.rank}, "
                f"world_size={self.world_size}, distributed={self.distributed}, calls={self._seq})")
