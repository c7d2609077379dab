"""The failure path's caller side and the store host's wait, in-process.

``FailurePath.failed_in_call`` (the op raised in the caller's thread) and
``FailurePath._before_delivery`` (before the first raise: the abort's bound and
note, and on the store's host the wait for the present ranks and for a rank
named absent that enters after all) with fakes that record what they were
asked. The spawned worlds that exercise them end to end are in
test_control_plane.py, test_verdict.py and test_owned.py; these pin each
branch (each was broken on purpose once, see the closing note of the change).
"""
import datetime
import threading
import time
import types

import pytest

from test_gate_parts import DictStore

from esper_gate._failure import ACK_WAIT_S, LATE_ENTRY_S, BackgroundAbort, FailurePath
from esper_gate._latch import FailureLatch
from esper_gate._verdict import FAILING, OK
from esper_gate.errors import GateError, GateTimeoutError


class Watcher:
    def __init__(self, expired=False, beats=None):
        self.expired = expired
        self.completed = 4
        self.forgotten = []
        self.beats = beats or {}
        self.reads = 0

    def forget(self, seq):
        self.forgotten.append(seq)

    def completed_at(self, seq):
        return None

    def pause(self, s):
        pass

    def read_heartbeats(self, world):
        self.reads += 1
        self.world_read = world
        if isinstance(self.beats, Exception):
            raise self.beats
        return self.beats() if callable(self.beats) else self.beats


class Verdict:
    def __init__(self, state=(None, None), final=None, failed=None, acks=None):
        self._state, self._final, self._failed = state, final, failed
        self.asked = []
        self.acks = acks if acks is not None else {}

    def state(self, seq, bound_s=None):
        self.asked.append(("state", seq))
        self.bound = bound_s
        return self._state

    def wait_final(self, seq, bound_s=None):
        self.asked.append(("wait_final", seq))
        return self._final

    def failed(self, seq, err):
        self.asked.append(("failed", seq, str(err)))
        return err if self._failed is None else self._failed

    def completed(self, seq):
        self.asked.append(("completed", seq))
        return self.completed_gives

    completed_gives = None

    def claim(self, seq):
        self.asked.append(("claim", seq))
        return FAILING, None

    def wait_read(self, seq, ranks, bound_s):
        self.asked.append(("wait_read", seq, tuple(ranks)))
        assert bound_s == 0.0   # the host's loop polls; it never blocks in one read
        now = time.monotonic()
        return [r for r in ranks if self.acks.get(r, float("inf")) > now]


class Diagnosis:
    def __init__(self):
        self.asked = []
        self.raises = None

    def diagnose(self, seq, exc, completed, started):
        self.asked.append((seq, type(exc).__name__, completed))
        self.exc, self.started = exc, started
        if isinstance(self.raises, Exception):
            raise self.raises
        return GateTimeoutError(f"call {seq}: rank 2 did not arrive", [2], {2: completed}, call=seq)


def _path(watcher=None, verdict=None, rank=1, world=3, store_host=None, latch=None, transport=None):
    watcher = watcher or Watcher()
    verdict = verdict or Verdict()
    diagnosis = Diagnosis()
    latch = latch or FailureLatch()
    transport = transport or types.SimpleNamespace(self_timing=True, invalidate=lambda: None)
    path = FailurePath(lambda: transport, watcher, diagnosis, verdict, latch,
                       datetime.timedelta(seconds=3), rank, world, store_host)
    return path, watcher, verdict, diagnosis, latch


def _call(seq=5):
    return types.SimpleNamespace(seq=seq, started=time.monotonic())


# ---- failed_in_call ------------------------------------------------------------------------------

def test_an_op_failure_nobody_decided_is_diagnosed_shared_latched_and_delivered():
    path, watcher, verdict, diagnosis, latch = _path()
    call = _call(5)
    err = path.failed_in_call(call, RuntimeError("connection reset"))
    assert verdict.asked[0] == ("state", 5)
    assert diagnosis.asked == [(5, "RuntimeError", 4)] and diagnosis.started == call.started
    assert ("failed", 5, "call 5: rank 2 did not arrive") in verdict.asked
    assert err is latch.error and isinstance(err, GateTimeoutError) and latch.failed_at(5)
    assert watcher.forgotten == [5]


