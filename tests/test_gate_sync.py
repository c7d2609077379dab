"""GateSync on real ranks (gloo, CPU): what only a collective shows.

One spawned world per failure class, each under a hard deadline; several
scenarios share a world. The logic behind them (input preparation, the
diagnosis, the watcher, the rendezvous, poisoned ranks' reasons) is tested
in-process in test_gate_parts.py.
"""
import datetime
import os
import signal
import time

import pytest

from esper_gate._spawn import spawn_ranks, values

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

TIMEOUT_S = 2.0


def _gs(num_slots=4, **kw):
    import esper_gate

    kw.setdefault("timeout", datetime.timedelta(seconds=TIMEOUT_S))
    return esper_gate.GateSync(num_slots, **kw)


def _outcome(fn, *args, **kw):
    """(error type, error text, the error) of a call, or (None, return value, None)."""
    try:
        return None, fn(*args, **kw), None
    except Exception as e:  # noqa: BLE001 - the outcome is what is tested
        return type(e).__name__, str(e), e


# ---- one world, every scenario in which all ranks are present ---------------------

def _divergence(rank, world):
    import torch

    from esper_gate.esper import VOCABULARY

    gs = _gs(6, slot_names=[f"r0c{i}" for i in range(6)], vocabulary=VOCABULARY)
    assert gs.distributed and gs.group_name != torch.distributed.group.WORLD.group_name
    ok = gs([1, 1, 0, 1, 1, 1], [3, 3, 3, 4, 2, 6], [2, 2, 2, 3, 3, 5])
    stages = [3, 3, 3, 4, 2, 6]
    if rank == world - 1:
        stages[1] = 4   # this rank is at BLENDING in slot 1
        stages[4] = 1   # and DORMANT in slot 4
    div = gs(torch.tensor([True] * 6), torch.tensor(stages), [2, 2, 2, 3, 3, 5])
    rep = div.report()
    return {"ok": ok.decisions.tolist(), "ok_diverged": ok.diverged.tolist(),
            "decisions": div.decisions.tolist(), "diverged": div.diverged.tolist(),
            "slots": [(s.slot, s.name, [(h.stage, h.target, h.ranks) for h in s.holdings])
                      for s in rep.diverged_slots],
            "text": str(rep), "raised": _outcome(div.raise_if_diverged)[:2], "calls": gs.calls}


# Each once slipped past GateSync: a tensor on another device made that rank
# skip the collective, float sequences were truncated into valid ids, and a
# site past int64 failed after the rank had announced its arrival.
BAD_INPUTS = {"range": "stage id outside 0..63", "length": "shape [4]",
              "dtype": "integer dtype, got torch.float32", "meta": "stages is on meta, expected cpu",
              "all_meta": "votes is on meta, expected cpu",
              "float_stages": "stages must be a tensor or a sequence of ints",
              "float_votes": "votes must be a tensor or a sequence of ints",
              "site": "site must be an int in 0..2**32-1, got 9223372036854775808"}


def _bad_inputs(rank, world):
    """Rank 1 passes each kind of bad input in turn; every rank must fail in that call."""
    import torch

    gs = _gs()
    out = {}
    for kind in BAD_INPUTS:
        votes, stages, targets, site = [1, 1, 1, 1], [3, 3, 3, 3], [4, 4, 4, 4], None
        if rank == 1:
            if kind == "range":
                stages = [3, 3, 99, 3]
            elif kind == "length":
                votes = [1, 1, 1]
            elif kind == "dtype":
                votes = torch.tensor([0.5, 1.0, 1.0, 1.0])
            elif kind == "meta":
                stages = torch.tensor([3, 3, 3, 3], device="meta")
            elif kind == "all_meta":
                votes, stages, targets = (torch.ones(4, dtype=torch.int64, device="meta") for _ in range(3))
            elif kind == "float_stages":
                stages = [3.9, 3, 3, 3]
            elif kind == "float_votes":
                votes = [0.5, 1, 1, 1]
            elif kind == "site":
                site = 2**63
        t0 = time.monotonic()
        name, text, e = _outcome(gs, votes, stages, targets, site=site)
        out[kind] = {"error": name, "text": text, "is_value_error": isinstance(e, ValueError),
                     "ranks": getattr(e, "ranks", None), "elapsed": time.monotonic() - t0,
                     # the group is still usable after bad input: the next call agrees
                     "next": gs([1, 1, 1, 1], [3] * 4, [4] * 4).decisions.tolist()}
    return out


