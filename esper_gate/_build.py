"""Building a GateSync: the rendezvous, the gate's parts wired together, its transport and
its warm-up, under one deadline; and the exit hook that stops the parts' threads.

``assemble(gate, parent, start)`` fills in the façade's parts (``gate._watcher``,
``_diagnosis``, ``_verdict``, ``_failure``, ``_transport``, ``_config_error``)
and leaves the gate ready for its first call, or raises the construction's
error with everything it started stopped again.
"""
from __future__ import annotations

import atexit
import datetime
import socket
import time
import weakref

import torch
import torch.distributed as dist

from . import _verdict, wire
from ._diagnosis import Diagnosis
from ._failure import ABORT_WAIT_S, BackgroundAbort, FailurePath
from ._group import (Rendezvous, check_group_backend, config_error, fast_window, gate_group_timeout, new_gate_group,
                     not_started_error, self_timing, set_group_timeout, shared_devices, supports_set_timeout)
from ._inputs import prepare, slot_state_defaults, timeout_text
from ._transport import C10dTransport, OwnedTransport
from ._verdict import Verdict
from ._watcher import Watcher, Whereabouts
from .errors import GateError, GateInputError

__all__ = ["assemble", "place", "slot_state_inputs", "warm_up", "BUILD_GRACE_S"]

# After a rank that met the others last at the rendezvous, the least time the
# others give construction's remaining steps (its communicator and warm-up).
BUILD_GRACE_S = 3.0


def _left(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.05))


# Every GateSync whose watcher thread may still run, for _stop_watchers_at_exit.
EXIT_JOIN_S = 5.0
_live: "weakref.WeakSet" = weakref.WeakSet()  # of GateSync


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
        # The store worker makes the requests: its last one must return before finalization too.
        w._worker.close()
        w._worker.join(EXIT_JOIN_S)


atexit.register(_stop_watchers_at_exit)



def place(gate, parent, device, backend, transport, owned) -> None:
    """The gate's rank, world, backend, device and transport in ``parent`` (an initialized group)."""
    gate.ranks = dist.get_process_group_ranks(parent)
    gate.world_size, gate.rank = len(gate.ranks), dist.get_rank(parent)
    if gate.rank < 0:
        raise GateError("GateSync: this process is not a member of the given group")
    if gate.world_size > wire.MAX_WORLD:
        raise GateInputError(f"esper_gate supports up to {wire.MAX_WORLD} ranks, the group has {gate.world_size}")
    gate.backend = str(backend) if backend is not None else str(dist.get_backend(parent))
    if device is None and "nccl" in gate.backend:
        device = torch.device("cuda", torch.cuda.current_device())
    gate.device = torch.device(device if device is not None else "cpu")
    if gate.device.type == "cuda" and gate.device.index is None:
        gate.device = torch.device("cuda", torch.cuda.current_device())
    # The owned communicator whenever the gate's device is CUDA, whatever the backend string.
    gate._owned = owned
    gate.transport = "owned" if owned is not None or (gate.device.type == "cuda" and transport != "c10d") \
        else "c10d"
    if gate.transport == "c10d":
        check_group_backend(gate.backend, gate.device)


def _where(gate) -> dict:
    """Where this rank runs, for the rendezvous: its host and (CUDA) its GPU's UUID."""
    where = {"host": socket.gethostname()}
    if gate.device.type == "cuda":
        try:
            uuid = str(torch.cuda.get_device_properties(gate.device).uuid)
        except Exception:  # noqa: BLE001
            uuid = "?"
        where["device"] = f"{gate.device} (GPU {uuid})"
    return where

