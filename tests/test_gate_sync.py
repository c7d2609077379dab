"""GateSync on real ranks (gloo, CPU): agreement, divergence and the failures a
training job meets (a skipped call, a killed or slow rank, bad input, mismatched
configurations). Each test spawns its ranks under a hard deadline."""
import datetime
import os
import signal
import time

import pytest

from mp import run_ranks, values

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

TIMEOUT_S = 3.0


def _gs(num_slots=4, **kw):
    import esper_gate

    kw.setdefault("timeout", datetime.timedelta(seconds=TIMEOUT_S))
    return esper_gate.GateSync(num_slots, **kw)


# ---- agreement and divergence ------------------------------------------------

def _divergence_main(rank, world):
    import torch

    gs = _gs(6, slot_names=[f"r0c{i}" for i in range(6)])
    assert gs.distributed and gs.group_name != torch.distributed.group.WORLD.group_name
    ok = gs([1, 1, 0, 1, 1, 1], [3, 3, 3, 4, 2, 6], [2, 2, 2, 3, 3, 5])
    stages = [3, 3, 3, 4, 2, 6]
    if rank == world - 1:
        stages[1] = 4   # this rank is at BLENDING in slot 1
        stages[4] = 1   # and DORMANT in slot 4
    div = gs(torch.tensor([True] * 6), torch.tensor(stages), [2, 2, 2, 3, 3, 5])
    rep = div.report()
    try:
        div.raise_if_diverged()
        raised = None
    except Exception as e:
        raised = (type(e).__name__, str(e))
    return {"ok": ok.decisions.tolist(), "ok_diverged": ok.diverged.tolist(),
            "decisions": div.decisions.tolist(), "diverged": div.diverged.tolist(),
            "slots": [(s.slot, s.name, [(h.stage, h.target, h.ranks) for h in s.holdings])
                      for s in rep.diverged_slots],
            "text": str(rep), "raised": raised, "calls": gs.calls}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_divergence_blocks_exactly_the_diverged_slots(world):
    results = values(run_ranks(_divergence_main, world, timeout=90))
    last = world - 1
    for res in results:
        assert res["ok"] == [True, True, False, True, True, True]
        assert res["ok_diverged"] == [False] * 6
        assert res["decisions"] == [True, False, True, True, False, True]
        assert res["diverged"] == [False, True, False, False, True, False]
        assert res["slots"] == [
            (1, "r0c1", [(3, 2, list(range(last))), (4, 2, [last])] if last > 1 else
             [(3, 2, [0]), (4, 2, [1])]),
            (4, "r0c4", [(2, 3, list(range(last))), (1, 3, [last])] if last > 1 else
             [(2, 3, [0]), (1, 3, [1])]),
        ]
        assert f"rank {last} holds BLENDING -> G2" in res["text"]
        assert f"rank {last} holds DORMANT -> G3" in res["text"]
        assert res["raised"][0] == "GateDivergenceError"
        assert res["calls"] == 2


# ---- a rank that never arrives ---------------------------------------------------

def _skip_main(rank, world):
    gs = _gs()
    gs([1, 1, 1, 1], [3] * 4, [4] * 4)  # call 1: everyone
    if rank == world - 1:
        # the Esper hang: no active seed here, so this rank never reaches gate 2
        time.sleep(TIMEOUT_S + 4)
        return {"skipped": True}
    t0 = time.monotonic()
    try:
        gs([1, 1, 1, 1], [3] * 4, [4] * 4)
    except Exception as e:
        return {"error": type(e).__name__, "missing": getattr(e, "missing_ranks", None),
                "last": getattr(e, "last_completed", None), "elapsed": time.monotonic() - t0,
                "text": str(e)}
    return {"error": None}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_skipped_call_times_out_naming_the_rank(world):
    results = values(run_ranks(_skip_main, world, timeout=60))
    for rank, res in enumerate(results[:-1]):
        assert res["error"] == "GateTimeoutError", res
        assert res["missing"] == [world - 1]
        assert res["last"][world - 1] == 1          # it completed call 1 only
        assert res["elapsed"] < TIMEOUT_S + 5
        assert f"rank {world - 1} did not arrive" in res["text"]
    assert results[-1]["skipped"]


