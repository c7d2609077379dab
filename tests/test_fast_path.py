"""The verdict's fast path: a call that succeeds makes no store request on the caller's path.

The rule and its proof are in esper_gate/_verdict.py's docstring and
docs/integrating-esper.md §5. In-process: the rule (``FailurePath.applies_alone``),
the claimer's hold and heartbeat check, the late-publish detection, the watcher's
publishing health. Spawned (gloo and the owned NCCL double, W=2): store requests
counted with a store wrapper on a loop of calls; calls further apart than the
window, and a store that answers slowly (the assumption broken), confirm through
the store; a rank that fails a call early finds its peer's published completion
instead of splitting.
"""
import threading
import time
import types

import pytest

from test_failure_path import Transport

import esper_gate
from esper_gate import _verdict
from esper_gate._failure import FailurePath
from esper_gate._group import fast_window as shared_window
from esper_gate._latch import FailureLatch
from esper_gate._spawn import spawn_ranks, values
from esper_gate._verdict import FAST_WINDOW_S, PUBLISH_S, Verdict, fast_window
from esper_gate._watcher import HEALTHY_RTT_S, Watcher
from esper_gate.errors import GateError


# ---- in-process: the rule ----------------------------------------------------------------------

class FakeWatcher:
    def __init__(self, entered=None, done=True, healthy=True, completed_at=None, beats=None):
        self.entries = entered or {}
        self.done, self.healthy = done, healthy
        self.expired = False
        self.fast = []
        self.paused = []
        self._completed_at = completed_at or {}
        self.beats = beats or {}
        self.settled = []
        self.completed = -1

    def entered_at(self, seq):
        return self.entries.get(seq)

    def completed_at(self, seq):
        return self._completed_at.get(seq)

    def has_completed(self, seq):
        self.asked_done = seq
        return self.done

    def publish_healthy(self, now):
        self.asked_healthy = now
        return self.healthy

    def applied_alone(self, seq, at):
        self.fast.append(seq)
        self.fast_at = at

    def pause(self, seconds):
        self.paused.append(seconds)

    def read_heartbeats(self, world):
        if isinstance(self.beats, Exception):
            raise self.beats
        return self.beats

    def settle(self, call, extend_s):
        self.settled.append(call.seq)

    def resume(self):
        self.expired = False


class FakeVerdict:
    def __init__(self, completed=None, claim=("failing", None)):
        self._completed, self._claim = completed, claim
        self.calls = []

    def completed(self, seq, quiet=True):
        self.calls.append(("completed", seq))
        if isinstance(self._completed, Exception) and not isinstance(self._completed, GateError):
            if quiet:
                return None
            raise self._completed
        return self._completed

    def claim(self, seq):
        self.calls.append(("claim", seq))
        return self._claim

    def state(self, seq, bound_s=None):
        self.calls.append(("state", seq))
        return None, None

    def failed(self, seq, err):
        self.calls.append(("failed", seq))
        return err


class FakeTransport(Transport):
    self_timing = True


def _path(watcher, verdict=None, fast_s=1.0, latch=None, world=2):
    diagnosis = types.SimpleNamespace(diagnose=lambda *a: GateError("diagnosed"))
    transport = FakeTransport()
    path = FailurePath(lambda: transport, watcher, diagnosis, verdict or FakeVerdict(), latch or FailureLatch(),
                       __import__("datetime").timedelta(seconds=5), 0, world, None)
    path.fast_s = fast_s
    return path, transport


def test_a_call_completed_within_the_window_of_the_previous_entry_is_applied_alone():
    now = time.monotonic()
    w = FakeWatcher(entered={4: now - 0.2, 0: now - 0.1})
    path, _ = _path(w)
    assert path.applies_alone(5) and w.fast == [5]
    after = time.monotonic()
    assert w.asked_done == 5 and now <= w.asked_healthy <= after and w.fast_at == w.asked_healthy
    assert path.applies_alone(1) and w.fast == [5, 1]   # call 1: the warm-up (call 0) is the previous call


@pytest.mark.parametrize("why", ["outside", "no_entry", "first_call", "off", "unhealthy", "not_done",
                                 "expired", "latched"])
