"""The watcher thread behind each GateSync: heartbeats, GPU completion, deadlines.

A gate call only appends its number and deadline to a deque and sets an
int; everything that waits, polls or talks to the store happens here, off
the training loop's thread. Its store requests go through a StoreWorker
(``_store``), so a store that does not answer never stops this thread:
deadlines fire whatever the store does.

Store load, per rank (the formula docs/integrating-esper.md §5 states):

* idle, or calls completing normally: one heartbeat per HEARTBEAT_INTERVAL_S
  (1 per second), whatever the call rate, and a whereabouts write when the
  rank moved; each heartbeat carries the last call completed here, so a
  completion is in the store within PUBLISH_S (the verdict's fast path
  relies on it: ``_verdict``);
* while a call has waited longer than LONG_CALL_S (a peer is missing: the
  rare case the store is for): a heartbeat and a whereabouts write every
  LONG_CALL_POLL_S, and a read of the call's verdict key every
  LONG_CALL_POLL_S, so a diagnosis sees where every rank is and when it came.
"""
from __future__ import annotations

import collections
import threading
import time

from ._store import StoreWorker
from ._verdict import PUBLISH_S

HEARTBEAT_INTERVAL_S = 1.0
# A store round trip longer than this (or a heartbeat left unanswered this long)
# makes the watcher's publishing unhealthy: calls then confirm through the store.
HEALTHY_RTT_S = 0.25
# How often the watcher looks at deadlines, GPU completion and its heartbeat.
WATCH_POLL_S = 0.05
# A call that waits longer than this is republished every LONG_CALL_POLL_S
# (a healthy call takes milliseconds, so only stuck ones cost store writes).
# Shorter than the diagnosis's settling time (_diagnosis.SETTLE_S), so a rank
# that entered a stuck call shows it before a peer's diagnosis reads again.
LONG_CALL_S = 0.3
LONG_CALL_POLL_S = 0.1
# The longest a store request of the gate waits for an answer (a heartbeat's
# write is never waited for); past it the store's host is named as not answering.
STORE_BOUND_S = 2.0
# A gap this long between two of this thread's polls means this process was
# stopped (SIGSTOP, a debugger) or starved: a diagnosis then names this rank.
STALL_S = 1.5


class Call:
    __slots__ = ("seq", "deadline", "event", "started")

    def __init__(self, seq: int, deadline: float):
        self.seq = seq
        self.deadline = deadline
        self.event = None  # CUDA: recorded after the op is enqueued
        self.started = time.monotonic()


class Whereabouts:
    """Where this rank last was among the gates of one parent group, for its peers'
    diagnoses: the last call it entered in any of them, and whether that call has completed
    on this rank since. Published as ``where/<rank>`` = ``gate,call,completed`` in the
    parent's store.

    One per parent group in a process (``of``), shared by the watchers of its gates: the
    watcher of the gate the rank last entered publishes the rank's latest state, whichever
    gate's event changed it. (With each watcher publishing its own gate's calls, the store
    held whichever watcher wrote last, and calls entered but not whether they completed: a
    rank that had completed every call of one gate and was late into another was reported
    waiting in the first.) A call that failed stays not completed: the rank was held there
    while its peers waited for it elsewhere.
    """

    _shared: dict[tuple[str, int], "Whereabouts"] = {}  # (parent group name, rank there) -> this process's

    @classmethod
    def of(cls, parent: str, rank: int) -> "Whereabouts":
        return cls._shared.setdefault((parent, rank), cls(rank))

    def __init__(self, rank: int):
        self.key = f"where/{rank}"
        # (gate, call) last entered; set by one assignment on the caller's thread
        self._entered = (-1, -1)
        self._done: dict[int, int] = {}  # open gate -> last call completed there
        self._lock = threading.Lock()
        self._publishing = threading.Lock()
        self._written: tuple | None = None

    def open(self, gate: int) -> None:
        """Gate ``gate`` is being built here: construction is its call 0, entered now."""
        with self._lock:
            self._done[gate] = -1
        self._entered = (gate, 0)

    def enter(self, gate: int, seq: int) -> None:
        self._entered = (gate, seq)

    def completed(self, gate: int, seq: int) -> None:
        with self._lock:
            if self._done.get(gate, seq) < seq:
                self._done[gate] = seq

    def close(self, gate: int) -> None:
        with self._lock:
            self._done.pop(gate, None)

    def state(self) -> tuple[int, int, bool]:
        """(gate, call, completed); a closed gate's call is over too."""
        gate, seq = self._entered
        last = self._done.get(gate)
        return gate, seq, last is None or last >= seq

    def due(self, gate: int) -> bool:
        """Whether the watcher of ``gate`` should publish: the rank last entered ``gate`` and
        its state there is not yet in the store."""
        state = self.state()
        return state[0] == gate and state != self._written

    def publish(self, store) -> None:
        """Write the latest state, unless another watcher is writing it now (then the
        next poll sees whether it is still due)."""
        if not self._publishing.acquire(blocking=False):
            return
        try:
            state = self.state()
            if state != self._written:
                store.set(self.key, f"{state[0]},{state[1]},{int(state[2])}")
                self._written = state
        finally:
            self._publishing.release()


