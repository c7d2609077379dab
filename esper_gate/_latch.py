"""FailureLatch: the first failure of one gate, shared by the gate, its results and its watcher."""
from __future__ import annotations

import threading

from .errors import GateError

__all__ = ["FailureLatch"]


class FailureLatch:
    """Holds the first failure of a gate and the call it happened at.

    The watcher thread, a failing call and a result being read may all find a
    failure at once; the first one recorded is the gate's verdict, and every
    later call and every read of that call's (or a later call's) results
    raises it. The first raise delivers it as it is; calls after that say the
    gate is unusable and chain it.
    """

    def __init__(self, before_delivery=None) -> None:
        # Called once, in the caller's thread, before the failure is first raised
        # (the store's host waits there for the present ranks to read the verdict).
        self.before_delivery = before_delivery
        self._lock = threading.Lock()
        self._set = threading.Event()
        self._error: GateError | None = None
        self._seq: int | None = None
        self._delivered = False

    @property
    def error(self) -> GateError | None:
        return self._error

    @property
    def seq(self) -> int | None:
        """The call that failed (0 is the construction's warm-up), or None."""
        return self._seq

    def record(self, seq: int, error: GateError) -> GateError:
        """Latch ``error`` for call ``seq`` unless a failure is latched already; return the latched one."""
        with self._lock:
            if self._error is None:
                self._error, self._seq = error, seq
                self._set.set()
            return self._error

    def failed_at(self, seq: int) -> bool:
        """Whether call ``seq`` failed or came after the call that did."""
        return self._seq is not None and seq >= self._seq

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a failure to be latched."""
        return self._set.wait(timeout)

    def raise_for(self, seq: int) -> None:
        """Raise the failure if call ``seq``'s results are void (it failed, or an earlier call did)."""
        if self.failed_at(seq):
            self._first_delivery()
            raise self._error

    def deliver(self) -> GateError:
        """The failure, counted as delivered to the caller (the caller raises it)."""
        self._first_delivery()
        return self._error

    def _first_delivery(self) -> None:
        with self._lock:
            first, self._delivered = not self._delivered, True
        if first and self.before_delivery is not None:
            try:
                self.before_delivery(self._seq, self._error)
            except Exception:  # noqa: BLE001 - a courtesy to the peers; the failure is raised regardless
                pass

    def check_usable(self) -> None:
        """At the start of a call: raise the failure the first time nobody has seen it, then
        say the gate is unusable."""
        if self._error is None:
            return
        if not self._delivered:
            self._first_delivery()
            raise self._error
        raise GateError(f"this GateSync is unusable after call {self._seq} failed; build a new one on every "
                        f"rank. The failure: {self._error}") from self._error
