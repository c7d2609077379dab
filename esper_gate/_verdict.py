"""Verdict: one outcome per call, shared by every rank of the gate.

Ranks can end a call differently without it: a rank whose deadline passed
fails the call while a late peer's collective completes, or a peer is
interrupted after its collective returned. So each call has a key in the
gate's store that the first rank to decide writes with compare-and-set:
``ok`` from a rank whose collective completed, or the failure (its type,
text and the ranks it names) from a rank that failed it. Every rank reads
the same value: a rank that completed adopts a failure written before it,
and a rank past its deadline that finds ``ok`` does not fail the call.
"""
from __future__ import annotations

import json

from .errors import GateError, GateTimeoutError

__all__ = ["Verdict", "OK"]

OK = "ok"


def _encode(err: GateError) -> str:
    if isinstance(err, GateTimeoutError):
        return json.dumps({"kind": "timeout", "text": str(err), "missing": err.missing_ranks,
                           "last": {str(r): c for r, c in err.last_completed.items()}, "call": err.call})
    return json.dumps({"kind": "error", "text": str(err)})


def _decode(text: str) -> GateError:
    v = json.loads(text)
    if v["kind"] == "timeout":
        return GateTimeoutError(v["text"], v["missing"], {int(r): c for r, c in v["last"].items()}, call=v["call"])
    return GateError(v["text"])


# Verdicts live in a ring of keys, each holding "<call>:<outcome>", so the store
# keeps a fixed number of them and nobody has to delete old ones.
RING = 1024


class Verdict:
    """The shared outcome of each call of one gate.

    Args:
        request: runs ``fn(store)`` on the gate's store and returns its result
            (the watcher's ``store_request``: one request at a time).
    """

    def __init__(self, request):
        self._request = request

    def _decide(self, seq: int, mine: str) -> GateError | None:
        def decide(store):
            key, want = f"v/{seq % RING}", f"{seq}:"
            seen = ""  # an empty key, or a call from earlier around the ring
            while True:
                got = store.compare_set(key, seen, want + mine).decode()
                if got.startswith(want):  # decided: by this request or a peer's
                    return got[len(want):]
                # A missing key answers with the value expected: then expect it empty.
                seen = "" if got == seen else got
        outcome = self._request(decide)
        return None if outcome == OK else _decode(outcome)

    def completed(self, seq: int) -> GateError | None:
        """This rank's collective completed: None if the call stands, else the failure a
        peer decided first (which this rank must raise instead of its decisions).
        Without a store no peer can have decided, so the call stands."""
        try:
            return self._decide(seq, OK)
        except Exception:  # noqa: BLE001 - the store's host is gone; its death is named elsewhere
            return None

    def peek(self, seq: int) -> tuple[bool, GateError | None]:
        """(decided, failure) of call ``seq`` without deciding it: a rank past its
        deadline adopts a verdict already made instead of diagnosing anew."""
        def read(store):
            key, want = f"v/{seq % RING}", f"{seq}:"
            got = store.get(key).decode() if store.check([key]) else ""
            return got[len(want):] if got.startswith(want) else None
        try:
            got = self._request(read)
        except Exception:  # noqa: BLE001 - no store: nothing decided that this rank can see
            return False, None
        if got is None:
            return False, None
        return True, (None if got == OK else _decode(got))

    def confirm(self, seq: int, latch) -> None:
        """Before call ``seq``'s decisions are read on the host: raise its failure if it
        failed here or on a peer (latching it), else return."""
        latch.raise_for(seq)
        failure = self.completed(seq)
        if failure is not None:
            latch.record(seq, failure)
            latch.raise_for(seq)

    def failed(self, seq: int, err: GateError) -> GateError | None:
        """This rank fails the call with ``err``: the failure every rank raises (``err``, or
        the one a peer decided first), or None when a peer's collective completed it."""
        try:
            return self._decide(seq, _encode(err))
        except Exception:  # noqa: BLE001 - no store to share through: this rank's own diagnosis stands
            return err
