"""The control plane: every store request bounded, a frozen or exiting store host named
alike on every rank, and a heartbeat load with a budget.

In-process: the store worker's bounds; the watcher's store load counted with a
counting store. Spawned (one world per failure class): the store's host frozen
(SIGSTOP) around a call; a rank late past the host's deadline while the host
exits on its error; a rank killed during construction while the host exits.
"""
import datetime
import os
import signal
import threading
import time

import pytest
import torch.distributed as dist

import esper_gate
from esper_gate._spawn import spawn_ranks, values
from esper_gate._store import StoreUnresponsive, StoreWorker
from esper_gate._watcher import HEARTBEAT_INTERVAL_S, LONG_CALL_POLL_S, LONG_CALL_S, Watcher

T = 3.0
BOUND_S = T + 5


# ---- in-process: the store worker -----------------------------------------------------

class CountingStore:
    """A dict store that counts requests and can be frozen (a stopped host)."""

    def __init__(self):
        self.data, self.count = {}, 0
        self.open = threading.Event()
        self.open.set()

    def _req(self):
        self.open.wait()
        self.count += 1

    def set(self, key, value):
        self._req()
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        self._req()
        return self.data[key]

    def check(self, keys):
        self._req()
        return all(k in self.data for k in keys)


def test_a_request_the_store_does_not_answer_is_bounded_and_names_how_long():
    store = CountingStore()
    worker = StoreWorker(store)
    try:
        store.open.clear()   # the host stops
        t0 = time.monotonic()
        with pytest.raises(StoreUnresponsive) as info:
            worker.request(lambda s: s.set("a", "1"), 0.3)
        assert 0.25 < time.monotonic() - t0 < 2.0 and info.value.seconds >= 0.3
        # the next request does not wait again: the store has not answered for longer than its bound
        t0 = time.monotonic()
        with pytest.raises(StoreUnresponsive, match="has not answered for"):
            worker.request(lambda s: s.check(["a"]), 0.2)
        assert time.monotonic() - t0 < 0.1
        queued = worker.submit(lambda s: s.set("b", "1"))
        with pytest.raises(StoreUnresponsive):
            worker.request(lambda s: s.set("c", "1"), 0.1)
        store.open.set()     # it resumes: the request in progress lands, the abandoned one is not sent
        queued.result(5)
        time.sleep(0.1)
        assert "a" in store.data and "b" in store.data and "c" not in store.data
    finally:
        worker.close()


def test_a_dead_store_costs_one_failed_request():
    class Dead:
        calls = 0

        def set(self, key, value):
            Dead.calls += 1
            raise RuntimeError("Connection reset by peer")
    worker = StoreWorker(Dead())
    for _ in range(3):
        with pytest.raises(RuntimeError, match="Connection reset"):
            worker.request(lambda s: s.set("a", "1"), 1.0)
    assert Dead.calls == 1
    worker.close()


def test_a_frozen_store_never_stops_the_watcher_from_firing_deadlines():
    store, expired = CountingStore(), []
    watcher = Watcher(store, 0, expired.append)
    try:
        store.open.clear()
        watcher.begin(1, time.monotonic() + 0.5)
        deadline = time.monotonic() + 5
        while not expired and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [c.seq for c in expired] == [1]   # before: the watcher's heartbeat write blocked it
    finally:
        store.open.set()
        watcher.close()


# ---- in-process: the heartbeat budget ----------------------------------------------------

def _rate(store, seconds, during=None):
    start = store.count
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if during is not None:
            during()
        time.sleep(0.002)
    return (store.count - start) / seconds


def test_heartbeats_stay_within_one_a_second_idle_and_two_busy_and_speed_up_only_for_a_stuck_call():
    from esper_gate._watcher import Whereabouts

    store = CountingStore()
    watcher = Watcher(store, 0, lambda call: None, whereabouts=(store, 0, Whereabouts(0)))
    try:
        time.sleep(0.2)
        idle = _rate(store, 3.0)
        seq = [0]

        def call():  # calls completing as fast as a training loop makes them
            seq[0] += 1
            watcher.begin(seq[0], time.monotonic() + 60)
            watcher.end_host(seq[0])
        busy = _rate(store, 3.0, call)
        assert seq[0] > 100
        watcher.begin(seq[0] + 1, time.monotonic() + 60)   # a call that waits (a peer is missing)
        time.sleep(LONG_CALL_S + 0.2)
        stuck = _rate(store, 1.0)
        print(f"\n[store requests per second] idle {idle:.2f}, busy {busy:.2f}, stuck {stuck:.1f}")
        assert idle <= 1.0 / HEARTBEAT_INTERVAL_S + 0.34      # one a second (+ the one in flight)
        assert busy <= 2.0                                    # before: up to 20 heartbeats and 20 whereabouts
        assert stuck >= 0.5 / LONG_CALL_POLL_S                # the rare case pays for the diagnosis
    finally:
        watcher.close()


