"""The gate's own NCCL communicator on its CPU double (tests/owned_double.py).

In-process: the failure path's order (invalidate, publish, abort, diagnose)
with recording fakes; a watcher that never calls CUDA; a construction that
names the rank that never initialized.

Spawned (the double's all_reduce goes through the job's store and, like
NCCL, never times out by itself): a rank that skips a call, one frozen with
SIGSTOP then resumed, one SIGKILLed; every rank names the same missing rank
within timeout + 5 s, nothing else dies, and a new gate works afterwards.
And the store's host exiting right after its raise, on gloo and on the double.
"""
import datetime
import json
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

import owned_double
import esper_gate
from esper_gate._failure import ABORT_WAIT_S, FailurePath
from esper_gate._latch import FailureLatch
from esper_gate._spawn import spawn_ranks, values
from esper_gate._transport import OwnedTransport
from esper_gate._verdict import FAILING, Verdict
from esper_gate._watcher import WATCH_POLL_S, Call, Watcher

T = 2.0
BOUND_S = T + 5


# ---- in-process: the order of the failure path ------------------------------------

class _Recorder:
    def __init__(self):
        self.steps = []


class _FakeTransport:
    self_timing = False
    abort_what = "NCCL abort"

    def __init__(self, rec, latch=None, abort=None):
        self.rec, self.latch, self._abort = rec, latch, abort

    def invalidate(self):
        self.rec.steps.append("invalidate")

    def revalidate(self):
        self.rec.steps.append("revalidate")

    def abort(self):
        # what the rank had decided when its abort started
        self.rec.steps.append("abort" if self.latch is None or self.latch.error is None else "abort (latched)")
        if self._abort is not None:
            self._abort()


class _RecordingVerdict(Verdict):
    def __init__(self, rec, store, rank):
        super().__init__(lambda request, *bound: request(store), rank=rank)
        self.rec = rec

    def claim(self, seq):
        self.rec.steps.append("publish")
        return super().claim(seq)


class _FakeDiagnosis:
    def __init__(self, rec, missing):
        self.rec, self.missing = rec, missing

    def diagnose(self, seq, exc, completed, started=None):
        self.rec.steps.append("diagnose")
        return esper_gate.GateTimeoutError(f"call {seq}: rank {self.missing} did not arrive", [self.missing],
                                           {self.missing: seq - 1}, call=seq)


class _FakeWatcher:
    completed = 4
    expired = True

    def __init__(self, rec):
        self.rec = rec

    def settle(self, call, extend_s):
        self.rec.steps.append("settle")

    def forget(self, seq):
        pass


def _path(store, rank=0, missing=2, world=3, store_host=None, abort=None):
    rec = _Recorder()
    latch = FailureLatch()
    verdict = _RecordingVerdict(rec, store, rank)
    transport = _FakeTransport(rec, latch, abort)
    path = FailurePath(lambda: transport, _FakeWatcher(rec), _FakeDiagnosis(rec, missing), verdict, latch,
                       datetime.timedelta(seconds=T), rank, world, store_host)
    return path, rec, latch, verdict


def test_a_deadline_invalidates_publishes_diagnoses_and_latches_before_it_aborts():
    # The abort can block for as long as this rank's stream is stuck (ncclCommAbort waits on
    # NCCL's device stream): the verdict must be decided, published and latched first.
    store = dist.HashStore()
    path, rec, latch, _ = _path(store)
    path.expire(Call(5, time.monotonic()))
    assert path.wait_abort(5.0)
    assert rec.steps == ["invalidate", "publish", "diagnose", "abort (latched)"]
    assert isinstance(latch.error, esper_gate.GateTimeoutError) and latch.error.missing_ranks == [2]
    # every peer's watcher reads the published call, and then its diagnosis
    peer, peer_rec, peer_latch, peer_verdict = _path(store, rank=1, missing=0)
    assert peer.news(Call(5, 0.0)) and peer_latch.error.missing_ranks == [2]
    peer.expire(Call(5, 0.0))   # the peer aborts too, and adopts the first diagnosis instead of diagnosing
    assert peer.wait_abort(5.0)
    assert peer_rec.steps == ["invalidate", "publish", "abort (latched)"]
    assert str(peer_latch.error) == str(latch.error)


def test_an_abort_that_blocks_neither_holds_the_verdict_nor_the_host_read_and_is_named():
    store = dist.HashStore()
    release = threading.Event()
    path, rec, latch, _ = _path(store, abort=lambda: release.wait(30))
    t0 = time.monotonic()
    path.expire(Call(6, time.monotonic()))   # returns: the abort runs on a thread of its own
    assert time.monotonic() - t0 < 5.0 and latch.error is not None
    with pytest.raises(esper_gate.GateTimeoutError) as info:
        latch.check_usable()                 # a host read: waits ABORT_WAIT_S for the abort, then raises
    waited = time.monotonic() - t0
    assert waited < ABORT_WAIT_S + 4.0
    notes = getattr(info.value, "__notes__", [])
    assert any("the gate's NCCL abort has not returned after" in n and "stream is blocked behind other work" in n
               for n in notes), notes
    assert not path.wait_abort(0.1)          # close() waits at most the bound, then goes on
    release.set()
    assert path.wait_abort(5.0) and path.abort.seconds is not None


