"""The failure path of one gate: what happens, in order, when a call fails.

On the deadline (or an asynchronous communicator error, or a peer's news that
the call failed), ``expire`` runs on a thread of the watcher's and does, in
this order:

1. **invalidate** the call's decisions with no CUDA call (a host write to the
   mapped VALID word that decode's and-ing reads on the device), so nothing
   of the call can be applied whatever happens next;
2. **publish** the failed call: ``Verdict.claim`` writes FAILING to the
   call's verdict key by compare-and-set, a key every rank's watcher polls
   while its call waits (NCCL requires every active rank to abort its
   communicator). From then on no rank can decide ``ok``; if a peer's
   collective completed the call first, nothing failed and the call stands;
3. **diagnose**: name the ranks from the heartbeats, and write that over
   FAILING; the first diagnosis written is the one every rank raises
   (ranks adopt it, and acknowledge it);
4. **latch** that verdict: from here every host read of the call raises it;
5. **abort** the transport (ncclCommAbort on the owned communicator,
   ProcessGroup.abort on the c10d fallback; a no-op on gloo, which raises at
   its own timeout) on a thread of its own.

The abort comes last because it can block for as long as this rank's stream
is stuck: ncclCommAbort synchronizes NCCL's device stream, which waits on the
caller's stream (csrc/nccl/nccl_comm.cpp, comm_abort). A peer that died during
DDP's all_reduce leaves the caller's stream stuck until c10d's watchdog ends
that collective; an abort in the watcher's thread before the latch meant no
GateTimeoutError at all, and the watchdog killed the process first. Host
reads and ``close()`` wait for the abort at most ABORT_WAIT_S, then go on;
an abort still running then is named on the error (a note: the error's text
is the call's one verdict, the same on every rank), and it finishes by itself
when the stream moves.

The rank hosting the job's store waits, before its first raise, until the
present ranks acknowledged the verdict (at most ACK_WAIT_S): a process that
exits right after its error would otherwise take the store with it while a
peer still reads heartbeats, and that peer would name the store's host
instead of the rank that never came.
"""
from __future__ import annotations

import logging
import threading
import time

from ._diagnosis import BOUND_S, LOCAL_FAILURES, short
from ._inputs import timeout_text
from ._verdict import FAILING, OK, PUBLISH_S
from .errors import GateError

__all__ = ["FailurePath", "BackgroundAbort", "ACK_WAIT_S", "ABORT_WAIT_S"]

log = logging.getLogger("esper_gate")

# The longest the store's host delays its raise for the others to read the verdict.
ACK_WAIT_S = 2.0
# The longest a host read (or close) waits for this rank's abort before it goes on.
ABORT_WAIT_S = 1.0
# The longest the watcher's look at a peer's news waits for the store.
NEWS_BOUND_S = 0.2
# How long the store's host, before its raise, looks for a rank it named absent entering
# the call after all (a late rank shows the call LONG_CALL_S + LONG_CALL_POLL_S after it came).
LATE_ENTRY_S = 0.6