def _slow_rank(rank, world):
    gs = _gs()
    if rank == 0:
        time.sleep(TIMEOUT_S * 0.4)  # 2.5x inside the deadline, so a loaded machine cannot flip it
    return gs([1, 1, 0, 1], [3] * 4, [4] * 4).decisions.tolist()


def _config_mismatch(rank, world):
    out = {}
    for what in ("num_slots", "policy", "names", "slot_state"):
        kw, n = {}, 4
        if rank == world - 1:
            if what == "num_slots":
                n = 5
            elif what == "policy":
                kw["policy"] = "majority"
            elif what == "names":
                kw["slot_names"] = ["a", "b", "c", "x"]
            elif what == "slot_state":  # its buffers would be 2 words short of the others'
                kw["slot_state"] = False
        kw.setdefault("slot_names", ["a", "b", "c", "d", "e"][:n])
        gs = _gs(n, **kw)
        out[what] = _outcome(gs, [1] * n, [3] * n, [4] * n)[:2]
        gs.close()
    return out


def _no_slot_state(rank, world):
    """A gate built with slot_state=False on every rank: its calls decide as any gate's, and
    a rank that passes digests or per-slot policies to it is bad input in that call."""
    gs = _gs(slot_state=False)
    out = {"decisions": gs([1, 1, 0, 1], [3] * 4, [4] * 4).decisions.tolist()}
    out["slot_state"] = gs([1, 1, 1, 1], [3] * 4, [4] * 4).report().slot_state
    for kind, extra in (("digests", {"digests": [1, 2, 3, 4]}), ("policies", {"policies": ["any"] * 4})):
        kw = extra if rank == 1 else {}
        t0 = time.monotonic()
        name, text, e = _outcome(gs, [1] * 4, [3] * 4, [4] * 4, **kw)
        out[kind] = {"error": name, "text": text, "ranks": getattr(e, "ranks", None),
                     "elapsed": time.monotonic() - t0,
                     "next": gs([1, 1, 1, 1], [3] * 4, [4] * 4).decisions.tolist()}
    # the gate's own policy named per slot is no per-slot state: accepted
    out["own_policy"] = gs([1] * 4, [3] * 4, [4] * 4, policies=["unanimous", None] * 2).decisions.tolist()
    gs.close()
    return out


def _no_pickle(rank, world):
    import pickle

    import torch.distributed.distributed_c10d as c10d

    def refuse(*_a, **_k):
        raise AssertionError("pickle used")

    # every object collective of torch.distributed goes through these
    saved = pickle.dumps, pickle.loads, c10d._object_to_tensor, c10d._tensor_to_object
    pickle.dumps = pickle.loads = c10d._object_to_tensor = c10d._tensor_to_object = refuse
    try:
        from esper_gate.esper import VOCABULARY

        gs = _gs(3, slot_names=["a", "b", "c"], vocabulary=VOCABULARY)
        stages = [3, 4, 3] if rank == world - 1 else [3, 3, 3]
        res = gs([1, 1, 1], stages, [2, 2, 2])
        return res.decisions.tolist(), str(res.report())
    finally:
        pickle.dumps, pickle.loads, c10d._object_to_tensor, c10d._tensor_to_object = saved


def _all_present_main(rank, world):
    return {"divergence": _divergence(rank, world), "bad": _bad_inputs(rank, world),
            "slow": _slow_rank(rank, world), "config": _config_mismatch(rank, world),
            "no_slot_state": _no_slot_state(rank, world), "no_pickle": _no_pickle(rank, world)}


@pytest.fixture(scope="module")
def all_present():
    """One 3-rank world runs every scenario in which all ranks take part."""
    return values(spawn_ranks(_all_present_main, 3, timeout=100))