def test_once_published_no_rank_can_complete_the_call_and_a_peer_that_completed_first_wins():
    store = dist.HashStore()
    mine = Verdict(lambda request, *bound: request(store), rank=0)
    assert mine.claim(7) == (FAILING, None)
    # a peer whose collective completes now must not apply it: it waits for the diagnosis
    peer = Verdict(lambda request, *bound: request(store), rank=1, sleep=lambda s: None)
    threading.Timer(0.05, lambda: mine.failed(7, esper_gate.GateError("rank 2 did not arrive"))).start()
    assert str(peer.completed(7)) == "rank 2 did not arrive"
    # the other way round: a completed call is not failed, and the flag is restored
    path, rec, latch, verdict = _path(store)
    verdict.completed(8)
    path.expire(Call(8, time.monotonic()))
    assert rec.steps == ["invalidate", "publish", "revalidate", "settle"] and latch.error is None
    assert path.abort is None


def test_the_store_host_raises_after_the_present_ranks_read_the_verdict_or_two_seconds():
    store = dist.HashStore()
    host, _, latch, _ = _path(store, rank=0, missing=2, store_host=0)
    host.expire(Call(3, time.monotonic()))
    host.wait_abort(5.0)
    peer = Verdict(lambda request, *bound: request(store), rank=1)
    threading.Timer(0.3, lambda: peer.peek(3)).start()   # rank 1 reads it 0.3 s later
    t0 = time.monotonic()
    with pytest.raises(esper_gate.GateTimeoutError):
        latch.check_usable()
    # after the read, well before the 2 s it waits when nobody reads (bounds loose: a loaded machine)
    assert 0.25 < time.monotonic() - t0 < 1.8
    # nobody reads it: two seconds at most
    host, _, latch, _ = _path(store, rank=0, missing=2, store_host=0)
    host.expire(Call(4, time.monotonic()))
    host.wait_abort(5.0)
    t0 = time.monotonic()
    with pytest.raises(esper_gate.GateTimeoutError):
        latch.check_usable()
    assert 1.9 < time.monotonic() - t0 < 5.0


def test_a_peers_failing_claim_is_news_before_its_diagnosis_and_the_watcher_expires_the_call_on_it():
    """A peer past its deadline publishes FAILING before it aborts, and diagnoses afterwards
    (seconds later). NCCL needs every rank to abort: the claim alone must make a waiting
    rank's watcher expire the call, long before this rank's own deadline."""
    from esper_gate._watcher import LONG_CALL_S

    store = dist.HashStore()
    path, _rec, latch, _ = _path(store, rank=0)
    peer = Verdict(lambda request: request(store), rank=1)
    assert not path.news(Call(6, 0.0)), "nothing claimed yet"
    assert peer.claim(6) == (FAILING, None)
    assert path.news(Call(6, 0.0)) and latch.error is None, "claimed: news, though no verdict to latch yet"
    expired = []
    watcher = Watcher(_DictStore(), 0, expired.append, news=path.news)
    try:
        t0 = time.monotonic()
        watcher.begin(6, t0 + 60)
        while not expired and time.monotonic() - t0 < 10:
            time.sleep(WATCH_POLL_S)
        assert [c.seq for c in expired] == [6]
        assert LONG_CALL_S <= time.monotonic() - t0 < 10, "news is read only for a call that waited long"
    finally:
        watcher.close()


def test_the_communicators_error_state_reads_as_broken():
    """ncclCommGetAsyncError's "error: <NCCL's text>": construction stops at once naming it,
    and a ready communicator that reports it has failed (the watcher expires the call)."""
    from esper_gate._transport import _broken

    text = "error: unhandled system error (run with NCCL_DEBUG=INFO for details)"
    assert _broken(text) and _broken("aborted") and _broken("destroyed")
    assert not _broken("ready") and not _broken("pending")

    class Comm:
        states = [text]

        def __init__(self, uid, rank, world, device):
            self.calls = []

        def state(self):
            return Comm.states[0]

        def abort(self):
            self.calls.append("abort")

    class Double:
        unique_id = staticmethod(owned_double.unique_id)
        MappedWords = owned_double.MappedWords
        NcclComm = Comm

    t0 = time.monotonic()
    with pytest.raises(esper_gate.GateError, match=r"failed to initialize on rank 0 \(error: unhandled system"):
        OwnedTransport(dist.HashStore(), 0, 1, torch.device("cpu"), t0 + 30, "g", nccl=Double)
    assert time.monotonic() - t0 < 10, "an error state is final: no wait for the deadline"
    Comm.states = ["ready"]
    transport = OwnedTransport(dist.HashStore(), 0, 1, torch.device("cpu"), time.monotonic() + 30, "g", nccl=Double)
    assert not transport.failed()
    Comm.states = [text]
    assert transport.failed()


