"""The epoch round in a loop shaped like Esper's (esper_gate/tools/esper_like.py).

Per-slot ``step_epoch`` with local early returns, explicit actions, and a rank
that prunes a seed on its own: every rank makes the same number of round
calls, the divergence is reported on the pruned slot only, and no transition
is ever applied to a slot in a call where it diverged.
"""
from __future__ import annotations

import pytest

from esper_gate._spawn import spawn_ranks, values
from esper_gate.esper import GateLevel, SeedStage
from esper_gate.tools import esper_like
from esper_gate.tools.esper_like import EsperLikeSlot, RoundLog

TIMEOUT_S = 5.0


# ---- in this process ------------------------------------------------------------------------

def slot_at(stage, *, epochs_in_stage=0, alpha=0.0) -> EsperLikeSlot:
    s = EsperLikeSlot("r0c0", seed=0, rank=0)
    if stage is not None:
        s.germinate("seed_0")
        s.state.stage, s.state.epochs_in_stage, s.state.alpha = stage, epochs_in_stage, alpha
    return s


def test_step_epoch_returns_early_as_esper_does():
    empty = slot_at(None)
    empty.step_epoch()
    assert empty.pending_gate_target is None                       # no seed: nothing
    fresh = slot_at(SeedStage.TRAINING)
    fresh.step_epoch()
    assert fresh.pending_gate_target is None                       # dwell not served yet
    fresh.step_epoch()
    assert fresh.pending_gate_target == SeedStage.BLENDING
    holding = slot_at(SeedStage.HOLDING)
    holding.step_epoch()
    assert holding.pending_gate_target is None                     # FOSSILIZE is explicit


def test_g3_is_queued_by_the_tick_that_completes_alpha():
    s = slot_at(SeedStage.BLENDING, alpha=1.0 - 1.0 / esper_like.BLEND_EPOCHS)
    s.step_epoch()
    assert s.state.alpha == pytest.approx(1.0)
    assert s.pending_gate_target == SeedStage.HOLDING
    assert s.pending_gate_check().gate == GateLevel.G3


def test_cooldown_runs_without_gates_and_empties_the_slot():
    s = slot_at(SeedStage.TRAINING)
    s.prune()
    seen = []
    for _ in range(esper_like.EMBARGO_EPOCHS + 3):
        s.step_epoch()
        assert s.pending_gate_target is None
        seen.append(None if s.state is None else s.state.stage)
    assert seen[0] == SeedStage.EMBARGOED and SeedStage.RESETTING in seen and seen[-1] is None


def test_request_advance_ends_early_without_a_seed():
    early = slot_at(None).request_advance()
    assert early is not None and early.checks_failed == ["no_active_seed"]
    s = slot_at(SeedStage.HOLDING)
    assert s.request_advance(SeedStage.FOSSILIZED) is None
    assert s.pending_gate_check().gate == GateLevel.G5


def test_bad_calls_name_the_slot_and_what_was_expected():
    with pytest.raises(ValueError, match="step_epoch\\(defer_gates=True\\)"):
        slot_at(SeedStage.TRAINING).step_epoch(defer_gates=False)
    with pytest.raises(RuntimeError, match="r0c0 with no queued gate"):
        slot_at(SeedStage.TRAINING).apply_gate_decision(esper_like.GateResult(GateLevel.G2, passed=True))


def test_loop_without_a_process_group_visits_every_stage_in_two_rounds_per_epoch():
    """World of one: sync_gate_decisions returns the local results, which apply."""
    log = RoundLog()
    seen = set()

    def decide(slots, when):
        esper_like.run_gate_round(slots, log, names=[s.slot_id for s in slots], policy="unanimous")
        seen.update(s.state.stage for s in slots if s.state is not None)

    epochs = 40
    esper_like.run_esper_like(6, epochs, seed=3, rank=0, lone_pruner=-1, prune_at=0, decide=decide)
    assert log.calls == 2 * epochs
    assert not any(log.diverged)
    assert {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING,
            SeedStage.FOSSILIZED} <= seen


