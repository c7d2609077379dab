"""One verdict per call: every rank of a call ends with the same outcome, all
applying its decisions or all raising the same error, whenever a late rank
arrives around the deadline, when a caller is interrupted after its
collective returned, and when a rank's op fails before its collective.

Scenarios run one after another in one spawned world per backend (gloo, and
the NCCL-like double of tests/nccl_like.py, whose collectives stay pending
until aborted); the outcome of each is compared across ranks. The logic of
the verdict itself is tested in-process in test_gate_parts.py.
"""
import datetime
import os
import signal
import threading
import time

import pytest

import nccl_like
from esper_gate._spawn import spawn_ranks, values

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

T = 2.0
MARGIN_S = 2.0  # the double's watchdog fires this long past the gate's deadline

# scenario -> how late each rank calls (rank: seconds), as a fraction or past T
LATE = {
    # the split outcome once seen on the double: rank 0 failed the call while
    # ranks 1 and 2 got decisions and would have transitioned
    "split": {1: 1.0, 2: T + 1.5},
    "well_before": {2: 0.4 * T},
    "just_before": {2: T - 0.5},
    "just_after": {2: T + 0.2},
    "well_after": {2: T + 1.5},
}
FAST = ["split", "interrupt", "local_failure"]
SLOW = ["well_before", "just_before", "just_after", "well_after"]


def _gate(backend):
    import esper_gate
    from esper_gate import _group

    if backend == "gloo":
        return esper_gate.GateSync(4, timeout=T)
    nccl_like.register()
    _group._GROUP_TIMEOUT_MARGIN = datetime.timedelta(seconds=MARGIN_S)
    return esper_gate.GateSync(4, timeout=T, backend=nccl_like.BACKEND)


def _outcome(call):
    t0 = time.monotonic()
    try:
        out = ("applied", call().host_decisions())
    except KeyboardInterrupt:
        out = ("interrupted",)
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        out = ("raised", type(e).__name__, getattr(e, "missing_ranks", None), str(e))
    return out, time.monotonic() - t0


def _scenario(rank, world, backend, name):
    from esper_gate._group import free_gate_group

    gs = _gate(backend)
    args = ([1, 1, 0, 1], [3] * 4, [4] * 4)
    gs(*args)  # call 1: everyone, on time
    if name == "interrupt":
        if rank == 1:
            # Ctrl-C while the op waits for rank 2: Python raises it once the op returns.
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        if rank == 2:
            time.sleep(0.8)
    elif name == "local_failure" and rank == 1:
        free_gate_group(gs.group)  # the op raises before its collective (it cannot find the group)
    else:
        time.sleep(LATE.get(name, {}).get(rank, 0.0))
    outcome, elapsed = _outcome(lambda: gs(*args))
    after = None
    if outcome[0] != "raised":
        # Past every deadline a watcher could still act on: nothing may change.
        time.sleep(T + 1)
        after = _outcome(lambda: gs(*args))[0]
    return {"outcome": outcome, "elapsed": elapsed, "after": after,
            "failure": None if gs.failure is None else str(gs.failure)}


def _scenarios_main(rank, world, backend, names):
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    out = {}
    for name in names:
        out[name] = _scenario(rank, world, backend, name)
        # every rank starts the next scenario together, however long this one took
        store.set(f"test/{backend}/{name}/{rank}", "1")
        store.wait([f"test/{backend}/{name}/{r}" for r in range(world)], datetime.timedelta(seconds=60))
    return out


def _check(results, name, backend="abortable"):
    outs = [r[name] for r in results]
    if name == "interrupt":
        assert outs[1]["outcome"] == ("interrupted",), outs
        for r in (0, 2):
            assert outs[r]["outcome"] == ("applied", [True, True, False, True]), outs
        for o in outs:
            assert o["after"] == ("applied", [True, True, False, True]) and o["failure"] is None, outs
        return
    first = outs[0]["outcome"]
    for o in outs:
        # one verdict: the same outcome, the same ranks named, the same words, on every rank
        assert o["outcome"] == first, (name, [x["outcome"] for x in outs])
        if first[0] == "applied":
            assert o["after"] == ("applied", [True, True, False, True]) and o["failure"] is None, outs
    if name in ("well_before", "just_before"):
        assert first == ("applied", [True, True, False, True])
    if name in ("split", "well_after") or (name == "just_after" and backend == "gloo"):
        # (on the double a rank just past the deadline completes the pending collective instead)
        assert first[:3] == ("raised", "GateTimeoutError", [2]), first
    if name == "local_failure":
        assert first[:3] == ("raised", "GateTimeoutError", [1]), first
        assert "its op failed before it" in first[3]
        assert outs[1]["elapsed"] < 1.0, "the failing rank knows at once"
    for o in outs:
        assert o["elapsed"] < max(LATE.get(name, {}).values(), default=0) + T + 5, (name, o["elapsed"])


@pytest.fixture(scope="module")
def double():
    why = nccl_like.supported()
    if why:
        pytest.skip(why)
    return values(spawn_ranks(_scenarios_main, 3, "abortable", FAST, timeout=200))


@pytest.mark.parametrize("name", FAST)
def test_one_verdict_per_call_on_the_nccl_like_double(double, name):
    _check(double, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "abortable"])
def test_one_verdict_per_call_in_every_timing_band(backend):
    if backend == "abortable" and nccl_like.supported():
        pytest.skip(nccl_like.supported())
    names = SLOW + (FAST if backend == "gloo" else [])
    results = values(spawn_ranks(_scenarios_main, 3, backend, names, timeout=230))
    for name in names:
        _check(results, name, backend)