from test_gate_parts import DictStore as _DictStore  # noqa: E402 - the watcher's dict store, shared


class _NoCuda:
    """An event whose query fails the test: the watcher must read the mapped word instead."""

    def query(self):
        raise AssertionError("the watcher thread called CUDA (event.query)")


def test_the_watcher_reads_completion_from_the_mapped_word_and_never_queries_an_event():
    words = owned_double.MappedWords(2, "cpu")
    expired = []
    watcher = Watcher(_DictStore(), 0, expired.append, progress=lambda: int(words.host[1]))
    try:
        call = watcher.begin(1, time.monotonic() + 60)
        call.event = _NoCuda()
        time.sleep(3 * WATCH_POLL_S)
        assert watcher.completed == -1 and watcher.inflight   # nothing completed yet
        words.device[1].fill_(1)  # what the transport's last kernel does after decode
        deadline = time.monotonic() + 2
        while watcher.inflight and time.monotonic() < deadline:
            time.sleep(WATCH_POLL_S)
        assert watcher.completed == 1 and not watcher.inflight and not expired
    finally:
        watcher.close()


def test_the_warm_up_call_0_is_watched_until_its_deadline_on_the_mapped_word():
    # The words as a CUDA gate's transport makes them: before any decode, no call has
    # completed, not even construction's warm-up (call 0). Before, DONE started at 0, so
    # the watcher took the warm-up as done at once and a warm-up stuck on the GPU (a
    # peer frozen between its init and its warm-up) was never aborted: construction hung.
    from esper_gate._transport import DONE, mapped_words

    words = mapped_words("cpu", owned_double)
    expired = []
    watcher = Watcher(_DictStore(), 0, expired.append, progress=lambda: int(words.host[DONE]))
    try:
        call = watcher.begin(0, time.monotonic() + 0.3)
        call.event = _NoCuda()
        deadline = time.monotonic() + 5
        while not expired and time.monotonic() < deadline:
            time.sleep(WATCH_POLL_S)
        assert [c.seq for c in expired] == [0] and watcher.completed < 0
    finally:
        watcher.close()


def test_a_rank_that_never_initializes_the_communicator_is_named_and_the_init_aborted():
    base = dist.HashStore()

    class Double:  # the double's module, over this test's store
        unique_id = staticmethod(owned_double.unique_id)
        MappedWords = owned_double.MappedWords

        @staticmethod
        def NcclComm(uid, rank, world, device):
            return owned_double.NcclComm(uid, rank, world, device, store=base)

    store = dist.PrefixStore("gate/", base)
    t0 = time.monotonic()
    with pytest.raises(esper_gate.GateTimeoutError, match="rank 1 did not initialize") as info:
        OwnedTransport(store, 0, 2, torch.device("cpu"), time.monotonic() + 0.5, "g", nccl=Double,
                       timeout=datetime.timedelta(seconds=0.5))
    assert info.value.missing_ranks == [1] and 0.5 <= time.monotonic() - t0 < 5.0
    assert owned_double.made[-1].calls == ["abort"] and owned_double.made[-1].state() == "aborted"
    # both present: ready, and a sum across the two ranks
    out = {}

    def rank_main(rank):
        t = OwnedTransport(dist.PrefixStore("gate2/", base), rank, 2, torch.device("cpu"), time.monotonic() + 5, "g",
                           nccl=Double)
        buf = torch.tensor([rank + 1, 10], dtype=torch.int64)
        t.comm.all_reduce_(buf)
        out[rank] = buf.tolist()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert out == {0: [3, 20], 1: [3, 20]}


# ---- the double behaves like NCCL (tests/owned_double.py says from which source) -----

def _pair(store=None, world=2):
    """Communicators of ranks 0..world-1 of one unique id, in this process."""
    store = store if store is not None else dist.HashStore()
    uid = owned_double.unique_id()
    comms = [owned_double.NcclComm(uid, r, world, "cpu", store=store) for r in range(world)]
    assert all(c.state() == "ready" for c in comms)
    return comms


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_the_double_returns_in_progress_at_a_world_of_two_and_only_there_enqueues_at_once():
    a, b = _pair()
    x, y = torch.tensor([1, 2], dtype=torch.int64), torch.tensor([10, 20], dtype=torch.int64)
    assert a._start(x) == 1 and a.state() == "pending"   # ncclInProgress; NCCL's launch thread runs
    t, out = _in_thread(lambda: b.all_reduce_(y))
    while a._poll():
        pass                                          # enqueued: the device work runs on
    t.join(10)
    assert a._idle.wait(10)
    assert x.tolist() == y.tolist() == [11, 22] and "error" not in out
    (solo,) = _pair(world=1)
    z = torch.tensor([5], dtype=torch.int64)
    assert solo._start(z) == 0   # ncclLaunchOneRank: nothing launched, ncclSuccess


