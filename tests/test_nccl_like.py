"""GateSync over a backend that fails the way NCCL does (tests/nccl_like.py).

On NCCL a collective whose peer never arrives neither raises nor times out
in the caller; the watchdog ends the process once the group's timeout has
passed. These tests prove, on real ranks without a GPU, that GateSync's own
deadline fires first: every waiting rank gets a GateTimeoutError naming the
missing rank within timeout + 5 s of the call, the stuck collective is
aborted, and the process lives on past the moment the watchdog would have
killed it.
"""
import os
import signal
import time

import pytest

import nccl_like
from esper_gate._spawn import spawn_ranks, values

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]
_WHY_NOT = nccl_like.supported()
if _WHY_NOT:
    pytestmark.append(pytest.mark.skip(reason=_WHY_NOT))

TIMEOUT_S = 2.0
# Small in tests so that the double's watchdog would fire soon after the gate's
# deadline; the default margin is 60 s.
MARGIN_S = 2.0
BOUND_S = TIMEOUT_S + 5


def _gate(num_slots=4):
    import datetime

    import nccl_like

    import esper_gate
    from esper_gate import _group

    nccl_like.register()
    _group._GROUP_TIMEOUT_MARGIN = datetime.timedelta(seconds=MARGIN_S)
    return esper_gate.GateSync(num_slots, timeout=TIMEOUT_S, backend=nccl_like.BACKEND)


def _raw_op_main(rank, world):
    """Without GateSync, the double behaves as NCCL does: the process is killed."""
    import datetime

    import nccl_like
    import torch
    import torch.distributed as dist

    import esper_gate

    nccl_like.register()
    group = dist.new_group(backend=nccl_like.BACKEND, timeout=datetime.timedelta(seconds=2))
    ones = torch.ones(2, dtype=torch.int64)
    esper_gate.sync(ones.bool(), ones, ones, 1, 7, "unanimous", group.group_name)
    if rank == 1:
        time.sleep(5)  # never makes call 2: the watchdog ends rank 0 at 2 s
        return "skipped"
    esper_gate.sync(ones.bool(), ones, ones, 2, 7, "unanimous", group.group_name)
    return "call 2 returned"  # never: the collective stays pending until the watchdog fires


def test_the_double_kills_a_stuck_rank_like_nccls_watchdog():
    results = spawn_ranks(_raw_op_main, 2, timeout=60, expect_dead=(0,))
    assert results[0].error_type == "died", results[0]
    assert values([results[1]]) == ["skipped"]


def _missing_rank_main(rank, world):
    """Rank 3 skips call 2 (alive), rank 2 is SIGKILLed before it (dead)."""
    import esper_gate

    gs = _gate()
    first = gs([1, 1, 1, 1], [3] * 4, [4] * 4).decisions.tolist()
    if rank == KILLED:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == SKIPPER:
        time.sleep(TIMEOUT_S + MARGIN_S + 3)  # past the others' checks: it never makes call 2
        return {"skipped": True}
    t0 = time.monotonic()
    try:
        gs([1, 1, 1, 1], [3] * 4, [4] * 4)
        out = {"error": None}
    except esper_gate.GateTimeoutError as e:
        out = {"error": type(e).__name__, "missing": e.missing_ranks, "last": e.last_completed,
               "text": str(e)}
    out["elapsed"] = time.monotonic() - t0
    out["first"] = first
    try:
        gs([1, 1, 1, 1], [3] * 4, [4] * 4)
        out["after"] = None
    except esper_gate.GateError as e:
        out["after"] = str(e)
    # Live past the moment the watchdog would have ended this process had
    # the collective not been aborted (group timeout = timeout + margin).
    time.sleep(max(0.0, t0 + TIMEOUT_S + MARGIN_S + 2 - time.monotonic()))
    out["alive_after_s"] = time.monotonic() - t0
    out["watcher_failure"] = type(gs.failure).__name__
    return out


KILLED, SKIPPER = 2, 3


def test_missing_ranks_are_named_within_the_bound_and_the_processes_survive():
    """One rank skips the call and one is killed before it; both are named."""
    world = 4
    results = spawn_ranks(_missing_rank_main, world, timeout=90, expect_dead=(KILLED,))
    missing = [KILLED, SKIPPER]
    waiting = [values([r])[0] for r in results if r.rank not in missing]
    for res in waiting:
        assert res["first"] == [True] * 4
        assert res["error"] == "GateTimeoutError", res
        assert res["missing"] == missing, res
        assert all(res["last"][m] == 1 for m in missing), res   # they completed call 1 only
        assert "ranks 2-3 did not arrive" in res["text"]
        assert res["elapsed"] < BOUND_S, res
        assert "unusable" in res["after"] and "ranks 2-3 did not arrive" in res["after"]
        assert res["alive_after_s"] > TIMEOUT_S + MARGIN_S + 1
        assert res["watcher_failure"] == "GateTimeoutError"
    print(f"\n[W={world}] seconds from call to GateTimeoutError per waiting rank: "
          + ", ".join(f"{r['elapsed']:.2f}" for r in waiting))
    assert values([results[SKIPPER]])[0] == {"skipped": True}


def _near_miss_main(rank, world):
    import esper_gate

    gs = _gate()
    gs([1, 1, 1, 1], [3] * 4, [4] * 4)
    if rank == world - 1:
        # just past the deadline: the call is failed on every rank, naming it late
        time.sleep(TIMEOUT_S + 0.25)
    try:
        first = gs([1, 0, 1, 1], [3] * 4, [4] * 4).decisions.tolist()
    except esper_gate.GateTimeoutError as e:
        first = (e.missing_ranks, "arrived too late" in str(e))
    time.sleep(4.0)  # let every rank's watcher finish whatever it started
    # A new gate on every rank works, and its deadline still fires: a call that a rank really skips is named.
    gs.close()
    gs = _gate()
    second = gs([1, 1, 1, 1], [3] * 4, [4] * 4).decisions.tolist()
    later = None
    if rank == world - 1:
        time.sleep(TIMEOUT_S + 2)  # past the others' GateTimeoutError
    else:
        try:
            gs([1, 1, 1, 1], [3] * 4, [4] * 4)
        except esper_gate.GateTimeoutError as e:
            later = (e.call, e.missing_ranks)
    return first, second, later


def test_a_call_that_completes_just_past_its_deadline_is_failed_on_every_rank_naming_the_late_rank():
    """The deadline is claimed (published) before the abort, so no rank can apply a
    call that another rank failed: a rank just past the deadline is named late on
    every rank, whether its own collective completed or not; and the deadline of a
    new gate still fires."""
    results = values(spawn_ranks(_near_miss_main, 2, timeout=60))
    for first, second, _later in results:
        assert first == ([1], True), first
        assert second == [True] * 4
    assert results[0][2] == (2, [1])