# ---- spawned: the store's host frozen around a call ----------------------------------------

STOP_S = 12.0


def _frozen_host_main(rank, world, kind):
    import owned_double
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore("test_frozen/", _get_default_store())
    kw = {"_owned": owned_double} if kind == "owned" else {}
    gs = esper_gate.GateSync(4, timeout=T, **kw)
    gs([1] * 4, [3] * 4, [4] * 4).host_decisions()
    store.set(f"pid/{rank}", str(os.getpid()))
    store.set(f"ready/{rank}", "1")
    store.wait([f"ready/{r}" for r in range(world)], datetime.timedelta(seconds=30))
    pid0 = int(store.get("pid/0"))
    time.sleep(0.5)   # the store's answers to rank 1 are out before its host stops
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)   # the store's host stops just before its call
    stopped_at = time.monotonic()
    t0 = time.monotonic()
    try:
        out = ("applied", gs([1] * 4, [3] * 4, [4] * 4).host_decisions())
    except esper_gate.GateError as e:
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
    elapsed = time.monotonic() - t0
    if rank == 1:
        time.sleep(max(STOP_S - (time.monotonic() - stopped_at), 0.0))
        os.kill(pid0, signal.SIGCONT)
    return {"outcome": out, "elapsed": elapsed}


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_a_frozen_store_host_is_named_within_the_bound_on_every_rank(kind):
    r0, r1 = values(spawn_ranks(_frozen_host_main, 2, kind, timeout=120))
    for r in (r0, r1):
        print(f"\n[{kind}] {r['outcome'][:3]} after {r['elapsed']:.2f} s")
        assert r["outcome"][0] == "raised", (r0, r1)           # before: decisions after 20 s (owned)
        assert r["outcome"][1] == "GateTimeoutError" and r["outcome"][2] == [0], (r0, r1)
        assert r["elapsed"] < BOUND_S, (r0, r1)                # before: 20.1-20.7 s, or never
    assert "has not answered for" in r1["outcome"][3] or "stopped or starved" in r1["outcome"][3], r1


# ---- spawned: a late rank while the host exits on its error ----------------------------------

def _late_rank_main(rank, world, kind):
    import owned_double

    kw = {"_owned": owned_double} if kind == "owned" else {}
    gs = esper_gate.GateSync(4, timeout=T, **kw)
    gs([1] * 4, [3] * 4, [4] * 4).host_decisions()
    if rank == 1:
        time.sleep(T + 0.3)   # enters 0.3 s after rank 0's deadline
    t0 = time.monotonic()
    try:
        out = ("applied", gs([1] * 4, [3] * 4, [4] * 4).host_decisions())
    except esper_gate.GateError as e:
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
    if rank == 0:
        os._exit(0)   # a training script ends on its error, and takes the store with it
    return {"outcome": out, "elapsed": time.monotonic() - t0}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_a_late_rank_learns_the_hosts_verdict_before_the_host_exits(kind):
    results = spawn_ranks(_late_rank_main, 2, kind, timeout=90, expect_dead=(0,))
    r1 = values([results[1]])[0]
    print(f"\n[{kind}] rank 1: {r1['outcome'][:3]} after {r1['elapsed']:.2f} s")
    assert r1["outcome"][:3] == ("raised", "GateTimeoutError", [1]), r1   # before: it named rank 0
    assert r1["elapsed"] < BOUND_S


# ---- spawned: a rank killed during construction while the host exits ---------------------------

def _killed_builder_main(rank, world, kind):
    import owned_double

    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # never reaches the rendezvous
    t0 = time.monotonic()
    try:
        esper_gate.GateSync(4, timeout=T, **({"_owned": owned_double} if kind == "owned" else {}))
        out = ("built",)
    except esper_gate.GateError as e:
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e)[:300])
    if rank == 0:
        os._exit(0)
    return {"outcome": out, "elapsed": time.monotonic() - t0}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["gloo", "owned"])
def test_a_rank_killed_during_construction_is_named_on_every_rank_when_the_host_exits(kind):
    results = spawn_ranks(_killed_builder_main, 3, kind, timeout=90, expect_dead=(0, 2))
    r1 = values([results[1]])[0]
    assert r1["outcome"][:3] == ("raised", "GateTimeoutError", [2]), r1   # before: "store stopped answering", rank 0
    assert r1["elapsed"] < BOUND_S