def test_a_call_on_the_double_waits_for_its_launch_without_a_sleep():
    a, b = _pair()
    x, y = torch.ones(64, dtype=torch.int64), torch.ones(64, dtype=torch.int64) * 2
    t, out = _in_thread(lambda: b.all_reduce_(y))
    a.all_reduce_(x)
    t.join(10)
    assert x.tolist() == y.tolist() == [3] * 64
    # the launch (LAUNCH_S) ends within the wait's spin: no sleep, on either rank
    assert a.enqueue_sleeps == 0 and b.enqueue_sleeps == 0


def test_wait_enqueued_spins_through_a_short_launch_and_backs_off_on_a_long_one():
    from esper_gate import _nccl

    clock = [0.0]

    def poll_until(t_ready):
        def poll():
            clock[0] += 2e-6   # one look at ncclCommGetAsyncError
            return 1 if clock[0] < t_ready else 0
        return poll

    def sleep(s):
        clock[0] += s
    assert _nccl.wait_enqueued(poll_until(50e-6), clock=lambda: clock[0], sleep=sleep) == 0
    clock[0] = 0.0
    naps = _nccl.wait_enqueued(poll_until(0.05), clock=lambda: clock[0], sleep=sleep)
    assert 40 <= naps <= 60   # doubling from 20 us to 1 ms: about 50 looks for 50 ms
    clock[0] = 0.0
    with pytest.raises(esper_gate.GateError, match="still being enqueued after"):
        _nccl.wait_enqueued(poll_until(1.0), timeout_s=0.01, clock=lambda: clock[0], sleep=sleep)


def test_an_aborted_kernel_exits_and_the_stream_runs_on():
    a, b = _pair()   # rank 1 made its communicator and never calls
    x = torch.tensor([7, 8], dtype=torch.int64)
    threading.Timer(0.3, a.abort).start()
    t0 = time.monotonic()
    assert a.all_reduce_(x) is x            # no raise: the kernel exited, the stream ran on
    assert 0.25 < time.monotonic() - t0 < 5.0
    assert x.tolist() == [7, 8]             # this rank's contribution, not a sum
    assert a.state() == "aborted"
    with pytest.raises(owned_double.AbortedError, match="was aborted"):
        a.all_reduce_(x)                    # a call after the abort is refused, as the wrapper does


def test_the_abort_waits_behind_a_stuck_caller_stream():
    a, b = _pair()
    owned_double.caller_stream.sleep(1.5)   # e.g. DDP's all_reduce stuck on a dead peer
    x = torch.zeros(2, dtype=torch.int64)
    t, out = _in_thread(lambda: a.all_reduce_(x))
    time.sleep(0.2)
    t0 = time.monotonic()
    a.abort()                               # ncclCommAbort syncs NCCL's device stream
    took = time.monotonic() - t0
    t.join(5)
    assert not t.is_alive() and "error" not in out   # the host was released by the abort flag
    assert took > 0.9, took
    owned_double.caller_stream.wait_idle()


def test_a_unique_id_whose_peer_never_joins_leaves_its_bootstrap_thread():
    before = owned_double.live_roots()
    store = dist.HashStore()
    uid = owned_double.unique_id()
    owned_double.NcclComm(uid, 0, 2, "cpu", store=store)   # rank 1 never comes
    time.sleep(0.1)
    assert owned_double.live_roots() == before + 1
    owned_double.NcclComm(uid, 1, 2, "cpu", store=store)   # it came after all: the root is done
    deadline = time.monotonic() + 5
    while owned_double.live_roots() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert owned_double.live_roots() == before


def test_nccl_comm_blocking_makes_the_double_blocking_and_its_abort_waits(monkeypatch):
    monkeypatch.setenv("NCCL_COMM_BLOCKING", "1")
    store = dist.HashStore()
    uid = owned_double.unique_id()
    t, out = _in_thread(lambda: owned_double.NcclComm(uid, 0, 2, "cpu", store=store))
    t.join(0.5)
    assert t.is_alive()                     # a blocking init waits for the peer, with no deadline
    b = owned_double.NcclComm(uid, 1, 2, "cpu", store=store)
    t.join(5)
    a = out["value"]
    caller, _ = _in_thread(lambda: a.all_reduce_(torch.zeros(1, dtype=torch.int64)))   # b never calls
    time.sleep(0.2)
    aborter, _ = _in_thread(a.abort)
    aborter.join(0.5)
    assert aborter.is_alive()               # the abort waits for the collective's lock
    b.all_reduce_(torch.zeros(1, dtype=torch.int64))   # release them both
    aborter.join(5)
    caller.join(5)


# ---- the owned transport's defects, each on the double ------------------------------

class _Double:
    """The double's module over one store (OwnedTransport's ``nccl``)."""

    def __init__(self, store):
        self.store = store
        self.unique_id = owned_double.unique_id
        self.MappedWords = owned_double.MappedWords

    def NcclComm(self, uid, rank, world, device):
        return owned_double.NcclComm(uid, rank, world, device, store=self.store)