def assemble(gate, parent, start: float) -> None:
    rendezvous = Rendezvous(parent.group_name, gate.rank, gate.world_size, gate.timeout,
                            store_host=gate.ranks.index(0) if 0 in gate.ranks else None)
    mine = {"num_slots": gate.num_slots, "policy": gate.policy, "site": gate.site, "world": gate.world_size,
            "slot_state": gate.slot_state, "fast_window": _verdict.fast_window(gate.timeout.total_seconds())}
    configs = rendezvous.meet({**mine, **_where(gate)})
    # Construction as a whole returns or raises within the timeout and a few
    # seconds of this rank's start (invariant 4 of the failure path): the steps
    # after the rendezvous share one deadline instead of a timeout each (a rank
    # late to the rendezvous, then slow to set up its communicator, then gone
    # before the warm-up made it about three timeouts). A rank that met late
    # still leaves the others BUILD_GRACE_S (or the timeout, if shorter).
    total = gate.timeout.total_seconds()
    deadline = max(start + total, time.monotonic() + min(total, BUILD_GRACE_S))
    gate._config_error = config_error(configs, mine, gate.rank)
    if gate.device.type == "cuda":
        shared = shared_devices(configs)
        if shared is not None:
            rendezvous.abandon()
            raise shared
    cuda = gate.device.type == "cuda"
    watcher = Watcher(rendezvous.store, gate.rank, lambda call: gate._failure.expire(call),
                      (lambda: gate._transport.failed()) if cuda or gate._owned is not None else None,
                      whereabouts=(rendezvous.parent_store, rendezvous.index,
                                   Whereabouts.of(parent.group_name, gate.rank)),
                      progress=(lambda: gate._transport.completed_seq()) if cuda else None,
                      news=lambda call: gate._failure.news(call))
    gate._watcher = watcher
    _live.add(gate)
    store_host = gate.ranks.index(0) if 0 in gate.ranks else None
    gate._diagnosis = Diagnosis(watcher.read_heartbeats, gate.rank, gate.world_size, store_host, gate.timeout,
                                read_whereabouts=watcher.read_whereabouts, gate_index=rendezvous.index,
                                sleep=watcher.pause, stalled=watcher.stalled_s)
    gate._verdict = Verdict(watcher.store_request, rank=gate.rank,
                            unresponsive=lambda seq, e: gate._diagnosis.store_gone(seq, e, e))
    gate._failure = FailurePath(lambda: gate._transport, watcher, gate._diagnosis, gate._verdict, gate.latch,
                                gate.timeout, gate.rank, gate.world_size, store_host)
    gate._failure.fast_s = fast_window(configs)
    gate._verdict._fast = gate._failure.applies_alone
    watcher.on_late_publish = gate._failure.late_publish
    try:
        if gate.transport == "owned":
            gate._transport = OwnedTransport(rendezvous.store, gate.rank, gate.world_size, gate.device,
                                             deadline, rendezvous.group_name, nccl=gate._owned,
                                             timeout=gate.timeout)
            if gate._config_error is None:  # ranks with other slot counts would all_reduce other sizes
                warm_up(gate, deadline)
        else:
            timing = self_timing(gate.backend, gate.device)
            calls_timeout = gate_group_timeout(gate.timeout, timing)
            # gloo times its own ops (the watcher does not abort it): its connect and
            # the warm-up get what is left of the deadline, later calls the timeout.
            bounded = timing and supports_set_timeout()
            group = _new_group(gate, rendezvous, _left(deadline) if bounded else calls_timeout)
            gate._transport = C10dTransport(group, gate.backend, gate.device)
            if gate._config_error is None:
                if bounded:
                    set_group_timeout(group, _left(deadline))
                warm_up(gate, deadline)
            if bounded:
                set_group_timeout(group, calls_timeout)
    except BaseException as e:
        rendezvous.abandon()
        watcher.close()
        gate._watcher = None
        if gate._failure.abort is None:  # the abort can block on the stream: bounded here too
            BackgroundAbort(gate._transport.abort, gate._transport.abort_what).start().wait(ABORT_WAIT_S)
        else:
            gate._failure.wait_abort()
        gate._transport.close()
        if gate.latch.error is not None:
            raise gate.latch.error from e
        raise
    watcher.built()
    rendezvous.commit()

def _new_group(gate, rendezvous, timeout: datetime.timedelta):
    """The gate's c10d group; a rank that does not set it up in time is named (not c10d's raw
    store or connect error)."""
    store = rendezvous.store
    store.set(f"group/started/{gate.rank}", "1")
    try:
        return new_gate_group(gate.ranks, gate.backend, gate.device, timeout, rendezvous.group_name,
                              store=rendezvous.store)
    except Exception as e:  # noqa: BLE001 - a connect or store timeout, a peer gone
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise not_started_error(store, "group/started", gate.world_size, lambda who: (
            f"GateSync construction: {who} did not set up the gate's {gate.backend} group within what was "
            f"left of the {timeout_text(gate.timeout)} timeout ({why}); build a new GateSync on every rank "
            f"to retry.")) from e



def warm_up(gate, deadline: float) -> None:
    """One sync at construction: it creates the communicator (NCCL sets it up
    lazily on the first collective, which blocks the host) and loads the
    kernels, under the gate's deadline, so that the first gate call costs
    what every later one does."""
    zeros = torch.zeros(gate.num_slots, dtype=torch.int64, device=gate.device)
    result = gate._run(prepare(zeros.bool(), zeros, zeros, None, num_slots=gate.num_slots, device=gate.device,
                               default_site=gate.site, call="warm-up", slot_state=gate._slot_state_defaults), 0,
                       deadline=deadline)
    result.report_words()


def slot_state_inputs(gate):
    """The policies and digests every call of a gate with the slot state sends where the
    caller gives none, built once (None for a gate without it). Complete before the first
    call: a call may run on another stream than this one."""
    if not gate.slot_state:
        return None
    defaults = slot_state_defaults(gate.num_slots, gate.policy, gate.device)
    if gate.device.type == "cuda":
        torch.cuda.current_stream(gate.device).synchronize()
    return defaults