def test_an_op_failure_adopts_the_failure_a_peer_shared_first():
    peer = GateError("rank 0 named rank 2 first")
    path, _, verdict, diagnosis, latch = _path(verdict=Verdict(failed=peer))
    assert path.failed_in_call(_call(5), RuntimeError("x")) is peer
    assert diagnosis.asked  # it diagnosed, but the store kept the peer's


def test_an_op_failure_after_a_peers_claim_waits_for_that_diagnosis():
    final = GateError("the claimer's diagnosis")
    path, _, verdict, diagnosis, latch = _path(verdict=Verdict(state=(FAILING, None), final=final))
    assert path.failed_in_call(_call(6), RuntimeError("x")) is final
    assert ("wait_final", 6) in verdict.asked and diagnosis.asked == []


def test_an_op_failure_after_a_claim_whose_diagnosis_never_came_diagnoses_itself():
    path, _, verdict, diagnosis, latch = _path(verdict=Verdict(state=(FAILING, None), final=None))
    err = path.failed_in_call(_call(6), RuntimeError("x"))
    assert diagnosis.asked and ("failed", 6, "call 6: rank 2 did not arrive") in verdict.asked
    assert isinstance(err, GateTimeoutError)


def test_an_op_failure_on_a_call_the_peers_completed_says_this_rank_has_nothing_to_apply():
    path, _, verdict, diagnosis, latch = _path(verdict=Verdict(state=(OK, None)), rank=2)
    err = path.failed_in_call(_call(7), RuntimeError("socket closed"))
    assert diagnosis.asked == [] and not any(a[0] == "failed" for a in verdict.asked)
    text = str(err)
    assert "call 7 completed on the other ranks" in text and "failed on rank 2" in text
    assert "socket closed" in text and "this rank has none to apply" in text


def test_an_op_failure_already_decided_by_the_watcher_takes_its_verdict_without_asking_the_store():
    latch = FailureLatch()
    mine = GateError("the watcher's verdict")
    latch.record(8, mine)
    path, watcher, verdict, diagnosis, _ = _path(watcher=Watcher(expired=True), latch=latch)
    t0 = time.monotonic()
    assert path.failed_in_call(_call(8), RuntimeError("aborted")) is mine
    assert time.monotonic() - t0 < 1.0   # latched already: no wait
    assert verdict.asked == [] and diagnosis.asked == [] and watcher.forgotten == [8]


def test_an_expired_watcher_is_waited_for_before_the_caller_decides_anything():
    latch = FailureLatch()
    path, watcher, verdict, diagnosis, _ = _path(watcher=Watcher(expired=True), latch=latch)
    mine = GateError("decided on the watcher's thread meanwhile")
    threading.Timer(0.3, lambda: latch.record(9, mine)).start()
    assert path.failed_in_call(_call(9), RuntimeError("aborted")) is mine
    assert verdict.asked == [] and diagnosis.asked == []


def test_an_op_that_failed_before_its_collective_neither_waits_nor_reads_heartbeats():
    watcher = Watcher(beats={0: (5, 5, 1, -1)})   # a peer's heartbeat says it completed: cannot be
    path, _, verdict, diagnosis, latch = _path(watcher=watcher)
    path.fast_s = 1.0
    paused = []
    watcher.pause = paused.append
    path.failed_in_call(_call(5), ValueError("the gate's group is gone"))
    assert paused == [] and watcher.reads == 0 and diagnosis.asked
    path2, watcher2, _, _, _ = _path(watcher=Watcher(beats={0: (5, 5, 1, -1)}))
    path2.fast_s = 1.0
    watcher2.pause = paused.append
    err = path2.failed_in_call(_call(5), RuntimeError("after the collective"))
    assert paused and watcher2.reads == 1 and "completed on the other ranks" in str(err)


