"""Bad input at every public entry point fails every rank in the same call.

A rank that raises on its own input before the collective leaves its peers
waiting out the timeout for a call that never comes ("rank 1 did not arrive").
Every kind of bad input, at ``GateSync.__call__`` and at the three Esper
adapters, must instead travel through the call as poison: a GateInputError on
the bad rank and a GatePeerInputError on the others, in that call.

One spawned world of 2 gloo ranks runs the whole table (kind x entry point) in
sequence; the adapters' reading of slots and gate results, and a world of one,
are checked in-process.
"""
from __future__ import annotations

import dataclasses
import datetime

import pytest

from esper_gate.esper import GateLevel, SeedStage
from esper_gate._spawn import spawn_ranks, values
from test_kasmina import gate, slot_at

# Short, so that a regression shows as a GateTimeoutError in seconds rather than a hang.
TIMEOUT_S = 3.0
BAD_RANK = 1
ENTRY_POINTS = ("GateSync", "gate_round", "sync_gate_decisions", "sync_gate_decision")


@dataclasses.dataclass
class NoPassed:
    """A gate result that lost its ``passed`` field."""
    gate: GateLevel
    message: str = ""


@dataclasses.dataclass
class NoSlotId:
    """A slot without ``slot_id``."""
    state: object = None
    is_active: bool = False


def _good():
    """The inputs every rank passes, per entry point, as keyword arguments."""
    slots = [slot_at("r0c0", SeedStage.TRAINING), slot_at("r0c1", SeedStage.BLENDING)]
    results = [gate(GateLevel.G2, True), gate(GateLevel.G3, True)]
    return {"GateSync": dict(votes=[1, 1], stages=[3, 4], targets=[2, 3]),
            "gate_round": dict(slots=slots, gate_results=results),
            "sync_gate_decisions": dict(slots=list(slots), gate_results=list(results)),
            "sync_gate_decision": dict(slot=slots[1], gate_result=results[1])}


def _stage(slot, stage):
    return dataclasses.replace(slot, state=dataclasses.replace(slot.state, stage=stage))


def _round_kind(kind: str, kw: dict) -> dict | None:
    """The bad rank's arguments of gate_round / sync_gate_decisions for ``kind``."""
    slots, results = list(kw["slots"]), list(kw["gate_results"])
    if kind == "missing_result":
        return dict(kw, gate_results=results[:1])
    if kind in ("gate_none", "gate_name", "gate_no_gate"):
        value = {"gate_none": None, "gate_name": "G2", "gate_no_gate": 63}[kind]
        results[1] = dataclasses.replace(results[1], gate=value)
        return dict(kw, gate_results=results)
    if kind == "stage_name":
        slots[1] = _stage(slots[1], "TRAINING")
        return dict(kw, slots=slots)
    if kind == "no_passed":
        results[1] = NoPassed(GateLevel.G3)
        return dict(kw, gate_results=results)
    if kind == "no_slot_id":
        slots[1] = NoSlotId()
        return dict(kw, slots=slots)
    return _argument_kind(kind, kw)


# Bad per-call arguments, the same at GateSync and the round adapters.
_ARGUMENTS = {"names_int": {"names": 5}, "policies_int": {"policies": 5}, "digests_name": {"digests": "ab"}}


def _argument_kind(kind: str, kw: dict) -> dict | None:
    return dict(kw, **_ARGUMENTS[kind]) if kind in _ARGUMENTS else None


