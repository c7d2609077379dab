"""Verdict: one outcome per call, shared by every rank of the gate.

Ranks can end a call differently without it: a rank whose deadline passed
fails the call while a late peer's collective completes, or a peer is
interrupted after its collective returned. So each call has a key in the
gate's store that the first rank to decide writes with compare-and-set:
``ok`` from a rank whose collective completed, or the failure (its type,
text and the ranks it names) from a rank that failed it. Every rank reads
the same value: a rank that completed adopts a failure written before it,
and a rank past its deadline that finds ``ok`` does not fail the call.

**The fast path: a call that succeeds makes no store request.** A rank whose
collective completed applies the call without the compare-and-set when it
completed within F (``fast_window``) of its own entry into its previous call,
and its watcher's publishing is healthy. It is safe because of two rules and
the collectives' causality, with no clock compared across hosts:

* causality: a rank j sees call n-1 complete only after every rank i
  entered it (j's result needs i's contribution, sent after i's entry);
* a rank i applies call n alone only if it completed it within F of its own
  entry into call n-1, so before F after any rank j saw call n-1 complete;
* no rank j fails call n (claims it, on its deadline or on an early error)
  before F + PUBLISH_S after it saw call n-1 complete, and before it claims
  it reads every rank's heartbeat: a rank that applied the call alone has
  published its completion by then, so the claimer finds it, and the call
  completes (``ok`` is written) instead of failing.

The one assumption is that publishing: a completion reaches the store within
PUBLISH_S. It is checked before each fast path (the store answered the last
heartbeat quickly, none is stuck, the watcher runs); when it fails, the call
confirms through the store as before. A rank stopped in the moment between its
completion and its heartbeat breaks it: that is detected when the heartbeat
lands late (``FailurePath.late_publish``), and named.
docs/integrating-esper.md §5 states it with the proof.
"""
from __future__ import annotations

import json
import time

from ._store import StoreUnresponsive
from .errors import GateError, GateTimeoutError

__all__ = ["Verdict", "OK"]

OK = "ok"


def _encode(err: GateError) -> str:
    if isinstance(err, GateTimeoutError):
        return json.dumps({"kind": "timeout", "text": str(err), "missing": err.missing_ranks,
                           "last": {str(r): c for r, c in err.last_completed.items()}, "call": err.call,
                           "late": list(getattr(err, "late_ranks", []))})
    return json.dumps({"kind": "error", "text": str(err)})


def _decode(text: str) -> GateError:
    v = json.loads(text)
    if v["kind"] == "timeout":
        err = GateTimeoutError(v["text"], v["missing"], {int(r): c for r, c in v["last"].items()}, call=v["call"])
        err.late_ranks = list(v.get("late", []))  # named, but in the call: they read the verdict
        return err
    return GateError(v["text"])


# Verdicts live in a ring of keys, each holding "<call>:<outcome>", so the store
# keeps a fixed number of them and nobody has to delete old ones.
RING = 1024
# The outcome a rank past its deadline claims before it aborts ("publish the
# failed call"): from then on no rank can decide ``ok``, and the first
# diagnosis written over it is the failure every rank raises.
FAILING = "failing"
# How long a rank that finds FAILING waits for the diagnosis that replaces it
# (the claimer diagnoses in at most _diagnosis.BOUND_S).
FINAL_WAIT_S = 6.0
_POLL_S = 0.02
# A rank's completion is in the store within this long: its watcher's next heartbeat
# (HEARTBEAT_INTERVAL_S = 1 s at most, plus a 0.05 s poll and a round trip under
# HEALTHY_RTT_S = 0.25 s, which the fast path checks before it is taken).
PUBLISH_S = 1.5
# The fast path's window: a call applied alone completed within this long of the
# rank's entry into its previous call (shorter when the timeout is, see fast_window).
FAST_WINDOW_S = 1.0


def fast_window(timeout_s: float) -> float:
    """F for a gate with this timeout: FAST_WINDOW_S, or less so that F + PUBLISH_S never
    exceeds the timeout (a claim on the deadline then never waits for the window); 0 turns
    the fast path off. Ranks take the smallest of theirs (the rendezvous shares them)."""
    return max(0.0, min(FAST_WINDOW_S, timeout_s - PUBLISH_S))