class BackgroundAbort:
    """A transport's abort on a thread of its own, waited for with a bound."""

    def __init__(self, abort, what: str):
        self.what = what
        self._abort = abort
        self._done = threading.Event()
        self.started: float | None = None
        self.seconds: float | None = None  # how long the abort took, once it returned
        self.thread = threading.Thread(target=self._run, name="esper_gate-abort", daemon=True)

    def start(self) -> "BackgroundAbort":
        self.started = time.monotonic()
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self._abort()
        except Exception:  # noqa: BLE001 - the failure is decided already; the abort only frees
            log.exception("esper_gate: %s failed", self.what)
        finally:
            self.seconds = time.monotonic() - self.started
            self._done.set()

    @property
    def returned(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the abort to return; whether it did."""
        return self._done.wait(timeout)

    def stuck_note(self) -> str | None:
        """A sentence for the error while the abort has not returned, else None."""
        if self.returned or self.started is None:
            return None
        return (f"the gate's {self.what} has not returned after {time.monotonic() - self.started:.1f} s: this "
                f"rank's stream is blocked behind other work (the abort waits for that stream); it ends by "
                f"itself when the stream moves on, and a new GateSync works from then on")


class FailurePath:
    """Wires one gate's parts for its failures.

    Args:
        transport: returns the gate's transport (it is built after the watcher).
        watcher, diagnosis, verdict, latch: the gate's parts.
        timeout: the gate's timeout.
        rank, world: this rank in the gate's group and its size.
        store_host: the group rank whose process hosts the job's store (None: outside the group).
    """

    def __init__(self, transport, watcher, diagnosis, verdict, latch, timeout, rank: int, world: int,
                 store_host: int | None):
        self._transport = transport
        self.watcher, self.diagnosis, self.verdict, self.latch = watcher, diagnosis, verdict, latch
        self.timeout = timeout
        self.rank, self.world, self.store_host = rank, world, store_host
        self.abort: BackgroundAbort | None = None  # this gate's abort, once a failure asked for it
        # The verdict's fast window F (_verdict.fast_window; the smallest of every rank's,
        # set once the ranks met): 0 turns the fast path off.
        self.fast_s = 0.0
        latch.before_delivery = self._before_delivery

    # ---- the verdict's fast path (_verdict's docstring has the proof) ---------------
    def applies_alone(self, seq: int) -> bool:
        """Whether call ``seq``, completed here, is applied with no store request: it completed
        within F of this rank's entry into call ``seq - 1``, nothing failed it here, and this
        rank's completion will be in the store within PUBLISH_S (the watcher's publishing is
        healthy). The caller's thread asks; it reads only this process's memory."""
        if self.fast_s <= 0 or seq < 1:
            return False
        w = self.watcher
        entered = w.entered_at(seq - 1)
        now = time.monotonic()
        if entered is None or now - entered > self.fast_s or w.expired or self.latch.error is not None:
            return False
        if not w.has_completed(seq) or not w.publish_healthy(now):
            return False
        w.applied_alone(seq, now)
        return True

    def _hold(self, seq: int) -> None:
        """Before this rank fails call ``seq``: wait until F + PUBLISH_S after it saw call
        ``seq - 1`` complete, so that any rank that applied ``seq`` alone has published it."""
        if self.fast_s <= 0 or seq < 1:
            return
        seen = self.watcher.completed_at(seq - 1)
        now = time.monotonic()
        wait = (now if seen is None else seen) + self.fast_s + PUBLISH_S - now
        if wait > 0:
            self.watcher.pause(wait)

    def _completed_elsewhere(self, seq: int) -> bool:
        """Whether a peer's heartbeat says call ``seq`` completed there (read after _hold)."""
        if self.fast_s <= 0:
            return False
        try:
            beats = self.watcher.read_heartbeats(self.world)
        except Exception:  # noqa: BLE001 - no store: the claim names it
            return False
        return any(b is not None and len(b) > 1 and b[1] >= seq for r, b in beats.items() if r != self.rank)

    def late_publish(self, seq: int, late_s: float) -> None:
        """Call ``seq`` was applied here alone, but the heartbeat carrying it reached the store
        ``late_s`` after (or not yet): the fast path's one assumption broke (this process was
        stopped or starved, or the store slowed, right after the call). The store decides now:
        if a peer failed the call meanwhile, the ranks disagree about it; that is latched, so
        every later call and read raises it."""
        try:
            failure = self.verdict.completed(seq, quiet=False)
        except Exception as e:  # noqa: BLE001 - its peers cannot claim through it either
            log.warning("esper_gate: call %d was applied on rank %d with no store request, and %.1f s later the "
                        "store still has not taken its completion (the gate assumes %.1f s) and does not answer "
                        "(%s); whether a peer failed the call cannot be read", seq, self.rank, late_s, PUBLISH_S,
                        short(e))
            return
        if failure is None:
            log.warning("esper_gate: call %d's completion reached the store %.1f s after rank %d applied it "
                        "(the gate assumes %.1f s); no rank had failed it", seq, late_s, self.rank, PUBLISH_S)
            return
        err = GateError(
            f"esper_gate call {seq} was applied on rank {self.rank} with no store request (its collective completed "
            f"within the fast window), but this rank's heartbeat carrying that completion reached the store "
            f"{late_s:.1f} s later, past the {PUBLISH_S:.1f} s the gate assumes (this process was stopped or "
            f"starved, or the store slowed, right after the call), and a peer failed the call meanwhile: "
            f"{failure}. The ranks disagree about call {seq}; restore every rank from a checkpoint taken "
            f"before it")
        self.latch.record(seq, err)
        log.error("%s", err)

    # ---- the watcher's side ---------------------------------------------------
    def news(self, call) -> bool:
        """Polled by the watcher while ``call`` waits: whether a peer published that it
        failed (FAILING or a diagnosis). A diagnosis read here is latched at once, so
        this rank holds the verdict even if the store's host exits before its own
        diagnosis is done."""
        # Briefly: the watcher's thread asks, and a store that does not answer must not
        # hold the deadlines it watches (the deadline then takes the failure path).
        kind, failure = self.verdict.state(call.seq, NEWS_BOUND_S)
        if failure is not None:
            self.latch.record(call.seq, failure)
        return kind in (FAILING, "failed")

    def expire(self, call) -> None:
        """The call passed its deadline, its communicator failed, or a peer published its
        failure: invalidate, publish, diagnose, latch, and only then abort (the module's
        docstring says why in that order)."""
        seq = call.seq
        transport = self._transport()
        transport.invalidate()                      # 1. no CUDA call
        self._hold(seq)                             # a rank that applied it alone has published it
        if self._completed_elsewhere(seq):
            failure = self.verdict.completed(seq)   # ok, unless a peer's failure was decided first
            completed = failure is None
        else:
            kind, failure = self.verdict.claim(seq)  # 2. every rank's watcher polls this key
            completed = kind == OK
        if completed:
            # A peer's collective completed the call before anyone claimed it failed.
            transport.revalidate()
            self.watcher.settle(call, self.timeout.total_seconds())
            return
        if failure is None:                         # 3. nobody has diagnosed it yet
            try:
                late = TimeoutError(f"call {seq} did not complete within {timeout_text(self.timeout)} of being made")
                err = self.diagnosis.diagnose(seq, late, self.watcher.completed, call.started)
            except Exception as e:  # noqa: BLE001 - the verdict must come out whatever happens
                err = GateError(f"esper_gate call {seq} did not complete within {timeout_text(self.timeout)} "
                                f"({short(e)})")
            failure = self.verdict.failed(seq, err)
            if failure is None:  # cannot happen once claimed; kept so that no call is left undecided
                failure = err
        if not getattr(transport, "self_timing", False) and self.abort is None:
            self.abort = BackgroundAbort(transport.abort, getattr(transport, "abort_what", "abort"))
        err = self.latch.record(seq, failure)       # 4. host reads raise it from here
        if self.abort is not None and self.abort.started is None:
            self.abort.start()                      # 5. may block for as long as the stream is stuck
        log.error("%s", err)

    def wait_abort(self, bound_s: float = ABORT_WAIT_S) -> bool:
        """Wait up to ``bound_s`` for this gate's abort, if one runs; whether none is left running."""
        return self.abort is None or self.abort.wait(bound_s)

    # ---- the caller's side ----------------------------------------------------
    def failed_in_call(self, call, exc: BaseException) -> GateError:
        """The op raised in the caller's thread: the call's shared verdict (the watcher's,
        when its abort raised this), else this rank's diagnosis."""
        seq = call.seq
        if self.watcher.expired:
            self.latch.wait(BOUND_S + 1.0)
        # An op that failed before its collective sent nothing: no rank can complete the call.
        contributed = not isinstance(exc, LOCAL_FAILURES)
        if self.latch.error is None and contributed:
            self._hold(seq)  # as the watcher's claim does: a rank that applied it alone has published it
            if self.watcher.expired:
                self.latch.wait(BOUND_S + 1.0)
        if self.latch.error is None:
            if contributed and self._completed_elsewhere(seq):
                shared = self.verdict.completed(seq)  # None: completed; else the failure decided first
            else:
                kind, shared = self.verdict.state(seq)
                if kind == FAILING:
                    shared = self.verdict.wait_final(seq)
                if shared is None and kind != OK:
                    err = self.diagnosis.diagnose(seq, exc, self.watcher.completed, call.started)
                    shared = self.verdict.failed(seq, err)
            self.latch.record(seq, shared if shared is not None else GateError(
                f"esper_gate call {seq} completed on the other ranks, which apply its decisions, but failed on "
                f"rank {self.rank} ({short(exc)}); this rank has none to apply"))
        self.watcher.forget(seq)
        return self.latch.deliver()

    def _before_delivery(self, seq, error) -> None:
        """Before the first raise: wait (bounded) for this rank's abort, naming it on the error
        if it is stuck; the store's host also lets the present ranks read the verdict."""
        if self.abort is not None and not self.abort.wait(ABORT_WAIT_S):
            note = self.abort.stuck_note()
            if note is not None and hasattr(error, "add_note"):
                error.add_note(note)
        if self.store_host != self.rank or seq is None:
            return
        # Ranks in the call read the verdict (their watcher polls it) and acknowledge it. Those
        # named as late are in it; so is a rank named absent that enters it now, a little later
        # still (its heartbeat shows the call LONG_CALL_S after it entered). Each is waited
        # for, or the host's exit would leave it naming the host instead of itself.
        named = set(getattr(error, "missing_ranks", None) or []) - set(getattr(error, "late_ranks", None) or [])
        present = [r for r in range(self.world) if r != self.rank and r not in named]
        absent = [r for r in named if r != self.rank]
        start = time.monotonic()
        while True:
            left = self.verdict.wait_read(seq, present, 0.0) if present else []
            now = time.monotonic()
            if absent and now - start < LATE_ENTRY_S:
                try:
                    beats = self.watcher.read_heartbeats(self.world)
                    came = [r for r in absent if beats.get(r) is not None and beats[r][0] >= seq]
                except Exception:  # noqa: BLE001 - a courtesy; the store's errors are named elsewhere
                    came = []
                present += came
                absent = [r for r in absent if r not in came]
                left += came
            if (not left and (not absent or now - start >= LATE_ENTRY_S)) or now - start >= ACK_WAIT_S:
                return
            time.sleep(0.02)