def _bad(kind: str, entry: str, kw: dict) -> dict | None:
    """The bad rank's arguments for ``kind`` at ``entry`` (None: no such input there)."""
    if entry in ("gate_round", "sync_gate_decisions"):
        return _round_kind(kind, kw)
    if entry == "sync_gate_decision":
        result = kw["gate_result"]
        if kind == "missing_result":
            return dict(kw, gate_result=None)
        if kind in ("gate_none", "gate_name", "gate_no_gate"):
            value = {"gate_none": None, "gate_name": "G2", "gate_no_gate": 63}[kind]
            return dict(kw, gate_result=dataclasses.replace(result, gate=value))
        if kind == "stage_name":
            return dict(kw, slot=_stage(kw["slot"], "TRAINING"))
        if kind == "no_passed":
            return dict(kw, gate_result=NoPassed(GateLevel.G3))
        if kind == "no_slot_id":
            return dict(kw, slot=NoSlotId())
        return None
    # GateSync: the same mistakes, made in its own inputs
    votes, stages, targets = list(kw["votes"]), list(kw["stages"]), list(kw["targets"])
    if kind == "missing_result":
        return dict(kw, targets=targets[:1])
    if kind in ("gate_none", "gate_name"):
        targets[1] = None if kind == "gate_none" else "G2"
        return dict(kw, targets=targets)
    if kind == "stage_name":
        stages[1] = "TRAINING"
        return dict(kw, stages=stages)
    if kind == "no_passed":
        votes[1] = None
        return dict(kw, votes=votes)
    return _argument_kind(kind, kw)  # NO_GATE is GateSync's own "no gate here"; it has no slot objects


# kind -> the bad rank's message says (per entry point where the wording differs)
KINDS = {
    "missing_result": {"GateSync": "targets must have shape [2], got [1]",
                       "gate_round": "gate_round: got 2 slots but 1 gate results",
                       "sync_gate_decisions": "sync_gate_decisions: got 2 slots but 1 gate results",
                       "sync_gate_decision": "gate_result is None"},
    "gate_none": {"GateSync": "targets must be a tensor or a sequence of ints",
                  None: "gate is None, expected a gate id"},
    "gate_name": {"GateSync": "targets must be a tensor or a sequence of ints",
                  None: "gate is 'G2', expected a gate id"},
    "gate_no_gate": {None: "gate is 63, which is esper_gate.NO_GATE"},
    "stage_name": {"GateSync": "stages must be a tensor or a sequence of ints",
                   None: "stage is 'TRAINING', expected a stage id"},
    "no_passed": {"GateSync": "votes must be a tensor or a sequence of ints",
                  None: "has no passed"},
    "no_slot_id": {None: "has no slot_id"},
    "names_int": {None: "names must be a sequence of 2 slot names, got int 5"},
    "policies_int": {None: "policies must be a sequence of policy names, got int"},
    "digests_name": {None: "digests must be ints in 0..2**32-1"},
}
CASES = [(kind, entry) for kind in KINDS for entry in ENTRY_POINTS if _bad(kind, entry, _good()[entry]) is not None]


def _expected_text(kind: str, entry: str) -> str:
    texts = KINDS[kind]
    return texts.get(entry, texts.get(None))


def _call(entry: str, gs, kw: dict):
    from esper_gate import kasmina

    if entry == "GateSync":
        kw = dict(kw)
        return gs(kw.pop("votes"), kw.pop("stages"), kw.pop("targets"), **kw)
    fn = getattr(kasmina, entry)
    return fn(**kw, timeout=TIMEOUT_S)