def test_divergence_blocks_exactly_the_diverged_slots(all_present):
    last = len(all_present) - 1
    for res in (r["divergence"] for r in all_present):
        assert res["ok"] == [True, True, False, True, True, True]
        assert res["ok_diverged"] == [False] * 6
        assert res["decisions"] == [True, False, True, True, False, True]
        assert res["diverged"] == [False, True, False, False, True, False]
        assert res["slots"] == [(1, "r0c1", [(3, 2, list(range(last))), (4, 2, [last])]),
                                (4, "r0c4", [(2, 3, list(range(last))), (1, 3, [last])])]
        assert f"rank {last} holds BLENDING -> G2" in res["text"]
        assert f"rank {last} holds DORMANT -> G3" in res["text"]
        assert res["raised"][0] == "GateDivergenceError"
        assert res["calls"] == 2


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_fails_every_rank_in_the_same_call(all_present, kind):
    reason = BAD_INPUTS[kind]
    for rank, res in enumerate(r["bad"][kind] for r in all_present):
        assert res["elapsed"] < TIMEOUT_S, "must fail in the same call, not after a timeout"
        assert res["next"] == [True] * 4
        if rank == 1:
            assert res["error"] == "GateInputError" and res["is_value_error"], res
            assert reason in res["text"]
        else:
            assert res["error"] == "GatePeerInputError", res
            assert res["ranks"] == [1] and "rank 1" in res["text"]


def test_slow_rank_within_timeout_succeeds(all_present):
    for res in all_present:
        assert res["slow"] == [True, True, False, True]


@pytest.mark.parametrize("what", ["num_slots", "policy", "names", "slot_state"])
def test_configuration_mismatch_fails_all_ranks_on_first_call(all_present, what):
    for name, text in (r["config"][what] for r in all_present):
        assert name == "GateConfigError"
        assert "rank 2:" in text and "different settings" in text


def test_a_gate_without_the_slot_state_decides_and_refuses_slot_state_as_bad_input(all_present):
    for rank, res in enumerate(r["no_slot_state"] for r in all_present):
        assert res["decisions"] == [True, True, False, True]
        assert res["slot_state"] is False
        assert res["own_policy"] == [True] * 4
        for kind in ("digests", "policies"):
            got = res[kind]
            assert got["elapsed"] < TIMEOUT_S and got["next"] == [True] * 4, got
            if rank == 1:
                assert got["error"] == "GateInputError" and "slot_state=False" in got["text"], got
            else:
                assert got["error"] == "GatePeerInputError" and got["ranks"] == [1], got


def test_no_pickle_anywhere_on_the_wire(all_present):
    for decisions, text in (r["no_pickle"] for r in all_present):
        assert decisions == [True, False, True]
        assert "rank 2 holds BLENDING" in text


# ---- a rank that never arrives, then a construction it misses -----------------------

def _skip_then_rebuild_main(rank, world):
    """Rank 2 skips call 2 (Esper's hang: no active seed there), so ranks 0 and 1 get a
    GateTimeoutError naming it; they build a new gate while rank 2 is still away (a
    construction timeout naming it), then again, and rank 2 comes back to meet them."""
    from torch.distributed.distributed_c10d import _get_default_store

    import esper_gate

    store = _get_default_store()
    late = world - 1
    gs = _gs()
    gs([1, 1, 1, 1], [3] * 4, [4] * 4)  # call 1: everyone
    out = {}
    if rank == late:
        store.wait([f"test/gave_up/{r}" for r in range(world) if r != late], datetime.timedelta(seconds=60))
    else:
        t0 = time.monotonic()
        name, text, e = _outcome(gs, [1, 1, 1, 1], [3] * 4, [4] * 4)
        out["skip"] = {"error": name, "text": text, "missing": getattr(e, "missing_ranks", None),
                       "last": getattr(e, "last_completed", None), "elapsed": time.monotonic() - t0}
        try:
            _gs()
            out["first_build"] = "built"
        except esper_gate.GateTimeoutError as e:
            out["first_build"] = (type(e).__name__, e.missing_ranks)
        store.set(f"test/gave_up/{rank}", "1")
    gs = _gs()  # "build a new one on every rank"
    out["rebuilt"] = gs([1, 1, 0, 1], [3] * 4, [4] * 4).decisions.tolist()
    return out