class Verdict:
    """The shared outcome of each call of one gate.

    Args:
        request: runs ``fn(store)`` on the gate's store and returns its result
            (the watcher's ``store_request``: one request at a time).
        rank: this rank; when given, every failure this rank learns is
            acknowledged under ``ack/<call>/<rank>``, so that the rank hosting
            the store can wait for the present ranks to have read it before it
            raises (and, usually, exits: ``wait_read``).
    """

    def __init__(self, request, rank: int | None = None, sleep=time.sleep, unresponsive=None, fast=None):
        self._request = request
        # fast(seq) -> whether call seq may be applied with no store request (FailurePath.applies_alone)
        self._fast = fast
        self._rank = rank
        self._sleep = sleep
        # (seq, StoreUnresponsive) -> the GateError naming the store's host
        self._unresponsive = unresponsive

    def _ack(self, store, seq: int) -> None:
        if self._rank is not None:
            store.set(f"ack/{seq % RING}/{self._rank}", str(seq))

    def _decide(self, seq: int, mine: str) -> str:
        """Write ``mine`` unless the call is decided; a failure also replaces FAILING.
        Returns the call's outcome afterwards (OK, FAILING or an encoded failure)."""
        def decide(store):
            key, want = f"v/{seq % RING}", f"{seq}:"
            seen = ""  # an empty key, or a call from earlier around the ring
            while True:
                got = store.compare_set(key, seen, want + mine).decode()
                if got.startswith(want):  # decided: by this request or a peer's
                    outcome = got[len(want):]
                    if outcome == FAILING and mine not in (OK, FAILING):
                        seen = got  # claimed, not yet diagnosed: the first diagnosis replaces it
                        continue
                    if outcome not in (OK, FAILING):
                        self._ack(store, seq)
                    return outcome
                # A missing key answers with the value expected: then expect it empty.
                seen = "" if got == seen else got
        return self._request(decide)

    def state(self, seq: int, bound_s: float | None = None) -> tuple[str | None, GateError | None]:
        """(None | OK | FAILING | "failed", failure) of call ``seq``, without deciding it.
        A failure read here is acknowledged. No store (or none within ``bound_s``): (None, None)."""
        def read(store):
            key, want = f"v/{seq % RING}", f"{seq}:"
            got = store.get(key).decode() if store.check([key]) else ""
            if not got.startswith(want):
                return None
            outcome = got[len(want):]
            if outcome not in (OK, FAILING):
                self._ack(store, seq)
            return outcome
        try:
            got = self._request(read) if bound_s is None else self._request(read, bound_s)
        except Exception:  # noqa: BLE001 - no store: nothing decided that this rank can see
            return None, None
        if got in (None, OK, FAILING):
            return got, None
        return "failed", _decode(got)

    def peek(self, seq: int) -> tuple[bool, GateError | None]:
        """(decided, failure) of call ``seq`` without deciding it: a rank past its
        deadline adopts a verdict already made instead of diagnosing anew."""
        kind, failure = self.state(seq)
        return kind in (OK, "failed"), failure

    def claim(self, seq: int) -> tuple[str, GateError | None]:
        """Publish that call ``seq`` failed, before any abort (every rank's watcher polls
        this key while its call waits). Returns (OK, None) when a peer's collective
        completed it first (nothing failed), else (FAILING, None) or ("failed", the
        failure a peer already diagnosed). Without a store: (FAILING, None)."""
        try:
            got = self._decide(seq, FAILING)
        except Exception:  # noqa: BLE001 - the store's host is gone: the peers learn it from their own deadline
            return FAILING, None
        if got in (OK, FAILING):
            return got, None
        return "failed", _decode(got)

    def wait_final(self, seq: int, bound_s: float = FINAL_WAIT_S) -> GateError | None:
        """A peer claimed call ``seq`` failed: wait up to ``bound_s`` for its diagnosis."""
        deadline = time.monotonic() + bound_s
        while True:
            kind, failure = self.state(seq)
            if kind == "failed" or time.monotonic() >= deadline or kind is None:
                return failure
            self._sleep(_POLL_S)

    def completed(self, seq: int, quiet: bool = True) -> GateError | None:
        """This rank's collective completed: None if the call stands, else the failure a
        peer decided first (which this rank must raise instead of its decisions).
        Without a store no peer can have decided, so the call stands (``quiet=False``:
        the store's error is raised instead)."""
        try:
            got = self._decide(seq, OK)
        except Exception:  # noqa: BLE001 - the store's host is gone; its death is named elsewhere
            if not quiet:
                raise
            return None
        return self._after_completion(seq, got)

    def _after_completion(self, seq: int, got: str) -> GateError | None:
        if got == OK:
            return None
        if got == FAILING:
            # A peer passed its deadline and aborted: this rank's results are void too.
            return self.wait_final(seq) or GateError(
                f"esper_gate call {seq} was failed by a rank whose deadline passed, and its diagnosis did not "
                f"arrive; no rank applied a transition for this call")
        return _decode(got)

    def confirm(self, seq: int, latch, void=None) -> None:
        """Before call ``seq``'s decisions are read on the host: raise its failure if it
        failed here or on a peer (latching it), else return.

        ``void()`` says whether this rank's own call is void: its decisions were
        invalidated (and not restored by a peer's completion) or its communicator
        aborted. Such a buffer may be an aborted collective's, on which the stream
        ran on: with no store to say that a peer completed the call, it raises
        (the verdict its watcher latches, or a GateError) instead of standing."""
        latch.raise_for(seq)
        if self._fast is not None and (void is None or not void()) and self._fast(seq):
            return  # no rank can fail it now without reading this rank's published completion
        try:
            got = self._decide(seq, OK)
        except StoreUnresponsive as e:
            # No decisions after the deadline's bound: the store's host, stopped or
            # overloaded, is named (the request sent may still land when it resumes;
            # docs/integrating-esper.md §5 says what that leaves open).
            err = self._unresponsive(seq, e) if self._unresponsive is not None else GateError(
                f"esper_gate call {seq}: {e}; this rank applies no transition for it")
            latch.record(seq, err)
            latch.raise_for(seq)
            return
        except Exception as e:  # noqa: BLE001 - the store's host is gone
            if void is None or not void():
                return  # the collective completed here; nothing says otherwise
            latch.wait(FINAL_WAIT_S)  # the watcher is failing it: take its verdict
            latch.record(seq, GateError(
                f"esper_gate call {seq} was invalidated on this rank (its deadline passed or its communicator was "
                f"aborted), and the job's store, which would say whether a peer completed it, stopped answering "
                f"({type(e).__name__}); this rank applies no transition for it"))
            latch.raise_for(seq)
            return
        failure = self._after_completion(seq, got)
        if failure is not None:
            latch.record(seq, failure)
            latch.raise_for(seq)

    def failed(self, seq: int, err: GateError) -> GateError | None:
        """This rank fails the call with ``err``: the failure every rank raises (``err``, or
        the one a peer decided first), or None when a peer's collective completed it."""
        try:
            got = self._decide(seq, _encode(err))
        except Exception:  # noqa: BLE001 - no store to share through: this rank's own diagnosis stands
            return err
        return None if got == OK else _decode(got)

    def wait_read(self, seq: int, ranks, bound_s: float) -> list[int]:
        """Wait up to ``bound_s`` until every rank in ``ranks`` acknowledged call ``seq``'s
        failure; returns the ranks that did not (the store's host calls this before it
        raises, so that a host that exits at once does not leave the others unable to read it)."""
        deadline = time.monotonic() + bound_s
        left = list(ranks)
        while left:
            def read(store, left=left):
                out = []
                for r in left:
                    key = f"ack/{seq % RING}/{r}"
                    if not (store.check([key]) and store.get(key).decode() == str(seq)):
                        out.append(r)
                return out
            try:
                left = self._request(read)
            except Exception:  # noqa: BLE001
                return left
            if not left or time.monotonic() >= deadline:
                break
            self._sleep(_POLL_S)
        return left