def _transports(world=2):
    base = dist.HashStore()
    double = _Double(base)
    store = dist.PrefixStore(f"t{time.monotonic_ns()}/", base)
    built = {}
    threads = [threading.Thread(target=lambda r=r: built.__setitem__(r, OwnedTransport(
        store, r, world, torch.device("cpu"), time.monotonic() + 10, "g", nccl=double))) for r in range(world)]
    [t.start() for t in threads]
    [t.join(15) for t in threads]
    return [built[r] for r in range(world)]


def _prepared(n=4):
    from esper_gate._inputs import prepare

    ones = torch.ones(n, dtype=torch.int64)
    return prepare(ones.bool(), ones * 3, ones * 4, None, num_slots=n, device=torch.device("cpu"), default_site=1,
                   call="test")


def test_after_an_abort_the_failed_call_does_not_read_as_completed():
    from esper_gate._transport import DONE

    t0, t1 = _transports()   # rank 1 never makes call 1
    th, out = _in_thread(lambda: t0.sync(_prepared(), 1, "unanimous"))
    time.sleep(0.3)
    t0.invalidate()          # the deadline: VALID cleared, then the abort
    t0.abort()
    th.join(5)
    assert "error" not in out, out            # the stream ran on: decode and the DONE write ran too
    decision = out["value"][0]
    assert decision.tolist() == [False] * 4   # VALID and-ed in
    assert t0.completed_seq() == -1 and int(t0._words.host[DONE]) == -1   # before: 1, "completed"
    # a call that completes writes its number
    t2, t3 = _transports()
    both = [_in_thread(lambda t=t: t.sync(_prepared(), 1, "unanimous")) for t in (t2, t3)]
    [th.join(10) for th, _ in both]
    assert t2.completed_seq() == t3.completed_seq() == 1


def test_nccl_comm_blocking_is_refused_before_any_init(monkeypatch):
    monkeypatch.setenv("NCCL_COMM_BLOCKING", "1")
    before = len(owned_double.made)
    t, out = _in_thread(lambda: OwnedTransport(dist.HashStore(), 0, 2, torch.device("cpu"), time.monotonic() + 1,
                                               "g", nccl=_Double(dist.HashStore())))
    t.join(3)
    assert not t.is_alive(), "construction hangs in a blocking init (the peer never comes)"
    assert isinstance(out.get("error"), esper_gate.GateConfigError), out
    assert "NCCL_COMM_BLOCKING=1" in str(out["error"]) and len(owned_double.made) == before


class _DeadStoreVerdict(Verdict):
    def __init__(self):
        def request(fn):
            raise RuntimeError("Connection reset by peer")
        super().__init__(request, rank=0)


class _Fired:
    def query(self):
        return True


def test_a_void_call_raises_on_the_host_when_the_store_cannot_confirm_it():
    from esper_gate.consensus import GateConsensus, GateView

    decoded = torch.tensor([True, True])   # an aborted collective's buffer, decoded
    view = GateView(0, "unanimous", ["a", "b"])
    void = GateConsensus(3, decoded & False, torch.zeros(8, dtype=torch.int64), gate=view, latch=FailureLatch(),
                         ready=_Fired(), verdict=_DeadStoreVerdict(), decoded=decoded, void=lambda: True)
    t0 = time.monotonic()
    with pytest.raises(esper_gate.GateError, match="invalidated on this rank"):
        void.host_decisions()
    assert time.monotonic() - t0 < 10
    # the same read where nothing voided the call: the collective completed, and it stands
    fine = GateConsensus(3, decoded, torch.zeros(8, dtype=torch.int64), gate=view, latch=FailureLatch(),
                         ready=_Fired(), verdict=_DeadStoreVerdict(), decoded=decoded, void=lambda: False)
    assert fine.host_decisions() == [True, True]


# ---- spawned: a rank skipped, frozen, killed ---------------------------------------

pytestmark_mp = [pytest.mark.multiprocess]


def _barrier(store, tag, ranks):
    store.set(f"{tag}/{dist.get_rank()}", "1")
    store.wait([f"{tag}/{r}" for r in ranks], datetime.timedelta(seconds=60))


def _one_call(gs):
    t0 = time.monotonic()
    try:
        out = ("applied", gs([1, 1, 1, 1], [3] * 4, [4] * 4).host_decisions())
    except esper_gate.GateError as e:
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
    return out, time.monotonic() - t0