def test_skipped_call_then_missed_construction_are_named_and_a_rebuild_meets():
    world = 3
    results = values(spawn_ranks(_skip_then_rebuild_main, world, timeout=90))
    for rank, res in enumerate(results):
        assert res["rebuilt"] == [True, True, False, True]
        if rank == world - 1:
            assert set(res) == {"rebuilt"}
            continue
        skip = res["skip"]
        assert skip["error"] == "GateTimeoutError", skip
        assert skip["missing"] == [world - 1]
        assert skip["last"][world - 1] == 1          # it completed call 1 only
        assert skip["elapsed"] < TIMEOUT_S + 5
        assert f"rank {world - 1} did not arrive" in skip["text"]
        assert res["first_build"] == ("GateTimeoutError", [world - 1])


# ---- a rank that dies ---------------------------------------------------------------

def _die_main(rank, world, victim):
    gs = _gs()
    for call in range(1, 4):
        if rank == victim and call == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        name, text, e = _outcome(gs, [1, 1, 1, 1], [3] * 4, [4] * 4)
        if name is not None:
            return {"error": name, "missing": getattr(e, "missing_ranks", None),
                    "last": getattr(e, "last_completed", None), "call": call,
                    "elapsed": time.monotonic() - t0, "text": text}
    return {"error": None}


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_is_named_by_the_survivors(victim, capfd):
    """Rank 0 also hosts the store: its survivors must name it, and only it."""
    world = 3
    results = spawn_ranks(_die_main, world, victim, timeout=60, expect_dead=(victim,))
    survivors = [r for r in results if r.rank != victim]
    for r in survivors:
        res = values([r])[0]
        assert res["error"] == "GateTimeoutError", res
        assert res["missing"] == [victim], res
        assert res["call"] == 3 and f"rank {victim} did not arrive" in res["text"]
        if victim != 0:
            assert res["last"][victim] == 2
        else:
            assert "store" in res["text"]
        assert res["elapsed"] < TIMEOUT_S + 5
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    # A survivor's store requests are serialized and stop at the first
    # failure: one c10d warning each (PyTorch may log a failed request twice),
    # not one per heartbeat and per rank read.
    assert err.count("TCPStore.cpp") <= 2 * len(survivors), err[-3000:]


# ---- in one process -------------------------------------------------------------------

def test_bool_votes_are_true_for_any_nonzero_byte():
    """uint8 data viewed as bool may hold 2; torch reads that as True, and so must the gate."""
    import torch

    import esper_gate

    votes = torch.tensor([1, 2, 0, 255], dtype=torch.uint8).view(torch.bool)
    stages, targets = torch.full((4,), 3), torch.full((4,), 2)
    assert votes.tolist() == [True, True, False, True]
    res = esper_gate.GateSync(4)(votes, stages, targets)
    assert res.host_decisions() == [True, True, False, True]
    assert res.report().ok
    packed = esper_gate.pack(votes, stages, targets, 1, 5, "unanimous", 0, 2)
    assert torch.equal(packed, esper_gate.pack(votes.to(torch.uint8).bool(), stages, targets, 1, 5,
                                               "unanimous", 0, 2))


def test_local_mode_issues_no_collective():
    import torch.distributed as dist

    import esper_gate

    assert not dist.is_initialized()
    gs = esper_gate.GateSync(3, policy="any")
    assert not gs.distributed
    res = gs([0, 1, 0], [3, 3, 3], [4, 4, 4])
    assert res.decisions.tolist() == [False, True, False]
    assert res.report().ok
    with pytest.raises(esper_gate.GateInputError, match=r"stages must have shape \[3\], got \[2\]"):
        gs([0, 1, 0], [3, 3], [4, 4, 4])
    with pytest.raises(esper_gate.GateInputError, match="stage id outside 0..63"):
        gs([0, 1, 0], [3, 3, 64], [4, 4, 4])


# ---- groups that come and go ---------------------------------------------------------