# ---- news ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,news", [(None, False), (OK, False), (FAILING, True), ("failed", True)])
def test_news_is_a_peers_claim_or_diagnosis_and_a_diagnosis_is_latched(kind, news):
    failure = GateError("diagnosed by a peer") if kind == "failed" else None
    path, _, verdict, _, latch = _path(verdict=Verdict(state=(kind, failure)))
    assert path.news(_call(3)) is news
    assert latch.error is failure


# ---- before the first raise --------------------------------------------------------------------

def test_a_stuck_abort_is_waited_for_its_bound_and_named_on_the_error():
    path, _, _, _, latch = _path(rank=1, store_host=0)
    release = threading.Event()
    path.abort = BackgroundAbort(lambda: release.wait(10), "NCCL abort").start()
    err = GateError("call 4 failed")
    t0 = time.monotonic()
    path._before_delivery(4, err)
    assert 0.9 < time.monotonic() - t0 < 3.0
    notes = getattr(err, "__notes__", [])
    assert len(notes) == 1 and "the gate's NCCL abort has not returned after" in notes[0]
    release.set()
    assert path.abort.wait(5)
    err2 = GateError("call 4 failed")
    path._before_delivery(4, err2)
    assert getattr(err2, "__notes__", []) == []   # returned: no note, no wait


def test_only_the_store_host_waits_and_not_for_a_construction_failure():
    for rank, host, seq in ((1, 0, 4), (0, None, 4), (0, 0, None)):
        path, _, verdict, _, _ = _path(rank=rank, store_host=host)
        path._before_delivery(seq, GateError("x"))
        assert verdict.asked == [], (rank, host, seq)


def test_the_store_host_waits_for_the_present_ranks_to_read_the_verdict_then_goes():
    acks = {1: time.monotonic() + 0.3, 3: time.monotonic() + 0.5}
    path, _, verdict, _, _ = _path(rank=0, world=4, store_host=0, verdict=Verdict(acks=acks))
    err = GateTimeoutError("rank 2 did not arrive", [2], {2: 3}, call=4)
    t0 = time.monotonic()
    path._before_delivery(4, err)
    took = time.monotonic() - t0
    assert 0.45 < took < ACK_WAIT_S
    waited_for = {r for a in verdict.asked if a[0] == "wait_read" for r in a[2]}
    assert waited_for == {1, 3}   # not itself, not the rank named absent (it did not enter)


def test_the_store_host_stops_waiting_at_its_bound():
    path, _, verdict, _, _ = _path(rank=0, world=3, store_host=0, verdict=Verdict(acks={}))
    t0 = time.monotonic()
    path._before_delivery(4, GateError("no rank reads it"))
    assert ACK_WAIT_S - 0.1 < time.monotonic() - t0 < ACK_WAIT_S + 1.0


def test_a_rank_named_late_is_in_the_call_and_is_waited_for():
    acks = {1: time.monotonic() + 0.1, 2: time.monotonic() + 0.4}
    path, _, verdict, _, _ = _path(rank=0, world=3, store_host=0, verdict=Verdict(acks=acks))
    err = GateTimeoutError("rank 2 arrived too late", [2], {2: 3}, call=4)
    err.late_ranks = [2]
    t0 = time.monotonic()
    path._before_delivery(4, err)
    assert 0.35 < time.monotonic() - t0 < ACK_WAIT_S
    assert any(2 in a[2] for a in verdict.asked if a[0] == "wait_read")