def _die_main(rank, world, victim):
    gs = _gs()
    for call in range(1, 4):
        if rank == victim and call == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            gs([1, 1, 1, 1], [3] * 4, [4] * 4)
        except Exception as e:
            return {"error": type(e).__name__, "missing": getattr(e, "missing_ranks", None),
                    "last": getattr(e, "last_completed", None), "call": call,
                    "elapsed": time.monotonic() - t0, "text": str(e)}
    return {"error": None}


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_is_named_by_the_survivors(victim, capfd):
    """Rank 0 also hosts the store: its survivors must name it, and only it."""
    world = 3
    results = run_ranks(_die_main, world, victim, timeout=60, expect_dead=(victim,))
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


def _slow_main(rank, world):
    gs = _gs()
    if rank == 0:
        time.sleep(TIMEOUT_S * 0.4)  # 2.5x inside the deadline, so a loaded machine cannot flip it
    return gs([1, 1, 0, 1], [3] * 4, [4] * 4).decisions.tolist()


def test_slow_rank_within_timeout_succeeds():
    for res in values(run_ranks(_slow_main, 3, timeout=60)):
        assert res == [True, True, False, True]


# ---- bad input on one rank -----------------------------------------------------------

def _bad_input_main(rank, world, kind):
    import torch

    gs = _gs()
    votes, stages, targets = [1, 1, 1, 1], [3, 3, 3, 3], [4, 4, 4, 4]
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
    site = None
    if rank == 1 and kind == "site":
        site = 2**63
    t0 = time.monotonic()
    try:
        gs(votes, stages, targets, site=site)
        out = {"error": None}
    except Exception as e:
        out = {"error": type(e).__name__, "is_value_error": isinstance(e, ValueError),
               "ranks": getattr(e, "ranks", None), "text": str(e)}
    out["elapsed"] = time.monotonic() - t0
    # the group is still usable after bad input: the next call agrees
    out["next"] = gs([1, 1, 1, 1], [3] * 4, [4] * 4).decisions.tolist()
    return out


BAD_INPUTS = [("range", "stage id outside 0..63"), ("length", "shape [4]"),
              ("dtype", "integer dtype, got torch.float32")]
# Each of these once slipped past GateSync: a tensor on another device made
# that rank skip the collective, float sequences were truncated into valid
# ids, and a site past int64 failed after the rank had announced its arrival.
MORE_BAD_INPUTS = [("meta", "stages is on meta, expected cpu"), ("all_meta", "votes is on meta, expected cpu"),
                   ("float_stages", "stages must be a tensor or a sequence of ints"),
                   ("float_votes", "votes must be a tensor or a sequence of ints"),
                   ("site", "site must be an int in 0..2**32-1, got 9223372036854775808")]


@pytest.mark.parametrize("world, kind, reason", [(w, k, r) for w in (2, 3, 4) for k, r in BAD_INPUTS]
                         + [(3, k, r) for k, r in MORE_BAD_INPUTS])
def test_bad_input_fails_every_rank_in_the_same_call(world, kind, reason):
    results = values(run_ranks(_bad_input_main, world, kind, timeout=60))
    for rank, res in enumerate(results):
        assert res["elapsed"] < TIMEOUT_S, "must fail in the same call, not after a timeout"
        assert res["next"] == [True] * 4
        if rank == 1:
            assert res["error"] == "GateInputError" and res["is_value_error"]
            assert reason in res["text"]
        else:
            assert res["error"] == "GatePeerInputError", res
            assert res["ranks"] == [1] and "rank 1" in res["text"]


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