def _faults_main(rank, world, scenarios):
    import owned_double
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore("test_owned/", _get_default_store())
    store.set(f"pid/{rank}", str(os.getpid()))
    present = list(range(world))
    out = {}
    for name in scenarios:
        gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double, group=None if len(present) == world else
                                 dist.new_group(present, use_local_synchronization=True))
        first = _one_call(gs)[0]   # a new gate works (after the previous scenario's failure)
        res = {"first": first}
        fault = {"skip": world - 1, "sigstop": 1, "sigkill": world - 1}[name]
        if rank == fault and name == "skip":
            res["outcome"] = "skipped"   # never makes call 2 (it waits for the others at the barrier)
        elif rank == fault and name == "sigkill":
            store.set(f"results/{rank}", json.dumps(out))   # what it saw before, for rank 0 to return
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            if rank == fault and name == "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)   # rank 0 resumes it, after its own error
            res["outcome"], res["elapsed"] = _one_call(gs)
            res["then"] = _one_call(gs)[0]   # the communicator was aborted: the gate says it is unusable
            if rank == 0 and name == "sigstop":
                time.sleep(0.5)
                os.kill(int(store.get(f"pid/{fault}")), signal.SIGCONT)
        res["failure"] = None if gs.failure is None else type(gs.failure).__name__
        gs.close()
        out[name] = res
        if name == "sigkill":
            present = [r for r in present if r != fault]
            sub = dist.new_group(present, use_local_synchronization=True)
            if len(present) > 1:   # where ranks remain, a new gate works
                gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double, group=sub)
                out["after_sigkill"] = _one_call(gs)[0]
                gs.close()
        _barrier(store, f"done/{name}", present)
    if rank == 0 and "sigkill" in scenarios:
        out["killed_rank_saw"] = json.loads(store.get(f"results/{world - 1}"))
    return out


def _check_faults(results, world, scenarios):
    ok = ("applied", [True] * 4)
    for name in scenarios:
        fault = {"skip": world - 1, "sigstop": 1, "sigkill": world - 1}[name]
        outs = {r: res[name] for r, res in enumerate(results) if res is not None and name in res}
        named = [tuple(o["outcome"]) for r, o in outs.items() if o["outcome"] != "skipped"]
        assert len(outs) == world - (name == "sigkill"), (name, sorted(outs))
        for r, o in outs.items():
            assert tuple(o["first"]) == ok, (name, r, o)
        assert named and all(x[:3] == ("raised", "GateTimeoutError", [fault]) for x in named), (name, named)
        assert all(f"rank {fault} did not arrive" in x[3] for x in named), (name, named)
        for r, o in outs.items():
            if o["outcome"] != "skipped":
                assert o["elapsed"] < BOUND_S, (name, r, o["elapsed"])
                assert o["then"][0] == "raised" and "unusable" in o["then"][3], (name, r, o["then"])
        if name == "sigstop":
            # the frozen rank, resumed, raises the very same verdict (naming itself)
            assert tuple(outs[1]["outcome"]) == tuple(outs[0]["outcome"])
        print(f"\n[W={world} {name}] seconds to the error: "
              + ", ".join(f"rank {r}: {o['elapsed']:.2f}" for r, o in outs.items() if "elapsed" in o))
    if "sigkill" in scenarios and world > 2:
        assert all(res["after_sigkill"] == ok for r, res in enumerate(results) if r != world - 1)


SCENARIOS = ["skip", "sigstop", "sigkill"]


def _run_faults(world):
    dead = (world - 1,)
    results = spawn_ranks(_faults_main, world, SCENARIOS, timeout=150, expect_dead=dead)
    alive = [r for r in results if r.rank not in dead]
    vals = values(alive)   # every other rank reported: none was killed
    by_rank = [None] * world
    for r, v in zip(alive, vals):
        by_rank[r.rank] = v
    by_rank[world - 1] = by_rank[0].pop("killed_rank_saw")
    _check_faults(by_rank, world, SCENARIOS)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_skipped_frozen_and_killed_ranks_are_named_by_every_rank_and_a_new_gate_works():
    _run_faults(3)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_skipped_frozen_and_killed_ranks_at_other_world_sizes(world):
    _run_faults(world)


# ---- spawned: a silent peer while this rank's stream is stuck -----------------------

STUCK_S = 8.0