class Watcher:
    """This rank's background thread for one GateSync.

    * Publishes ``entered,completed,beat,waited_ms`` under ``hb/<rank>`` in the
      store: at once when a call starts or completes, at least once per
      HEARTBEAT_INTERVAL_S, so peers can tell a live rank from a dead one, and
      every LONG_CALL_POLL_S while a call has been waiting longer than
      LONG_CALL_S, so a diagnosis can tell when each rank entered it
      (``waited_ms``: how long this rank has waited in its last call, -1 when
      that call completed).
    * On CUDA, a call is completed when the device wrote its number to the
      transport's mapped DONE word after decode (``progress()``, a host read):
      this thread makes no CUDA call at all (a cudaEventQuery from here would
      create a context on device 0 and invalidate a user's global-mode graph
      capture), and nothing it does can wait behind a stuck stream.
    * While the oldest call has waited longer than LONG_CALL_S, asks
      ``news(call)`` every LONG_CALL_POLL_S whether a peer published that the
      call failed (NCCL needs every rank to abort); if so it expires now.
    * When the oldest unfinished call passes its deadline, calls
      ``on_expired(call)`` on a thread of its own, so heartbeats go on while
      the diagnosis sleeps. ``expired`` stays set until ``resume()`` (the
      call completed after all) clears it, so one deadline fires once.
    """

    def __init__(self, store, rank: int, on_expired, group_failed=None, whereabouts=None, progress=None, news=None):
        self._group_failed = group_failed
        self._progress = progress
        self._news = news
        self._last_news = 0.0
        self._store = store
        self._key = f"hb/{rank}"
        # (store shared by every gate on the parent group, this gate's index there, the
        # parent's Whereabouts): where this rank is among the parent's gates, so that a
        # diagnosis can tell a rank waiting in another gate from one that is absent.
        self._where = whereabouts
        if whereabouts is not None:
            whereabouts[2].open(whereabouts[1])
        # -1: no call entered or completed yet; call 0 is construction's warm-up, so a
        # rank that has not reached it reads as absent from it.
        self.entered = -1
        self._entered_at = time.monotonic()
        self.completed = -1
        # call -> when this rank entered it / saw it complete (its monotonic clock; the last few)
        self._entries: dict[int, float] = {}
        self._completed_at: dict[int, float] = {}
        # The newest call applied on the verdict's fast path and when, until a heartbeat
        # that carries it lands (then checked against PUBLISH_S: on_late_publish).
        self._fast: tuple[int, float] | None = None
        self.on_late_publish = None
        # (completed carried, when it was queued, when it landed) of the last heartbeat that landed
        self._landed: tuple[int, float, float] | None = None
        self._queued_at = 0.0
        self.inflight: collections.deque[Call] = collections.deque()
        self.expired = False
        self._on_expired = on_expired
        self._beat = 0
        # Every store request of this gate, in order, on a thread of its own: a store that
        # does not answer never stops this thread, and a dead one costs one failed request.
        self._worker = StoreWorker(store, name=f"esper_gate-store-{rank}")
        self._pending_beat = None
        self._stop = threading.Event()
        self.failure_threads: list[threading.Thread] = []
        # (when, seconds) of each gap between two polls longer than STALL_S: this process stopped
        self.stalls: list[tuple[float, float]] = []
        self._last_loop = time.monotonic()
        self._written = self._publish()
        self._last_write = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"esper_gate-watch-{rank}", daemon=True)
        self._thread.start()

    @property
    def store_error(self) -> BaseException | None:
        """The store's first error (its host died): every later request raises it at once."""
        return self._worker.error

    @property
    def store_requests(self) -> int:
        """Store requests this gate has sent so far (heartbeats, whereabouts, verdicts, reads)."""
        return self._worker.requests

    def begin(self, seq: int, deadline: float) -> Call:
        call = Call(seq, deadline)
        self.inflight.append(call)
        self.entered = seq
        self._entered_at = call.started
        self._entries[seq] = call.started
        self._entries.pop(seq - 3, None)
        if self._where is not None:
            self._where[2].enter(self._where[1], seq)
        return call

    def _done(self, seq: int) -> None:
        self._completed_at.setdefault(seq, time.monotonic())
        self._completed_at.pop(seq - 3, None)
        if self._where is not None:
            self._where[2].completed(self._where[1], seq)

    def built(self) -> None:
        """Construction completed on this rank (its warm-up, call 0, done or skipped)."""
        self._done(0)

    def end_host(self, seq: int) -> None:
        """A call whose collective finished on the host (CPU tensors)."""
        self.completed = max(self.completed, seq)
        if self.inflight and self.inflight[0].seq == seq:
            self.inflight.popleft()
        else:
            self.forget(seq)
        self._done(seq)

    def forget(self, seq: int) -> None:
        """Stop watching call ``seq`` (it failed in its caller's thread, or completed out of order)."""
        self.inflight = collections.deque(c for c in self.inflight if c.seq != seq)

    def is_completed(self, call: Call) -> bool:
        """Whether ``call`` finished on every rank: its event fired on a group that did not
        fail (CUDA), or its collective returned here (CPU)."""
        if call.event is not None and self._progress is not None:
            return self._progress() >= call.seq and not (self._group_failed is not None and self._group_failed())
        return self.completed >= call.seq

    def resume(self) -> None:
        """The expired call completed after all (a near miss): watch deadlines again."""
        self.expired = False

    def _expire(self, call: Call) -> None:
        if self.expired:
            return
        self.expired = True
        t = threading.Thread(target=self._on_expired, args=(call,), daemon=True, name="esper_gate-diagnose")
        # Kept for the exit hook (gate_sync._stop_watchers_at_exit), which joins them too:
        # they make store requests like this thread.
        self.failure_threads = [x for x in self.failure_threads if x.is_alive()] + [t]
        t.start()

    def pause(self, seconds: float) -> None:
        """A diagnosis's wait: cut short when the watcher stops (close, or the interpreter's exit)."""
        self._stop.wait(seconds)

    def _where_due(self) -> bool:
        return self._where is not None and self._where[2].due(self._where[1])

    def _publish(self) -> tuple[int, int]:
        """Queue this rank's heartbeat (and, when it moved, its whereabouts) on the store
        worker; nothing waits for it. Both go out at the heartbeat's pace: once a second,
        and every LONG_CALL_POLL_S while a call waits long (the rare case a diagnosis
        reads them for)."""
        state = (self.entered, self.completed)
        self._beat += 1
        where = self._where if self._where_due() else None
        waited_ms = int((time.monotonic() - self._entered_at) * 1000) if state[0] > state[1] else -1
        beat = f"{state[0]},{state[1]},{self._beat},{waited_ms}"

        queued = time.monotonic()

        def write(store, key=self._key):
            if where is not None:
                where[2].publish(where[0])
            store.set(key, beat)
            self._landed = (state[1], queued, time.monotonic())
        self._queued_at = queued
        self._pending_beat = self._worker.submit(write)
        return state

    def _waiting_long(self, now: float) -> bool:
        return self.entered > self.completed and now - self._entered_at > LONG_CALL_S

    def _advance_gpu(self) -> None:
        if self._progress is None:
            return
        done = self._progress()  # a host read of mapped memory: no CUDA call
        while self.inflight:
            try:
                call = self.inflight[0]
            except IndexError:
                return
            if call.event is None or call.seq > done:
                break
            self.completed = call.seq
            self.inflight.popleft()
            self._done(call.seq)
        if self.inflight and self._group_failed is not None and self._group_failed():
            # The communicator reports an asynchronous error (ncclCommGetAsyncError):
            # the call in flight will not complete; it takes the deadline's path now.
            self._expire(self.inflight[0])

    def _check_news(self, now: float) -> None:
        if self._news is None:
            return
        try:
            call = self.inflight[0]
        except IndexError:
            return
        if now - call.started < LONG_CALL_S or now - self._last_news < LONG_CALL_POLL_S:
            return
        self._last_news = now
        try:
            if self._news(call):
                self._expire(call)
        except Exception:  # noqa: BLE001 - a dead store: the deadline still fires
            pass

    def _check_deadline(self) -> None:
        try:
            call = self.inflight[0]
        except IndexError:
            return
        if time.monotonic() > call.deadline:
            self._expire(call)

    def _run(self) -> None:
        while not self._stop.wait(WATCH_POLL_S):
            now = time.monotonic()
            if now - self._last_loop > STALL_S:
                self.stalls.append((self._last_loop, now - self._last_loop))
            self._last_loop = now
            try:
                self._advance_gpu()
            except Exception:  # noqa: BLE001 - a broken CUDA context: the deadline still fires
                pass
            self._check_deadline()
            now = time.monotonic()
            self._check_news(now)
            self._check_fast(now)
            if self.store_error is not None:
                continue
            due = LONG_CALL_POLL_S if self._waiting_long(now) else HEARTBEAT_INTERVAL_S
            if now - self._last_write < due:
                continue
            if self._pending_beat is not None and not self._pending_beat.done():
                continue  # the store has not answered the last one: no pile-up behind it
            self._written = self._publish()
            self._last_write = now

    # ---- the verdict's fast path (_verdict: a call applied with no store request) --------
    def entered_at(self, seq: int) -> float | None:
        """When this rank entered call ``seq`` (its monotonic clock), if it is among the last few."""
        return self._entries.get(seq)

    def completed_at(self, seq: int) -> float | None:
        """When this rank saw call ``seq`` complete, if it is among the last few."""
        return self._completed_at.get(seq)

    def has_completed(self, seq: int) -> bool:
        """Whether call ``seq`` completed here (CUDA: its DONE word, read on the host)."""
        if self.completed >= seq:
            return True
        return self._progress is not None and self._progress() >= seq

    def publish_healthy(self, now: float) -> bool:
        """Whether a completion made now will be in the store within PUBLISH_S: the store
        answers (no error, the last heartbeat's round trip and any heartbeat in flight under
        HEALTHY_RTT_S) and this thread is running (it polled within STALL_S)."""
        if self.store_error is not None or self._stop.is_set() or now - self._last_loop > STALL_S:
            return False
        pending = self._pending_beat
        if pending is not None and not pending.done() and now - self._queued_at > HEALTHY_RTT_S:
            return False
        landed = self._landed
        return landed is not None and landed[2] - landed[1] <= HEALTHY_RTT_S

    def applied_alone(self, seq: int, at: float) -> None:
        """Call ``seq`` was applied at ``at`` with no store request: watch that a heartbeat
        carrying it lands within PUBLISH_S."""
        self._fast = (seq, at)

    def _check_fast(self, now: float) -> None:
        fast = self._fast
        if fast is None:
            return
        landed = self._landed
        if landed is not None and landed[0] >= fast[0] and landed[2] >= fast[1]:
            self._fast = None
            if landed[2] - fast[1] <= PUBLISH_S:
                return
            late = landed[2] - fast[1]
        elif now - fast[1] > PUBLISH_S:
            self._fast = None
            late = now - fast[1]
        else:
            return
        if self.on_late_publish is not None:
            threading.Thread(target=self.on_late_publish, args=(fast[0], late), daemon=True,
                             name="esper_gate-late-publish").start()

    def stalled_s(self, since: float) -> float:
        """The longest stop of this process (a gap between two polls) that ended after ``since``."""
        return max((gap for at, gap in self.stalls if at + gap >= since), default=0.0)

    def store_request(self, request, bound_s: float = STORE_BOUND_S):
        """``request(store)`` in turn with this watcher's own requests, answered within
        ``bound_s`` (``_store.StoreUnresponsive`` otherwise); raises the store's error, the
        first time or again (a dead store costs one failed request)."""
        return self._worker.request(request, bound_s)

    def read_heartbeats(self, world: int) -> dict[int, tuple[int, ...] | None]:
        """Every rank's heartbeat; raises the store's error."""
        return self.store_request(lambda store: read_heartbeats(store, world))

    def settle(self, call: Call, extend_s: float) -> None:
        """Another rank completed ``call``: stop failing it. A host call is done (its
        caller was interrupted after the collective returned); a GPU call gets until
        ``extend_s`` from now for its event to fire."""
        if call.event is None:
            if self.inflight and self.inflight[0] is call:
                self.end_host(call.seq)
        else:
            call.deadline = time.monotonic() + extend_s
        self.resume()

    def read_whereabouts(self, ranks) -> dict[int, tuple[int, int, bool] | None]:
        """For each rank, (gate index, call, completed) of the last call it entered in any gate
        on the parent group, or None; raises the store's error."""
        out: dict[int, tuple[int, int, bool] | None] = {r: None for r in ranks}
        if self._where is None:
            return out
        store = self._where[0]

        def read(_):
            for r in ranks:
                key = f"where/{r}"
                if store.check([key]):
                    gate, seq, done = (int(x) for x in store.get(key).decode().split(","))
                    out[r] = (gate, seq, bool(done))
            return out
        return self.store_request(read)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * HEARTBEAT_INTERVAL_S)
        if self._where is not None:
            self._where[2].close(self._where[1])
        self._worker.close()


def read_heartbeats(store, world: int) -> dict[int, tuple[int, ...] | None]:
    """Every rank's last heartbeat (None: never written). Store errors propagate."""
    out: dict[int, tuple[int, ...] | None] = {}
    for r in range(world):
        key = f"hb/{r}"
        if not store.check([key]):
            out[r] = None
            continue
        out[r] = tuple(int(x) for x in store.get(key).decode().split(","))
    return out
