"""GateSync: the object a training loop holds for cross-rank gate consensus.

A façade over parts with one job each:

* ``_inputs.prepare``: a call's inputs as tensors the op takes (pure);
* ``_build``: construction (the rendezvous of ``_group``, the parts wired
  together, the transport and the warm-up, under one deadline);
* ``_transport``: the call's one collective, its completion and error state
  (read with no CUDA call), its invalidation and its abort: the gate's own
  NCCL communicator for CUDA gates (``OwnedTransport``), a c10d group for
  CPU gates (gloo) and for the opt-in NCCL fallback (``transport="c10d"``);
* ``_watcher.Watcher``: heartbeats, GPU completion and deadlines, on a
  thread of its own (a call only appends to a deque and sets an int);
* ``_failure.FailurePath``: a failed call's steps, in order (invalidate,
  publish, diagnose, latch, abort);
* ``_diagnosis.Diagnosis``: which ranks a failed call names, from heartbeats;
* ``_verdict.Verdict``: each call's one outcome, shared through the store,
  so every rank applies the call or raises the same error;
* ``_latch.FailureLatch``: the gate's first failure, raised by later calls
  and by every read of the failed call's results (``consensus.GateConsensus``).
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Sequence

import torch

from ._build import _live, _stop_watchers_at_exit, assemble, place, slot_state_inputs  # noqa: F401
from ._group import parent_group
from ._inputs import as_timedelta, check_settings, check_slot_state, prepare, site_fingerprint
from ._latch import FailureLatch
from ._transport import LocalTransport
from ._verdict import Verdict
from ._watcher import Watcher
from .consensus import GateConsensus, GateView
from .errors import GateConfigError, GateError, GateInputError

__all__ = ["GateSync", "GateConsensus", "site_fingerprint"]

log = logging.getLogger("esper_gate")

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
        slot_state: whether calls carry each slot's own policy and state digest
            (default True). False sends 13 bits a slot instead of 47 and refuses
            them as bad input; every rank must pass the same (docs/wire-format.md).

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
        self.slot_state = check_slot_state(slot_state)  # it sizes the buffer: part of the layout
        self.site = site_fingerprint(num_slots, None if slot_names is None else self.slot_names,
                                     tag="" if slot_state else "no slot state")
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
            self._slot_state_defaults = slot_state_inputs(self)
            return
        place(self, parent, device, backend, transport, _owned)
        self._slot_state_defaults = slot_state_inputs(self)
        assemble(self, parent, start)

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
                    if getattr(self._transport, "aborted", False):
                        # The collective was aborted under the call and the stream ran on (the
                        # owned communicator): the buffer decoded is not the sum of every rank's.
                        raise GateError(f"esper_gate call {seq}'s collective was aborted on rank {self.rank}")
                    self._watcher.end_host(seq)
            except Exception as e:
                raise self._failure.failed_in_call(call, e) from e
            except BaseException:
                # Ctrl-C lands between bytecodes, so after the op returned: the
                # collective completed on every rank; only this caller stops.
                self._watcher.forget(seq)
                raise
            if ready is None:
                self._verdict.confirm(seq, self.latch, void=self._transport.void)
        view = GateView(self.rank, self.policy, self.slot_names if names is None else names, self.vocabulary)
        return GateConsensus(seq, decision, report, gate=view, latch=self.latch, prepared=prepared, ready=ready,
                             verdict=self._verdict if ready is not None else None, decoded=decoded,
                             void=self._transport.void)

    def __call__(self, votes, stages, targets, *, site: int | None = None, names: Sequence[str] | None = None,
                 policies: Sequence[str | None] | None = None, digests=None,
                 bad_input: str | None = None) -> GateConsensus:
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

        Bad input of any kind on one rank is a GateInputError there and a
        GatePeerInputError on the others, in the same call. A caller that cannot
        read its own objects into these inputs (the Esper adapters) passes why as
        ``bad_input`` (with inputs of the right length) instead of raising: the
        call runs poisoned, and its peers are not left waiting.
        """
        if self.distributed and self._watcher is None:
            raise GateError("this GateSync was closed; build a new one on every rank")
        self.latch.check_usable()
        if self._config_error is not None:
            raise self._config_error
        if names is not None and not isinstance(names, (str, bytes)) and hasattr(names, "__iter__"):
            names = [str(n) for n in names]  # a wrong count travels as bad input (prepare), as does a non-sequence
        prepared = prepare(votes, stages, targets, site, num_slots=self.num_slots, device=self.device,
                           default_site=self.site, call=f"esper_gate call {self._seq + 1} on rank {self.rank}",
                           policies=policies, digests=digests, default_policy=self.policy, names=names,
                           bad_input=bad_input, slot_state=self._slot_state_defaults)
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

    group_name = property(lambda self: self._transport.name, doc="The gate's group's name (None when local).")

    @property
    def index(self) -> int:
        """This gate's place among the gates built on its group, as errors name it ("gate #3")."""
        return self._diagnosis.gate_index if self.distributed else 0

    calls = property(lambda self: self._seq, doc="Number of calls made so far (the seq of the last call).")

    @property
    def config_error(self) -> GateConfigError | None:
        """The GateConfigError every call raises when the ranks built this gate with other
        settings (the same on every rank: each saw every rank's settings), or None."""
        return self._config_error

    failure = property(lambda self: self.latch.error, doc="The error that made this GateSync unusable, or None.")

    def close(self) -> None:
        """Stop the watcher thread and free the dedicated group (its threads and sockets).
        Every rank closes its own; later calls raise, and a new GateSync works as before."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self.distributed:  # an abort blocked on the stream ends when it moves (BackgroundAbort)
            self._failure.wait_abort()
        self._transport.close()

    def __repr__(self) -> str:
        return (f"GateSync(num_slots={self.num_slots}, policy={self.policy!r}, rank={self.rank}, "
                f"world_size={self.world_size}, distributed={self.distributed}, calls={self._seq})")