def _table_main(rank, world):
    """Rank 1 makes each mistake in turn, at each entry point; rank 0 passes good input."""
    import esper_gate
    from esper_gate import kasmina

    # Every gate the table uses, built up front: construction is collective too, and
    # each case below then costs one call.
    direct = esper_gate.GateSync(2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    gates = {"GateSync": direct, "gate_round": kasmina.cached_gate_sync(2, timeout=TIMEOUT_S),
             "sync_gate_decision": kasmina.cached_gate_sync(1, timeout=TIMEOUT_S)}
    gates["sync_gate_decisions"] = gates["gate_round"]
    out = {}
    for kind, entry in CASES:
        kw = _good()[entry]
        if rank == BAD_RANK:
            kw = _bad(kind, entry, kw)
        try:
            _call(entry, direct, kw)
            res = {"error": None}
        except Exception as e:  # noqa: BLE001 - the outcome is what is tested
            res = {"error": type(e).__name__, "text": str(e), "ranks": getattr(e, "ranks", None)}
        res["calls"] = gates[entry].calls
        out[(kind, entry)] = res
    # Nothing is left behind: every entry point agrees again afterwards.
    after = {}
    for entry in ENTRY_POINTS:
        try:
            r = _call(entry, direct, _good()[entry])
        except Exception as e:  # noqa: BLE001 - reported per entry point, after the table's own cases
            after[entry] = type(e).__name__
            continue
        after[entry] = r.decisions.tolist() if entry == "GateSync" else \
            [o.passed for o in r] if entry == "gate_round" else \
            [x.passed for x in r] if entry == "sync_gate_decisions" else r.passed
    out["after"] = after
    direct.close()
    kasmina.clear_cache()
    return out


@pytest.fixture(scope="module")
def table():
    return values(spawn_ranks(_table_main, 2, timeout=240))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,entry", CASES)
def test_bad_input_is_input_error_here_and_peer_input_error_there_in_the_same_call(table, kind, entry):
    bad, good = table[BAD_RANK][(kind, entry)], table[1 - BAD_RANK][(kind, entry)]
    assert bad["error"] == "GateInputError", bad
    assert _expected_text(kind, entry) in bad["text"], bad["text"]
    # A GatePeerInputError, not a GateTimeoutError: the peer learned it from the call itself.
    assert good["error"] == "GatePeerInputError", good
    assert good["ranks"] == [BAD_RANK] and f"rank {BAD_RANK} passed bad input" in good["text"]
    assert bad["calls"] == good["calls"], "both ranks made the same number of calls on the gate"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_every_entry_point_agrees_after_the_bad_inputs(table):
    for out in table:
        assert out["after"] == {"GateSync": [True, True], "gate_round": [True, True],
                                "sync_gate_decisions": [True, True], "sync_gate_decision": True}


def test_the_table_covers_every_kind_at_every_entry_point_that_takes_it():
    by_entry = {e: [k for k, e2 in CASES if e2 == e] for e in ENTRY_POINTS}
    assert by_entry["gate_round"] == by_entry["sync_gate_decisions"] == list(KINDS)
    assert set(KINDS) - set(by_entry["sync_gate_decision"]) == {"names_int", "policies_int", "digests_name"}
    assert set(KINDS) - set(by_entry["GateSync"]) == {"gate_no_gate", "no_slot_id"}


# ---- in-process: without peers the same input raises at once ----------------------------

@pytest.mark.parametrize("kind,entry", CASES)
def test_without_peers_the_same_input_is_a_gate_input_error(kind, entry):
    import esper_gate

    gs = esper_gate.GateSync(2)  # outside a process group: it decides locally
    with pytest.raises(esper_gate.GateInputError) as info:
        _call(entry, gs, _bad(kind, entry, _good()[entry]))
    assert _expected_text(kind, entry) in str(info.value)


def test_what_a_caller_refused_is_sent_as_its_own_reason_ahead_of_the_rest():
    import torch

    from esper_gate import wire
    from esper_gate._inputs import prepare

    common = dict(num_slots=2, device=torch.device("cpu"), default_site=7, call="call 1")
    p = prepare([1, 1], [3, 3], [2, 2], None, **common, bad_input="gate_results[1].gate is 'G2'", names=5)
    assert p.poison == wire.REASON_INPUT and wire.REASON_CALLER_MIN <= wire.REASON_INPUT <= wire.REASON_MAX
    assert p.problem == ("call 1: gate_results[1].gate is 'G2'; "
                         "names must be a sequence of 2 slot names, got int 5")
    assert p.votes.tolist() == [False, False] and p.targets.tolist() == [0, 0], "zeros stand in for the inputs"
    # the hot path is untouched: tensors the op takes, nothing refused
    votes, ids = torch.ones(2, dtype=torch.bool), torch.tensor([3, 3])
    assert prepare(votes, ids, ids, None, **common).problem is None