def test_a_rank_named_absent_that_enters_after_all_is_waited_for_and_one_that_does_not_is_not_for_long():
    now = time.monotonic()
    entered_at = now + 0.2

    def beats():   # rank 2's heartbeat shows call 4 from 0.2 s on
        return {2: (4, 3, 7, 10)} if time.monotonic() >= entered_at else {2: (3, 3, 6, -1)}
    acks = {1: now, 2: now + 0.5}
    path, watcher, verdict, _, _ = _path(watcher=Watcher(beats=beats), rank=0, world=3, store_host=0,
                                         verdict=Verdict(acks=acks))
    err = GateTimeoutError("rank 2 did not arrive", [2], {2: 3}, call=4)
    t0 = time.monotonic()
    path._before_delivery(4, err)
    took = time.monotonic() - t0
    assert 0.45 < took < ACK_WAIT_S, took       # it came, and was waited for until it read
    assert any(2 in a[2] for a in verdict.asked if a[0] == "wait_read")
    # a rank that never enters costs LATE_ENTRY_S, not the whole ACK_WAIT_S
    path, watcher, verdict, _, _ = _path(watcher=Watcher(beats={2: (3, 3, 6, -1)}), rank=0, world=3,
                                         store_host=0, verdict=Verdict(acks={1: now}))
    t0 = time.monotonic()
    path._before_delivery(4, GateTimeoutError("rank 2 did not arrive", [2], {2: 3}, call=4))
    took = time.monotonic() - t0
    assert LATE_ENTRY_S - 0.05 < took < LATE_ENTRY_S + 0.5, took
    assert not any(2 in a[2] for a in verdict.asked if a[0] == "wait_read")
    # and a heartbeat read that fails is no reason to wait longer
    path, watcher, verdict, _, _ = _path(watcher=Watcher(beats=RuntimeError("store gone")), rank=0, world=3,
                                         store_host=0, verdict=Verdict(acks={1: now}))
    t0 = time.monotonic()
    path._before_delivery(4, GateTimeoutError("rank 2 did not arrive", [2], {2: 3}, call=4))
    assert time.monotonic() - t0 < LATE_ENTRY_S + 0.5


# ---- BackgroundAbort -----------------------------------------------------------------------------

def test_a_background_abort_reports_how_long_it_took_and_survives_its_own_error(caplog):
    import re

    def boom():
        time.sleep(0.3)
        raise RuntimeError("abort failed")
    a = BackgroundAbort(boom, "NCCL abort")
    assert a.stuck_note() is None and not a.returned and a.started is None and a.seconds is None
    with caplog.at_level("ERROR", logger="esper_gate"):
        a.start()
        assert a.thread.name == "esper_gate-abort" and a.thread.daemon
        note = a.stuck_note()
        assert note is not None and "NCCL abort" in note
        assert 0.0 <= float(re.search(r"after ([0-9.]+) s", note).group(1)) < 1.0
        assert a.wait(5) and a.returned and 0.25 <= a.seconds < 5.0
    assert a.stuck_note() is None
    assert [r.getMessage() for r in caplog.records] == ["esper_gate: NCCL abort failed"]


def test_an_op_failure_on_a_call_a_peer_already_diagnosed_takes_that_diagnosis():
    theirs = GateError("rank 0's diagnosis")
    path, _, verdict, diagnosis, latch = _path(verdict=Verdict(state=("failed", theirs)))
    assert path.failed_in_call(_call(6), RuntimeError("x")) is theirs
    assert diagnosis.asked == [] and not any(a[0] == "failed" for a in verdict.asked)


def test_an_op_failure_whose_peer_completion_lost_to_a_failure_takes_that_failure():
    theirs = GateError("decided before the completion")
    verdict = Verdict()
    verdict.completed_gives = theirs
    path, watcher, _, diagnosis, latch = _path(watcher=Watcher(beats={0: (5, 5, 1, -1)}), verdict=verdict)
    path.fast_s = 1.0
    assert path.failed_in_call(_call(5), RuntimeError("after the collective")) is theirs
    assert ("completed", 5) in verdict.asked and diagnosis.asked == []


class RecordingLatch(FailureLatch):
    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout):
        self.waits.append(timeout)
        return False


def test_an_expired_watcher_is_given_the_whole_diagnosis_bound_before_and_after_the_hold():
    from esper_gate._diagnosis import BOUND_S

    latch = RecordingLatch()
    path, _, _, _, _ = _path(watcher=Watcher(expired=True), latch=latch)
    path.fast_s = 1.0
    path.failed_in_call(_call(5), RuntimeError("x"))
    assert latch.waits == [BOUND_S + 1.0, BOUND_S + 1.0]


# ---- the deadline's steps (expire) ---------------------------------------------------------------