def test_the_fast_path_is_refused_whenever_a_condition_fails(why):
    now = time.monotonic()
    w = FakeWatcher(entered={4: now - (1.5 if why == "outside" else 0.2)}, done=why != "not_done",
                    healthy=why != "unhealthy")
    if why == "no_entry":
        w.entries = {}
    if why == "off":
        w.entries = {4: now + 10}   # no window can be too short for it: only F = 0 refuses it
    w.expired = why == "expired"
    latch = FailureLatch()
    if why == "latched":
        latch.record(3, GateError("an earlier call failed"))
    path, _ = _path(w, fast_s=0.0 if why == "off" else 1.0, latch=latch)
    assert not path.applies_alone(0 if why == "first_call" else 5)
    assert w.fast == []


def test_the_window_follows_the_timeout_and_the_ranks_take_the_smallest():
    assert fast_window(60) == FAST_WINDOW_S
    assert fast_window(PUBLISH_S + 0.4) == pytest.approx(0.4)
    assert fast_window(PUBLISH_S) == 0.0 and fast_window(0.5) == 0.0
    # a claim on the deadline never waits for the window: F + PUBLISH_S <= T whenever F > 0
    for t in (1.6, 2.0, 2.5, 3.0, 60.0):
        assert fast_window(t) + PUBLISH_S <= t + 1e-9
    assert shared_window({0: {"fast_window": 1.0}, 1: {"fast_window": 0.25}}) == 0.25
    assert shared_window({0: {"fast_window": 1.0}, 1: {}}) == 0.0  # a rank that offers none turns it off


def test_a_claim_waits_for_the_window_and_the_publish_after_the_previous_completion():
    now = time.monotonic()
    w = FakeWatcher(completed_at={6: now - 0.5})
    path, _ = _path(w, fast_s=1.0)
    path._hold(7)
    assert w.paused and w.paused[0] == pytest.approx(1.0 + PUBLISH_S - 0.5, abs=0.05)
    w.paused.clear()
    w._completed_at = {6: now - 10}
    path._hold(7)
    assert w.paused == []  # long past: no wait
    path.fast_s = 0.0
    w._completed_at = {6: now}
    path._hold(7)
    assert w.paused == []  # no fast path, nothing to wait for
    path.fast_s = 1.0
    w._completed_at = {}
    path._hold(7)          # not known: wait the whole window from now
    assert w.paused and w.paused[0] == pytest.approx(1.0 + PUBLISH_S, abs=0.05)
    w.paused.clear()
    w._completed_at = {0: time.monotonic() - (1.0 + PUBLISH_S - 0.5)}
    path._hold(1)          # call 1 waits on the warm-up (call 0), half a second here
    assert len(w.paused) == 1 and w.paused[0] == pytest.approx(0.5, abs=0.05)
    w.paused.clear()
    path._hold(0)          # the warm-up itself has no previous call
    assert w.paused == []


def test_a_deadline_that_finds_a_peers_published_completion_completes_the_call_instead_of_claiming_it():
    w = FakeWatcher(beats={0: (7, 6, 1, 50), 1: (7, 7, 3, -1)})
    verdict = FakeVerdict(completed=None)
    path, transport = _path(w, verdict)
    call = types.SimpleNamespace(seq=7, started=time.monotonic())
    path.expire(call)
    assert ("claim", 7) not in verdict.calls and ("completed", 7) in verdict.calls
    assert transport.events == ["invalidate", "revalidate"] and w.settled == [7]
    assert path.latch.error is None


def test_a_peer_completion_that_lost_to_a_failure_in_the_store_raises_that_failure():
    w = FakeWatcher(beats={0: (7, 6, 1, 50), 1: (7, 7, 3, -1)})
    verdict = FakeVerdict(completed=GateError("rank 1 failed it first"))
    path, transport = _path(w, verdict)
    path.expire(types.SimpleNamespace(seq=7, started=time.monotonic()))
    assert "rank 1 failed it first" in str(path.latch.error)
    assert "revalidate" not in transport.events and w.settled == []


@pytest.mark.parametrize("beats", [{0: (7, 6, 1, 50), 1: (7, 6, 3, 900)}, {0: (7, 6, 1, 50), 1: None},
                                   RuntimeError("store gone")])