def _lifecycle_main(rank, world):
    """Gates on subgroups, the user's own local-sync groups and gates built in opposite
    orders must not change how later gates are named or paired."""
    import torch.distributed as dist

    import esper_gate

    def world_gate():
        gs = _gs(2)
        try:
            return gs([1, 1], [3, 3], [4, 4]).decisions.tolist()
        finally:
            gs.close()

    out = {}
    sub = dist.new_group([1, 2])  # every rank calls it: a plain subgroup
    if rank in (1, 2):
        sub_gate = _gs(2, group=sub)
        out["sub"] = sub_gate([1, 0], [3, 3], [4, 4]).decisions.tolist()
        sub_gate.close()
    out["after_sub"] = [world_gate(), world_gate()]
    if rank in (1, 2):  # the user's own group, made on its members only
        dist.new_group([1, 2], use_local_synchronization=True)
    out["after_local"] = world_gate()
    # two gates with the same settings, built in opposite orders on rank 0 and the others
    first, second = _gs(2), _gs(2)
    mine = first if rank == 0 else second
    name, text, e = _outcome(mine, [1, 1], [3, 3], [4, 4])
    out["order"] = {"error": name, "text": text, "missing": getattr(e, "missing_ranks", None),
                    "index": mine.index}
    first.close()
    second.close()
    with pytest.raises(esper_gate.GateError, match="closed"):
        first([1, 1], [3, 3], [4, 4])
    with pytest.raises(esper_gate.GateError, match="close\\(\\) freed its process group"):
        first.group  # noqa: B018 - the property is what is tested
    out["after_order"] = world_gate()
    return out


def test_gates_on_subgroups_and_in_other_orders_leave_later_gates_working():
    results = values(spawn_ranks(_lifecycle_main, 3, timeout=90))
    for rank, res in enumerate(results):
        if rank in (1, 2):
            assert res["sub"] == [True, False]
        assert res["after_sub"] == [[True, True], [True, True]]
        assert res["after_local"] == [True, True]
        assert res["after_order"] == [True, True]
        order = res["order"]
        assert order["error"] == "GateTimeoutError", order
        others = [1, 2] if rank == 0 else [0]
        assert order["missing"] == others, order
        for r in others:
            gate = results[r]["order"]["index"]
            assert gate != order["index"]
            assert f"rank {r} is waiting in gate #{gate} of this group" in order["text"], order
        assert "built in a different order" in order["text"] and "did not arrive" not in order["text"]


def _in_turn_main(rank, world, late):
    """Two gates used in turn; rank ``late`` completes every call, then comes to gate #1's
    third call after the others have diagnosed it (past their deadline and the settle)."""
    first, second = _gs(2), _gs(2)
    args = ([1, 1], [3, 3], [4, 4])
    out = {}
    for call in (1, 2, 3):
        first(*args)
        if call == 3 and rank == late:
            time.sleep(TIMEOUT_S + 3)
        name, text, e = _outcome(second, *args)
        out[call] = {"error": name, "text": text if name else None, "missing": getattr(e, "missing_ranks", None)}
    out["indexes"] = (first.index, second.index)
    first.close()
    second.close()
    return out


def test_a_rank_late_into_the_next_of_two_gates_used_in_turn_is_named_absent_not_elsewhere():
    late = 2
    results = values(spawn_ranks(_in_turn_main, 3, late, timeout=90))
    for rank, res in enumerate(results):
        assert res["indexes"] == (0, 1)
        assert res[1]["error"] is None and res[2]["error"] is None, res
        third = res[3]
        assert third["error"] == "GateTimeoutError" and third["missing"] == [late], (rank, third)
        # every call of gate #0 completed on the late rank: it is waiting in no gate
        assert f"rank {late} did not arrive" in third["text"], (rank, third)
        assert "waiting in gate" not in third["text"], (rank, third)


_CYCLES_RANK = r'''
import os, sys
import torch.distributed as dist
import esper_gate
rank, world, port, n = (int(x) for x in sys.argv[1:5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
def counts():
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))
def cycle():
    gs = esper_gate.GateSync(2, timeout=20)
    assert gs([1, 1], [3, 3], [4, 4]).decisions.tolist() == [True, True]
    gs.close()
cycle()  # the first one loads what stays loaded
before = counts()
for _ in range(n):
    cycle()
print("counts", *before, *counts(), flush=True)
print("done", flush=True)
'''