def _stuck_stream_main(rank, world):
    import owned_double
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore("test_stuck/", _get_default_store())
    gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double)
    out = {"first": _one_call(gs)[0]}
    if rank == 0:
        # 8 s of other work on the caller's stream (torch.cuda._sleep, or DDP's all_reduce
        # stuck on a dead peer): the gate's abort cannot return before it ends.
        owned_double.caller_stream.sleep(STUCK_S)
        t0 = time.monotonic()
        try:
            gs([1, 1, 1, 1], [3] * 4, [4] * 4).host_decisions()
            out["outcome"] = ("applied",)
        except esper_gate.GateError as e:
            out["outcome"] = (type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
            out["notes"] = list(getattr(e, "__notes__", []))
        out["elapsed"] = time.monotonic() - t0
        t0 = time.monotonic()
        gs.close()
        out["close_s"] = time.monotonic() - t0
        out["abort_running_after_close"] = not gs._failure.abort.returned
        gs._failure.wait_abort(30)
        out["abort_s"] = gs._failure.abort.seconds
    else:
        gs.close()   # silent in call 2: alive, never calls it
    _barrier(store, "stuck/done", range(world))
    gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double)   # a new gate works afterwards
    out["after"] = _one_call(gs)[0]
    gs.close()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_silent_peer_is_named_within_the_bound_while_the_abort_waits_behind_a_stuck_stream():
    r0, r1 = values(spawn_ranks(_stuck_stream_main, 2, timeout=90))
    ok = ("applied", [True] * 4)
    assert tuple(r0["first"]) == tuple(r1["first"]) == ok
    assert r0["outcome"][:2] == ("GateTimeoutError", [1]), r0
    assert r0["elapsed"] < BOUND_S, r0          # before: no named error at all (an unnamed one after ~T+6 s)
    assert any("NCCL abort has not returned after" in n for n in r0["notes"]), r0
    assert r0["close_s"] < 3.0 and r0["abort_running_after_close"], r0
    assert r0["abort_s"] > STUCK_S - T - 5, r0  # it waited for the stream
    assert tuple(r0["after"]) == tuple(r1["after"]) == ok
    print(f"\n[stuck stream] rank 1 named after {r0['elapsed']:.2f} s; the abort took {r0['abort_s']:.2f} s; "
          f"close returned after {r0['close_s']:.2f} s")


# ---- spawned: no unique id before every rank met ------------------------------------

def _bootstrap_main(rank, world):
    import owned_double
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore("test_bootstrap/", _get_default_store())
    out = {}
    # 1. rank 1 never arrives at the rendezvous: rank 0 makes no unique id at all
    if rank == 0:
        before = owned_double.live_roots()
        try:
            esper_gate.GateSync(4, timeout=1.5, _owned=owned_double)
        except esper_gate.GateTimeoutError as e:
            out["absent"] = (e.missing_ranks, owned_double.live_roots() - before)
    _barrier(store, "absent/done", range(world))
    # 2. rank 1 met, then died before its init: NCCL's root thread for that id stays (documented)
    if rank == 1:
        owned_double.NcclComm = lambda *a, **k: os._exit(0)
    before = owned_double.live_roots()
    try:
        esper_gate.GateSync(4, timeout=1.5, _owned=owned_double)
    except esper_gate.GateError as e:
        out["died"] = (getattr(e, "missing_ranks", None), owned_double.live_roots() - before)
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_the_unique_id_is_made_only_after_every_rank_met():
    results = spawn_ranks(_bootstrap_main, 2, timeout=60, expect_dead=(1,))
    r0 = values([results[0]])[0]
    assert tuple(r0["absent"]) == ([1], 0), r0   # named, and no bootstrap thread left behind
    assert tuple(r0["died"]) == ([1], 1), r0     # the case that remains: one thread until the process ends


# ---- spawned: a deadline that passes as the collective completes --------------------

def _late_deadline_main(rank, world):
    import owned_double

    gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double)
    votes, out = [1, 0, 1, 1], {}
    if rank == 1:
        calls, begin = [], gs._watcher.begin
        gs._watcher.begin = lambda seq, deadline: calls.append(begin(seq, deadline)) or calls[-1]
        reduce = gs._transport.comm.all_reduce_

        def reduce_then_deadline(buf):
            reduce(buf)
            # Rank 0's collective completed and it applied the call (alone, with no store
            # request: its heartbeat publishes it); this rank's deadline passes now, before
            # its decode: the watcher's first step clears VALID.
            while (gs._watcher.read_heartbeats(2)[0] or (0, -1))[1] < 1:
                time.sleep(0.005)
            gs._transport.invalidate()

        gs._transport.comm.all_reduce_ = reduce_then_deadline
    res = gs(votes, [3] * 4, [4] * 4)
    if rank == 1:
        gs._transport.comm.all_reduce_ = reduce
        out["device"] = res.decisions.tolist()   # decode ran while invalid
        gs._failure.expire(calls[0])             # its claim finds the call completed: revalidate
    out["host"] = res.host_decisions()
    out["passed"] = [s.decided for s in res.report().slots]
    out["failure"] = None if gs.failure is None else str(gs.failure)
    out["next"] = gs(votes, [3] * 4, [4] * 4).host_decisions()
    gs.close()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_rank_whose_deadline_passes_as_its_call_completes_reads_the_call_like_its_peers():
    r0, r1 = values(spawn_ranks(_late_deadline_main, 2, timeout=90))
    agreed = [True, False, True, True]
    assert r1["device"] == [False] * 4   # the device-side decisions are conservative
    for r in (r0, r1):
        assert r["host"] == agreed and r["passed"] == agreed and r["failure"] is None, (r0, r1)
        assert r["next"] == agreed


# ---- spawned: construction is bounded as a whole -------------------------------------

T_BUILD = 4.0
LATE = 2