def test_without_a_published_completion_the_deadline_claims_the_call(beats):
    w = FakeWatcher(beats=beats)
    verdict = FakeVerdict(claim=("failing", None))
    path, _ = _path(w, verdict)
    path.expire(types.SimpleNamespace(seq=7, started=time.monotonic()))
    assert ("claim", 7) in verdict.calls and ("completed", 7) not in verdict.calls
    assert path.latch.error is not None


def test_this_ranks_own_heartbeat_is_not_a_peers_completion():
    w = FakeWatcher(beats={0: (7, 7, 1, -1), 1: (7, 6, 3, 900)})
    path, _ = _path(w, world=2)
    assert not path._completed_elsewhere(7)
    asked = []
    w.read_heartbeats = lambda world: asked.append(world) or {1: (7, 7)}
    assert path._completed_elsewhere(7) and asked == [2]   # two fields are enough
    w.read_heartbeats = lambda world: {1: (7,)}
    assert not path._completed_elsewhere(7)                # a beat too short to say
    path.fast_s = 0.0
    w.read_heartbeats = lambda world: asked.append(world) or {1: (7, 7)}
    assert not path._completed_elsewhere(7) and asked == [2]   # no fast path: nothing to look for
    path.fast_s = 1.0
    w.read_heartbeats = lambda world: {0: (7, 6, 1, -1), 1: (8, 8, 3, -1)}
    assert path._completed_elsewhere(7)  # a later call completed there: so did this one


def test_a_caller_whose_op_fails_finds_the_peers_completion_and_says_so():
    w = FakeWatcher(beats={0: (7, 6, 1, 50), 1: (7, 7, 3, -1)})
    w.forget = lambda seq: None
    verdict = FakeVerdict(completed=None)
    path, _ = _path(w, verdict)
    err = path.failed_in_call(types.SimpleNamespace(seq=7, started=time.monotonic()), RuntimeError("boom"))
    assert "completed on the other ranks" in str(err) and ("state", 7) not in verdict.calls


def test_a_late_publish_that_finds_the_call_failed_latches_the_disagreement(caplog):
    w = FakeWatcher()
    latch = FailureLatch()
    verdict = FakeVerdict(completed=GateError("rank 0 named rank 1"))
    path, _ = _path(w, verdict, latch=latch)
    with caplog.at_level("WARNING", logger="esper_gate"):
        path.late_publish(9, 4.2)
    assert verdict.calls == [("completed", 9)]
    err = latch.error
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [str(err)]
    assert err is not None and latch.failed_at(9)
    text = str(err)
    assert "call 9" in text and "4.2 s" in text and "rank 0 named rank 1" in text and "disagree" in text
    latch2 = FailureLatch()
    path2, _ = _path(FakeWatcher(), FakeVerdict(completed=None), latch=latch2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="esper_gate"):
        path2.late_publish(9, 4.2)
    assert latch2.error is None  # nobody failed it: the call stands everywhere
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned and warned[0].startswith("esper_gate: call 9's completion reached the store 4.2 s after rank 0")
    assert warned[0].endswith(f"(the gate assumes {PUBLISH_S:.1f} s); no rank had failed it")
    # a store that does not answer cannot say: warned as unknown, nothing latched
    latch3 = FailureLatch()
    path3, _ = _path(FakeWatcher(), FakeVerdict(completed=TimeoutError("has not answered for 2.0 s")), latch=latch3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="esper_gate"):
        path3.late_publish(9, 4.2)
    assert latch3.error is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "does not answer (TimeoutError: has not answered for 2.0 s)" in warned[0]
    assert warned[0].endswith("whether a peer failed the call cannot be read")


def test_confirm_on_the_fast_path_sends_nothing_to_the_store():
    def no_store(fn, bound_s=None):
        raise AssertionError("a store request on the fast path")
    v = Verdict(no_store, rank=0, fast=lambda seq: True)
    v.confirm(3, FailureLatch(), void=lambda: False)
    for void, fast, store_requests, asked in ((False, False, 1, 1), (True, True, 1, 0)):
        log = []

        def request(fn, bound_s=None):
            log.append("store")
            return "ok"
        Verdict(request, rank=0, fast=lambda seq, fast=fast: log.append("asked") or fast).confirm(
            3, FailureLatch(), void=lambda void=void: void)
        # refused, or a void call (which never asks): one compare-and-set
        assert log.count("store") == store_requests and log.count("asked") == asked, (void, log)