class Transport:
    def __init__(self):
        self.events = []

    def invalidate(self):
        self.events.append("invalidate")

    def revalidate(self):
        self.events.append("revalidate")

    def abort(self):
        self.events.append("abort")


def test_the_deadline_diagnoses_with_what_it_knows_and_logs_the_verdict(caplog):
    path, watcher, verdict, diagnosis, latch = _path(transport=Transport())
    call = _call(5)
    with caplog.at_level("ERROR", logger="esper_gate"):
        path.expire(call)
    assert isinstance(diagnosis.exc, TimeoutError)
    assert str(diagnosis.exc) == "call 5 did not complete within 3 s of being made"
    assert diagnosis.asked == [(5, "TimeoutError", 4)] and diagnosis.started == call.started
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [str(latch.error)]
    # a transport that does not time itself gets an abort, named by its default
    assert path.wait_abort(5) and path.abort.what == "abort"


def test_a_diagnosis_that_raises_still_gives_a_verdict():
    path, _, verdict, diagnosis, latch = _path()
    diagnosis.raises = RuntimeError("heartbeats unreadable")
    path.expire(_call(5))
    text = str(latch.error)
    assert text.startswith("esper_gate call 5 did not complete within 3 s (")
    assert "heartbeats unreadable" in text


def test_a_failure_the_store_did_not_keep_is_still_this_ranks_verdict():
    class NoKeep(Verdict):
        def failed(self, seq, err):
            return None
    path, _, _, diagnosis, latch = _path(verdict=NoKeep())
    path.expire(_call(5))
    assert latch.error is not None and "rank 2 did not arrive" in str(latch.error)


def test_only_a_transport_that_times_itself_goes_without_an_abort():
    path, _, _, _, _ = _path(transport=types.SimpleNamespace(self_timing=True, invalidate=lambda: None))
    path.expire(_call(5))
    assert path.abort is None


def test_news_asks_the_store_briefly_and_latches_under_the_calls_number():
    from esper_gate._failure import NEWS_BOUND_S

    theirs = GateError("diagnosed by a peer")
    path, _, verdict, _, latch = _path(verdict=Verdict(state=("failed", theirs)))
    assert path.news(_call(3))
    assert verdict.bound == NEWS_BOUND_S and latch.seq == 3


def test_the_store_host_reads_no_heartbeat_and_no_ack_when_nobody_is_left_to_wait_for():
    path, watcher, verdict, _, _ = _path(rank=0, world=2, store_host=0)
    t0 = time.monotonic()
    path._before_delivery(4, GateError("rank 1 (the only peer) is gone"))   # names nobody: rank 1 present
    assert [a[0] for a in verdict.asked] == ["wait_read"] * len(verdict.asked)
    assert watcher.reads == 0   # nobody named absent: no heartbeat read
    path, watcher, verdict, _, _ = _path(rank=0, world=2, store_host=0, watcher=Watcher(beats={1: (3, 3, 1, -1)}))
    path._before_delivery(4, GateTimeoutError("rank 1 did not arrive", [1], {1: 3}, call=4))
    assert verdict.asked == []   # its only peer is named absent and never came: no ack to wait for
    assert watcher.reads >= 1 and watcher.world_read == 2
    assert time.monotonic() - t0 < ACK_WAIT_S + LATE_ENTRY_S + 1.0


# ---- the verdict's store side, in-process -------------------------------------------------------

def test_a_failure_crosses_the_store_with_its_late_ranks_and_a_plain_error_as_a_gate_error():
    from esper_gate import _verdict

    err = GateTimeoutError("rank 2 arrived too late", [2], {2: 6}, call=7)
    err.late_ranks = [2]
    back = _verdict._decode(_verdict._encode(err))
    assert isinstance(back, GateTimeoutError) and back.late_ranks == [2] and back.missing_ranks == [2]
    assert back.last_completed == {2: 6} and back.call == 7 and str(back) == str(err)
    plain = _verdict._decode(_verdict._encode(GateError("the op failed")))
    assert type(plain) is GateError and str(plain) == "the op failed"
    # a diagnosis written without late ranks (an earlier writer) reads as none
    old = '{"kind": "timeout", "text": "t", "missing": [1], "last": {"1": 3}, "call": 4}'
    assert _verdict._decode(old).late_ranks == []