def _late_builder_main(rank, world, kind, fate):
    import owned_double
    from esper_gate import _build

    if rank == LATE:
        # Within the timeout at every step, and the steps add up: late to the
        # rendezvous, slow to set up its communicator, then gone (or stuck) before
        # the warm-up.
        time.sleep(0.9 * T_BUILD)
        slow = (0.9 if fate == "gone" else 0.5) * T_BUILD   # stuck: the others reach their warm-up
        if kind == "owned":
            comm = owned_double.NcclComm
            owned_double.NcclComm = lambda *a, **k: time.sleep(slow) or comm(*a, **k)
        else:
            new_group = _build.new_gate_group
            _build.new_gate_group = lambda *a, **k: time.sleep(slow) or new_group(*a, **k)
        _build.warm_up = (lambda *a, **k: os._exit(0)) if fate == "gone" else (lambda *a, **k: time.sleep(120))
    t0 = time.monotonic()
    try:
        esper_gate.GateSync(4, timeout=T_BUILD, **({"_owned": owned_double} if kind == "owned" else {}))
        out = ("built",)
    except Exception as e:  # noqa: BLE001 - the test reports what it was
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
    return {"outcome": out, "elapsed": time.monotonic() - t0}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
@pytest.mark.parametrize("fate", ["gone", pytest.param("stuck", marks=pytest.mark.slow)])
def test_construction_raises_within_the_timeout_and_five_seconds_when_its_steps_add_up(kind, fate):
    from esper_gate._group import supports_set_timeout

    if kind == "gloo" and not supports_set_timeout():
        pytest.skip(f"torch {torch.__version__} has no ProcessGroup.set_timeout: gloo's connect and warm-up keep "
                    f"the group's timeout each")
    results = spawn_ranks(_late_builder_main, 3, kind, fate, timeout=90, expect_dead=(LATE,))
    for rank, r in enumerate(values([x for x in results if x.rank != LATE])):
        print(f"\n[{kind}, {fate}] rank {rank}: {r['outcome'][:3]} after {r['elapsed']:.2f} s")
        assert r["outcome"][0] == "raised", r
        assert r["elapsed"] < T_BUILD + 5, r   # before: the rendezvous, the communicator and the warm-up each had it
        assert r["outcome"][1] == "GateTimeoutError", r   # named, not c10d's raw store or connect error
        if kind == "owned":
            assert r["outcome"][2] == [LATE], r


# ---- spawned: the store's host exits right after its raise -------------------------

SKIPPER = 2


def _host_exits_main(rank, world, kind):
    import owned_double

    gs = esper_gate.GateSync(4, timeout=T, _owned=owned_double) if kind == "owned" else esper_gate.GateSync(4, timeout=T)
    _one_call(gs)
    if rank == SKIPPER:
        return {"outcome": "skipped"}   # never makes call 2; the process lives on (spawn_ranks holds it)
    if rank == 1:
        # a little late, so that its diagnosis reads the store after the host's is done
        time.sleep(0.3)
    outcome, elapsed = _one_call(gs)
    if rank == 0:
        os._exit(0)   # the usual reaction: the job ends on its first error, and takes the store with it
    return {"outcome": outcome, "elapsed": elapsed}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_every_present_rank_names_the_skipped_rank_when_the_store_host_exits_after_its_raise(kind):
    results = spawn_ranks(_host_exits_main, 3, kind, timeout=90, expect_dead=(0,))
    r1 = values([results[1]])[0]
    assert r1["outcome"][:3] == ("raised", "GateTimeoutError", [SKIPPER]), r1
    assert "hosts the job's store" not in r1["outcome"][3]
    assert r1["elapsed"] < BOUND_S
    print(f"\n[{kind}] rank 1 named rank {SKIPPER} after {r1['elapsed']:.2f} s")


# ---- in-process: construction settings ----------------------------------------------

def test_two_local_ranks_on_one_gpu_are_named_with_the_host_and_the_device():
    from esper_gate._group import config_error, shared_devices

    mine = {"num_slots": 4, "policy": "unanimous", "site": 1, "world": 3}
    configs = {0: {**mine, "host": "n1", "device": "cuda:0 (GPU a)"},
               1: {**mine, "host": "n1", "device": "cuda:1 (GPU b)"},
               2: {**mine, "host": "n1", "device": "cuda:0 (GPU a)"}}
    # where ranks run is not a setting they must share
    assert config_error(configs, mine, 0) is None
    err = shared_devices(configs)
    assert isinstance(err, esper_gate.GateConfigError)
    assert "ranks 0 and 2 are both on cuda:0 (GPU a) of host n1" in str(err)
    configs[2]["host"] = "n2"   # the same index on another host is another GPU
    assert shared_devices(configs) is None
    assert shared_devices({0: {"host": "n1"}, 1: {"host": "n1"}}) is None   # CPU gates


def test_an_unknown_transport_is_refused_naming_it():
    with pytest.raises(esper_gate.GateInputError, match="transport must be None, 'owned' or 'c10d', got 'nccl2'"):
        esper_gate.GateSync(4, transport="nccl2")