def test_each_poisoned_rank_learns_its_own_reason_above_64_ranks():
    """Above 64 ranks the buffer only counts poisoned ranks; each one must still
    get a GateInputError with its own reason, and the clean ranks a
    GatePeerInputError."""
    import torch

    import esper_gate
    from esper_gate.gate_sync import GateConsensus
    from reference import RankInput
    from simulate import simulate

    world, n = 70, 4
    inputs = [RankInput([1] * n, [3] * n, [2] * n, seq=1, site=9) for _ in range(world)]
    inputs[5].stages = [3, 64, 3, 3]
    inputs[40].votes = [1, 1, 7, 1]
    for view, kind, reason in ((5, esper_gate.GateInputError, "stage id outside 0..63"),
                               (40, esper_gate.GateInputError, "vote that is neither 0 nor 1"),
                               (0, esper_gate.GatePeerInputError, "2 rank(s) passed bad input"),
                               (69, esper_gate.GatePeerInputError, "2 rank(s) passed bad input")):
        decision, report, _ = simulate(inputs, view=view)
        gs = esper_gate.GateSync(n)  # local; only its rank, policy and names are used here
        gs.rank = view
        mine = inputs[view]
        res = GateConsensus(gs, 1, torch.tensor(decision), torch.tensor(report), None, None,
                            (torch.tensor(mine.votes), torch.tensor(mine.stages), torch.tensor(mine.targets),
                             mine.site, 0))
        with pytest.raises(kind, match=reason.replace("(", r"\(").replace(")", r"\)")):
            res.raise_if_diverged()
        assert decision == [False] * n


def _rebuild_main(rank, world):
    import esper_gate

    late = world - 1
    attempts = []
    if rank == late:
        time.sleep(TIMEOUT_S + 1.5)  # misses the first construction entirely
    else:
        try:
            _gs()
            attempts.append("built")
        except esper_gate.GateTimeoutError as e:
            attempts.append((type(e).__name__, e.missing_ranks))
    gs = _gs()  # "build a new one on every rank"
    return attempts, gs([1, 1, 0, 1], [3] * 4, [4] * 4).decisions.tolist()


def test_rebuild_after_a_construction_timeout_meets_on_every_rank():
    results = values(run_ranks(_rebuild_main, 3, timeout=60))
    for rank, (attempts, decisions) in enumerate(results):
        assert attempts == ([] if rank == 2 else [("GateTimeoutError", [2])])
        assert decisions == [True, True, False, True]


# ---- configuration mismatch -----------------------------------------------------------

def _config_main(rank, world, what):
    kw = {}
    n = 4
    if rank == world - 1:
        if what == "num_slots":
            n = 5
        elif what == "policy":
            kw["policy"] = "majority"
        elif what == "names":
            kw["slot_names"] = ["a", "b", "c", "x"]
    if "slot_names" not in kw:
        kw["slot_names"] = ["a", "b", "c", "d"][:n] + (["e"] if n == 5 else [])
    gs = _gs(n, **kw)
    try:
        gs([1] * n, [3] * n, [4] * n)
    except Exception as e:
        return type(e).__name__, str(e)
    return None, None


@pytest.mark.parametrize("what", ["num_slots", "policy", "names"])
def test_configuration_mismatch_fails_all_ranks_on_first_call(what):
    results = values(run_ranks(_config_main, 3, what, timeout=60))
    for name, text in results:
        assert name == "GateConfigError"
        assert "rank 2:" in text and "different settings" in text


# ---- locally, with no process group ---------------------------------------------------

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


# ---- nothing code-carrying on the wire --------------------------------------------------

def _no_pickle_main(rank, world):
    import pickle

    import torch.distributed.distributed_c10d as c10d

    def refuse(*_a, **_k):
        raise AssertionError("pickle used")

    # every object collective of torch.distributed goes through these
    pickle.dumps = pickle.loads = refuse
    c10d._object_to_tensor = c10d._tensor_to_object = refuse
    gs = _gs(3, slot_names=["a", "b", "c"])
    stages = [3, 4, 3] if rank == world - 1 else [3, 3, 3]
    res = gs([1, 1, 1], stages, [2, 2, 2])
    return res.decisions.tolist(), str(res.report())


def test_no_pickle_anywhere_on_the_wire():
    for decisions, text in values(run_ranks(_no_pickle_main, 2, timeout=60)):
        assert decisions == [True, False, True]
        assert "rank 1 holds BLENDING" in text
