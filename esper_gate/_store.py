"""StoreWorker: every store request a gate makes, one at a time on a thread of its own, each
waited for with a bound.

A c10d store request has no deadline of its own: when the process hosting
the job's store is stopped (SIGSTOP, a debugger, swapped out) or overloaded,
a TCPStore request waits until it answers, and c10d's store timeout does not
bound a set or a compare_set. A gate that made its requests in its watcher's
thread, or in a caller's, inherited that wait: a frozen store host hung every
peer, past any deadline. So the gate's requests run here, in order, and
whoever needs an answer waits for it at most a bound; past it the request is
abandoned (it is not sent if it has not started) and the caller gets a
``StoreUnresponsive`` that says how long the store has not answered.

A request that raises (a broken connection: the host died) is remembered, and
every later request raises it at once, so a dead store costs one failed
request and one c10d warning, not one per heartbeat.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

__all__ = ["StoreWorker", "StoreUnresponsive"]


class StoreUnresponsive(TimeoutError):
    """The store did not answer a request within its bound. ``seconds``: how long the store has
    not answered (the request in progress started that long ago)."""

    def __init__(self, text: str, seconds: float):
        super().__init__(text)
        self.seconds = seconds


class StoreWorker:
    """One gate's store requests, in order, on a thread of their own.

    Args:
        store: the c10d store (a PrefixStore of the job's).
        name: for the thread's name.
    """

    def __init__(self, store, name: str = "esper_gate-store"):
        self.store = store
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None
        self.error: BaseException | None = None
        self.requests = 0  # requests sent (tests and the store-load figures read it)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue  # its caller gave up before it was sent
            if self.error is not None:
                fut.set_exception(self.error)
                continue
            self._busy_since = time.monotonic()
            try:
                self.requests += 1
                fut.set_result(fn(self.store))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if not isinstance(e, Exception):
                    raise
                self.error = e
                fut.set_exception(e)
            finally:
                self._busy_since = None

    def unanswered_s(self) -> float:
        """How long the request in progress has waited for the store (0 when none waits)."""
        since = self._busy_since
        return 0.0 if since is None else max(time.monotonic() - since, 0.0)

    def submit(self, fn) -> concurrent.futures.Future:
        """Queue ``fn(store)``; nobody waits for it (a heartbeat)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut

    def request(self, fn, bound_s: float):
        """``fn(store)``, answered within ``bound_s`` seconds, or ``StoreUnresponsive``.

        The store's own errors are raised as they are (and every later request raises
        the first one). A request queued behind one the store does not answer waits
        with it, within the same bound."""
        if self.error is not None:
            raise self.error
        stuck = self.unanswered_s()
        if stuck > bound_s:  # a request the store has not answered for longer than this bound
            raise StoreUnresponsive(f"the job's store has not answered for {stuck:.1f} s", stuck)
        fut = self.submit(fn)
        try:
            return fut.result(timeout=max(bound_s, 0.0))
        except concurrent.futures.TimeoutError:
            fut.cancel()  # not sent if it has not started
            waited = max(self.unanswered_s(), bound_s)
            raise StoreUnresponsive(f"the job's store has not answered for {waited:.1f} s", waited) from None

    def close(self) -> None:
        self._q.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