def test_a_confirm_the_store_does_not_answer_raises_the_store_hosts_error_or_says_why():
    from esper_gate._store import StoreUnresponsive
    from esper_gate._verdict import Verdict as RealVerdict

    def stuck(fn, bound_s=None):
        raise StoreUnresponsive("the job's store has not answered for 2.0 s", 2.0)
    named = GateTimeoutError("rank 0, which hosts the job's store, has not answered", [0], {0: 4}, call=5)
    asked = []
    latch = FailureLatch()
    v = RealVerdict(stuck, rank=1, unresponsive=lambda seq, e: asked.append((seq, str(e))) or named)
    with pytest.raises(GateTimeoutError) as info:
        v.confirm(5, latch)
    assert info.value is named and latch.seq == 5
    assert asked == [(5, "the job's store has not answered for 2.0 s")]
    latch = FailureLatch()
    with pytest.raises(GateError) as info:
        RealVerdict(stuck, rank=1).confirm(6, latch)
    assert str(info.value) == ("esper_gate call 6: the job's store has not answered for 2.0 s; this rank applies "
                               "no transition for it") and latch.seq == 6


def test_the_fast_path_is_asked_about_this_call():
    from esper_gate._verdict import Verdict as RealVerdict

    asked = []
    RealVerdict(lambda fn, bound_s=None: None, rank=0, fast=lambda seq: asked.append(seq) or True).confirm(
        11, FailureLatch())
    assert asked == [11]


def test_a_state_read_passes_its_bound_only_when_given():
    from esper_gate._verdict import Verdict as RealVerdict

    store, calls = DictStore(), []

    def request(fn, *bound):
        calls.append(bound)
        return fn(store)
    v = RealVerdict(request, rank=0)
    assert v.state(3) == (None, None) and v.state(3, 0.2) == (None, None)
    assert calls == [(), (0.2,)]


def test_wait_read_waits_its_bound_for_acks_and_returns_as_soon_as_all_came():
    from esper_gate._verdict import RING, Verdict as RealVerdict

    store = DictStore()
    v = RealVerdict(lambda fn, *bound: fn(store), rank=0)
    t0 = time.monotonic()
    assert v.wait_read(4, [1, 2], 0.3) == [1, 2]
    assert 0.28 < time.monotonic() - t0 < 2.0
    threading.Timer(0.1, lambda: [store.set(f"ack/{4 % RING}/{r}", "4") for r in (1, 2)]).start()
    t0 = time.monotonic()
    assert v.wait_read(4, [1, 2], 5.0) == []
    assert time.monotonic() - t0 < 2.0


def test_a_void_call_whose_store_is_gone_raises_naming_why():
    from esper_gate._verdict import Verdict as RealVerdict

    def gone(fn, bound_s=None):
        raise ConnectionResetError("Connection reset by peer")
    latch = RecordingLatch()
    with pytest.raises(GateError) as info:
        RealVerdict(gone, rank=1).confirm(5, latch, void=lambda: True)
    assert "stopped answering (ConnectionResetError); this rank applies no transition" in str(info.value)
    assert latch.waits and latch.seq == 5


def test_a_completion_that_finds_the_call_claimed_waits_for_that_calls_diagnosis():
    from esper_gate._verdict import RING, Verdict as RealVerdict, _encode

    store = DictStore()
    store.set(f"v/{5 % RING}", "5:failing")
    theirs = GateTimeoutError("call 5: rank 2 did not arrive", [2], {2: 4}, call=5)
    threading.Timer(0.1, lambda: store.set(f"v/{5 % RING}", "5:" + _encode(theirs))).start()
    latch = FailureLatch()
    with pytest.raises(GateTimeoutError) as info:
        RealVerdict(lambda fn, *bound: fn(store), rank=1).confirm(5, latch)
    assert str(info.value) == str(theirs) and info.value.missing_ranks == [2]