def _construct_and_close(n):
    """n construct/close cycles on 2 ranks: (threads and fds before and after, per rank),
    and seconds from each rank's last line to its exit."""
    import subprocess
    import sys

    from esper_gate._spawn import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _CYCLES_RANK, str(r), "2", str(port), str(n)],
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    counts, exit_s = [], []
    try:
        for p in procs:
            for line in p.stdout:
                if line.startswith("counts"):
                    counts.append(tuple(int(x) for x in line.split()[1:]))
                elif line.startswith("done"):
                    done = time.monotonic()
                    break
            p.wait(timeout=60)
            exit_s.append(time.monotonic() - done)
    finally:
        for p in procs:
            p.kill()
    return counts, exit_s


@pytest.mark.parametrize("n", [50, pytest.param(500, marks=pytest.mark.slow)])
@pytest.mark.timeout(300)
def test_close_frees_the_gates_group_threads_and_fds(n):
    counts, exit_s = _construct_and_close(n)
    print(f"\n{n} construct/close cycles on 2 ranks: threads, fds before/after {counts}; "
          f"exit took {', '.join(f'{s:.2f}' for s in exit_s)} s")
    assert len(counts) == 2
    for threads, fds, threads_after, fds_after in counts:
        assert (threads_after, fds_after) == (threads, fds)
    # Leaked groups made exit wait on their threads (3.5 s after 200 cycles); a
    # generous bound, so that a loaded machine cannot fail it.
    assert max(exit_s) < 5


# ---- the user's own groups, made on another thread while gates are built ---------------

USER_GROUPS = 30
THREAD_GATES = 6


def _user_groups_main(rank, world):
    """A user thread makes groups with dist.new_group in a loop while this thread builds and
    uses gates: the user's groups must be named and counted as if no gate existed."""
    import threading

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    count = c10d._world.group_count
    made, errors, spans = [], [], {"user": [], "gates": []}

    def user():
        try:
            for _ in range(USER_GROUPS):
                t0 = time.monotonic()
                group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=15))
                made.append(group.group_name)
                spans["user"].append((t0, time.monotonic()))
                dist.destroy_process_group(group)
        except Exception as e:  # noqa: BLE001 - what the user's thread saw is what is tested
            errors.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=user, name="user-groups")
    thread.start()
    gates = []
    try:
        for _ in range(THREAD_GATES):
            t0 = time.monotonic()
            gs = _gs(2, timeout=datetime.timedelta(seconds=15))
            gates.append(gs([1, 1], [3, 3], [4, 4]).decisions.tolist())
            spans["gates"].append((t0, time.monotonic()))
            gs.close()
    finally:
        thread.join(timeout=60)
    return {"made": made, "errors": errors, "count": (count, c10d._world.group_count), "gates": gates,
            "spans": spans, "gate_names": sorted(n for n in c10d._world.pg_names.values() if "esper_gate" in n)}


@pytest.mark.timeout(180)
def test_a_user_thread_making_groups_while_gates_are_built_keeps_its_names_and_counter():
    results = values(spawn_ranks(_user_groups_main, 3, timeout=150))
    for rank, res in enumerate(results):
        assert res["errors"] == [], (rank, res["errors"])
        # default-named groups are numbered by c10d's counter, in the order the user made them
        start = res["count"][0]
        assert res["made"] == [str(start + i) for i in range(USER_GROUPS)], (rank, res["made"])
        assert res["count"][1] == start + USER_GROUPS, (rank, res["count"])
        assert res["gates"] == [[True, True]] * THREAD_GATES, (rank, res["gates"])
        assert res["gate_names"] == [], (rank, res["gate_names"])
        # the scenario happened: gates were built while the user's thread was making groups
        first, last = res["spans"]["user"][0][0], res["spans"]["user"][-1][1]
        during = [g for g in res["spans"]["gates"] if first < g[1] and g[0] < last]
        assert len(during) >= 2, (rank, res["spans"])