# ---- real ranks -------------------------------------------------------------------------------

def _loop_main(rank: int, world: int, num_slots: int, epochs: int, prune_at: int, seed: int):
    from esper_gate import kasmina

    log = RoundLog()

    def decide(slots, when):
        esper_like.run_gate_round(slots, log, names=[f"env0/{s.slot_id}" for s in slots],
                                  policy="unanimous", timeout=TIMEOUT_S)

    try:
        slots, pruned = esper_like.run_esper_like(num_slots, epochs, seed=seed, rank=rank,
                                                  lone_pruner=world - 1, prune_at=prune_at, decide=decide)
    finally:
        kasmina.clear_cache()
    return {"calls": log.calls, "diverged": log.diverged, "transitioned": log.transitioned,
            "pruned": pruned, "reports": log.reports,
            "stages": [None if s.state is None else int(s.state.stage) for s in slots]}


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_lone_prune_diverges_one_slot_and_every_rank_makes_the_same_calls(world):
    num_slots, epochs, prune_at = 6, 14, 6
    results = values(spawn_ranks(_loop_main, world, num_slots, epochs, prune_at, 5, timeout=120))

    calls = [r["calls"] for r in results]
    assert calls == [2 * epochs] * world, calls
    pruned = results[0]["pruned"]
    assert pruned >= 0 and all(r["pruned"] == pruned for r in results)

    # what any rank learned diverged, per call; and what any rank transitioned
    diverged_any = [set().union(*(set(r["diverged"][c]) for r in results)) for c in range(2 * epochs)]
    assert set().union(*diverged_any) == {pruned}, diverged_any
    assert all(not d for d in diverged_any[:2 * (prune_at - 1) + 1]), "nothing diverges before the prune"
    applied = sum(1 for c, d in enumerate(diverged_any) for r in results for i in r["transitioned"][c] if i in d)
    assert applied == 0

    # the other slots stay in step and keep moving; the pruned one differs
    for i in range(num_slots):
        stages = {r["stages"][i] for r in results}
        assert (len(stages) > 1) == (i == pruned), (i, stages)
    moved_after = sum(len(r["transitioned"][c]) for r in results for c in range(2 * prune_at, 2 * epochs))
    assert moved_after > 0
    report = next(text for text in results[0]["reports"])
    assert f"r{pruned // 4}c{pruned % 4}" in report and f"rank {world - 1}" in report


def test_decide_round_uses_gate_round_when_esper_gate_has_it(monkeypatch):
    """Every rank learns every slot's outcome from gate_round, also where it had no gate."""
    import dataclasses

    from esper_gate import kasmina

    @dataclasses.dataclass(frozen=True)
    class Outcome:  # RoundOutcome's fields
        name: str
        gate: int | None
        passed: bool
        diverged: bool
        note: str | None
        gate_result: object

    seen = []

    def fake_gate_round(slots, gate_results, *, policy, names, timeout):
        seen.append((policy, names, timeout))
        return [Outcome(n, None, False, i == 1, "slot diverged" if i == 1 else None, r)
                for i, (n, r) in enumerate(zip(names, gate_results))]

    monkeypatch.setattr(kasmina, "gate_round", fake_gate_round, raising=False)
    queued, empty = slot_at(SeedStage.TRAINING), EsperLikeSlot("r0c1", seed=0, rank=0)
    queued.request_advance()
    monkeypatch.setattr(queued, "pending_gate_check", lambda: esper_like.GateResult(GateLevel.G2, passed=True))
    log = RoundLog()
    decided = esper_like.run_gate_round([queued, empty], log, names=["a", "b"], policy="majority", timeout=2.0)
    assert seen == [("majority", ["a", "b"], 2.0)]
    assert decided[0].passed is False and decided[1] is None     # the outcome's passed wins
    assert log.diverged == [[1]] and log.reports == ["slot diverged"]  # learned without a gate there
    assert queued.state.stage == SeedStage.TRAINING