# ---- in-process: the watcher's side ------------------------------------------------------------

class SlowStore:
    def __init__(self, delay=0.0):
        self.delay, self.data = delay, {}

    def set(self, key, value):
        time.sleep(self.delay)
        self.data[key] = value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def _until(cond, limit=5.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_publishing_is_healthy_only_while_the_store_answers_quickly():
    store = SlowStore()
    w = Watcher(store, 0, lambda call: None)
    try:
        assert _until(lambda: w.publish_healthy(time.monotonic()))
        store.delay = HEALTHY_RTT_S + 0.3
        w._last_write = 0.0   # the next heartbeat now
        assert _until(lambda: not w.publish_healthy(time.monotonic()), 3.0)
    finally:
        w.close()


def test_a_fast_call_whose_heartbeat_lands_late_is_reported_and_one_on_time_is_not():
    store = SlowStore()
    w = Watcher(store, 0, lambda call: None)
    late = []
    w.on_late_publish = lambda seq, s: late.append((seq, s))
    try:
        w.begin(1, time.monotonic() + 60)
        w.end_host(1)
        w.applied_alone(1, time.monotonic())
        assert _until(lambda: w._fast is None, PUBLISH_S + 2)
        time.sleep(0.1)
        assert late == []
        store.delay = PUBLISH_S + 0.5   # the store (or this process) stalls right after the call
        time.sleep(1.2)                  # the beat in flight is slow too
        w.begin(2, time.monotonic() + 60)
        w.end_host(2)
        w.applied_alone(2, time.monotonic())
        assert _until(lambda: late, 2 * PUBLISH_S + 3)
        assert late[0][0] == 2 and late[0][1] > PUBLISH_S
    finally:
        w.close()


# ---- spawned: counted on real ranks --------------------------------------------------------------

class CountingStore:
    """Wraps the gate's store (every gate request goes through its StoreWorker): counts each
    request with its key; ``delay`` slows heartbeats (a store that answers slowly)."""

    def __init__(self, inner):
        self.inner, self.log, self.delay = inner, [], 0.0

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def counted(*a, **k):
            key = a[0] if a else None
            self.log.append((name, key))
            if self.delay and name == "set" and str(key).startswith("hb/"):
                time.sleep(self.delay)
            return fn(*a, **k)
        return counted


def _instrument(gs):
    """Count the gate's store requests, and those its caller's thread waited for."""
    worker = gs._watcher._worker
    worker.store = CountingStore(worker.store)
    waited = []
    request = worker.request

    def counted(fn, bound_s):
        waited.append(threading.current_thread().name)
        return request(fn, bound_s)
    worker.request = counted
    return worker.store, waited


def _gate(kind, timeout=5.0):
    import owned_double

    return esper_gate.GateSync(4, timeout=timeout, **({"_owned": owned_double} if kind == "owned" else {}))


def _loop_main(rank, world, kind, calls):
    gs = _gate(kind)
    out = {}
    for design in ("fast", "compare-and-set"):
        if design == "compare-and-set":
            gs._failure.fast_s = 0.0   # the design before: every call confirms through the store
        store, waited = _instrument(gs)
        t0 = time.monotonic()
        for _ in range(calls):
            assert gs([1] * 4, [3] * 4, [4] * 4).host_decisions() == [True] * 4
        out[design] = {"waited": len([t for t in waited if t == threading.current_thread().name]),
                       "verdict": sum(1 for _, k in store.log if str(k).startswith(("v/", "ack/"))),
                       "all": len(store.log), "seconds": time.monotonic() - t0}
    gs.close()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_a_call_that_succeeds_makes_no_store_request_on_the_callers_path(kind):
    calls = 200
    for r in values(spawn_ranks(_loop_main, 2, kind, calls, timeout=100)):
        fast, cas = r["fast"], r["compare-and-set"]
        print(f"\n[{kind}] {calls} calls: fast {fast}, compare-and-set {cas}")
        assert fast["waited"] == 0 and fast["verdict"] == 0, r
        # heartbeats only: one a second (and the one in flight)
        assert fast["all"] <= fast["seconds"] / 1.0 + 2, r
        assert cas["waited"] == calls and cas["verdict"] >= calls, r   # the design before: one per call


def _spaced_main(rank, world, kind, gap):
    gs = _gate(kind)
    gs._failure.fast_s = 0.3   # every rank alike (the rendezvous shares the smallest)
    store, waited = _instrument(gs)
    outs = []
    for _ in range(3):
        time.sleep(gap)
        outs.append(gs([1] * 4, [3] * 4, [4] * 4).host_decisions())
    near = gs([1] * 4, [3] * 4, [4] * 4).host_decisions()   # right after the last: within the window
    cas = [k for n, k in store.log if n == "compare_set"]
    return {"outs": outs + [near], "waited": len(waited), "cas": len(cas)}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_calls_further_apart_than_the_window_confirm_through_the_store(kind):
    for r in values(spawn_ranks(_spaced_main, 2, kind, 0.6, timeout=100)):
        assert r["outs"] == [[True] * 4] * 4
        assert r["waited"] == 3 and r["cas"] == 3, r   # one compare-and-set each; none for the near call


def _slow_store_main(rank, world):
    gs = _gate("gloo")
    store, waited = _instrument(gs)
    for _ in range(5):
        assert gs([1] * 4, [3] * 4, [4] * 4).host_decisions() == [True] * 4
    before = len(waited)
    store.delay = HEALTHY_RTT_S + 0.25   # heartbeats now answered slowly
    time.sleep(2.5)                       # one of them lands
    outs = [gs([1] * 4, [3] * 4, [4] * 4).host_decisions() for _ in range(5)]
    return {"before": before, "after": len(waited) - before, "outs": outs}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_store_that_answers_slowly_turns_the_fast_path_off_and_no_rank_splits():
    for r in values(spawn_ranks(_slow_store_main, 2, timeout=100)):
        assert r["before"] == 0, r        # the fast path while the store answered quickly
        assert r["after"] == 5, r         # then every call confirms through the store
        assert r["outs"] == [[True] * 4] * 5


def _early_failure_main(rank, world, kind):
    gs = _gate(kind)
    for _ in range(3):
        gs([1] * 4, [3] * 4, [4] * 4).host_decisions()
    if rank == 0:
        real = gs._transport.sync

        def fails_after_the_collective(*a, **k):
            real(*a, **k)   # the collective completed here and on the peer
            raise RuntimeError("injected: this rank's op failed after its collective")
        gs._transport.sync = fails_after_the_collective
    try:
        out = ("applied", gs([1] * 4, [3] * 4, [4] * 4).host_decisions())
    except esper_gate.GateError as e:
        out = ("raised", str(e))
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_a_rank_that_fails_early_finds_the_peer_that_applied_alone(kind):
    """Rank 1 applies the call on the fast path; rank 0's op raises after the same collective
    (early, inside the window). Rank 0 waits out the window, finds rank 1's published
    completion, and raises that the call completed on the others (one verdict: completed).
    Without the hold or the heartbeat check, rank 0 failed a call rank 1 had applied."""
    r0, r1 = values(spawn_ranks(_early_failure_main, 2, kind, timeout=100))
    assert r1[0] == "applied", (r0, r1)
    assert r0[0] == "raised" and "completed on the other ranks" in r0[1], (r0, r1)


# ---- the watcher's bookkeeping for the fast path, on a bare watcher (no thread) -----------------

def _bare_watcher(now):
    import concurrent.futures

    w = Watcher.__new__(Watcher)
    w._worker = types.SimpleNamespace(error=None)
    w._stop = threading.Event()
    w._last_loop = now
    w._pending_beat = None
    w._queued_at = now
    w._landed = (0, now - 0.1, now - 0.05)
    w._fast = None
    w.on_late_publish = None
    w.stalls = []
    w._future = concurrent.futures.Future
    return w


def test_publishing_is_healthy_only_when_every_sign_says_so():
    now = time.monotonic()
    w = _bare_watcher(now)
    assert w.publish_healthy(now)
    w._stop.set()
    assert not w.publish_healthy(now)                      # closed
    w = _bare_watcher(now)
    w._worker.error = ConnectionError("store gone")
    assert not w.publish_healthy(now)                      # a dead store
    w = _bare_watcher(now)
    w._last_loop = now - 2.0
    assert not w.publish_healthy(now)                      # the watcher has not run
    w = _bare_watcher(now)
    w._pending_beat = w._future()
    w._queued_at = now - (HEALTHY_RTT_S + 0.05)
    assert not w.publish_healthy(now)                      # a heartbeat stuck in flight
    w._queued_at = now - 0.01
    assert w.publish_healthy(now)                          # one in flight, not for long
    w._pending_beat.set_result(None)
    w._queued_at = now - 5
    assert w.publish_healthy(now)                          # answered
    w = _bare_watcher(now)
    w._landed = (0, now - 1.0, now - 1.0 + HEALTHY_RTT_S + 0.05)
    assert not w.publish_healthy(now)                      # the last round trip was slow
    w._landed = (0, now - 1.0, now - 1.0 + HEALTHY_RTT_S)
    assert w.publish_healthy(now)                          # at the bound
    w._landed = None
    assert not w.publish_healthy(now)                      # nothing has landed yet


def test_a_fast_call_is_on_time_only_once_a_heartbeat_carrying_it_landed_after_it():
    late = []
    w = _bare_watcher(100.0)
    w.on_late_publish = lambda seq, s: late.append((seq, s))
    w._fast = (5, 100.0)
    w._landed = (4, 99.0, 100.5)       # landed after, but carries call 4
    w._check_fast(100.2)
    assert w._fast == (5, 100.0) and late == []
    w._landed = (5, 99.5, 100.0)       # carries it, landed at the same instant: on time
    w._check_fast(100.2)
    assert w._fast is None and late == []
    w._fast = (6, 200.0)
    w._landed = (5, 199.0, 200.0)
    w._check_fast(200.0 + PUBLISH_S + 0.1)   # nothing carrying it within PUBLISH_S: late
    assert w._fast is None and _until(lambda: late) and late[0][0] == 6
    assert late[0][1] == pytest.approx(PUBLISH_S + 0.1)
    seen = []
    w.on_late_publish = lambda seq, s: seen.append((seq, s, threading.current_thread().name,
                                                    threading.current_thread().daemon))
    w._fast = (7, 300.0)
    w._landed = (7, 299.0, 302.0)              # carried it, but landed 2 s after: late by that
    w._check_fast(302.1)
    assert _until(lambda: seen) and seen[0] == (7, pytest.approx(2.0), "esper_gate-late-publish", True)


def test_whereabouts_are_one_per_parent_group_and_rank_and_start_nowhere():
    from esper_gate._watcher import Whereabouts

    a = Whereabouts.of("test-parent", 3)
    assert Whereabouts.of("test-parent", 3) is a and Whereabouts.of("test-parent", 4) is not a
    assert a.key == "where/3" and Whereabouts.of("test-parent", 4).key == "where/4"
    assert Whereabouts(0).state() == (-1, -1, True)


def test_the_watcher_remembers_the_last_few_entries_and_completions():
    w = Watcher(SlowStore(), 0, lambda call: None)
    try:
        calls = {}
        for seq in range(1, 6):
            calls[seq] = w.begin(seq, time.monotonic() + 60)
            before = time.monotonic()
            w.end_host(seq)
            assert before <= w.completed_at(seq) <= time.monotonic()
        assert w.entered_at(5) == calls[5].started and w.entered_at(3) == calls[3].started
        assert w.entered_at(2) is None and w.completed_at(2) is None   # only the last three kept
        assert w.completed_at(3) is not None
        first = w.completed_at(5)
        w._done(5)
        assert w.completed_at(5) == first                              # the first sighting counts
        assert w.has_completed(5) and not w.has_completed(6)
        w._progress = lambda: 7
        assert w.has_completed(7) and not w.has_completed(8)           # CUDA: the DONE word
    finally:
        w.close()


def test_stalls_count_from_when_they_ended():
    w = _bare_watcher(0.0)
    w.stalls = [(10.0, 3.0), (20.0, 1.0)]
    assert w.stalled_s(13.0) == 3.0      # ended at 13.0: counts
    assert w.stalled_s(13.5) == 1.0
    assert w.stalled_s(21.5) == 0.0      # none since
