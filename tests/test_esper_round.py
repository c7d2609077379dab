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

def _loop_main(rank: int, world: int, num_slots: int, epochs: int, prune_at: int, seed: int,
               drift_at: int = 0):
    from esper_gate import kasmina

    log = RoundLog()

    def decide(slots, when):
        esper_like.run_gate_round(slots, log, names=[f"env0/{s.slot_id}" for s in slots],
                                  policy="unanimous", timeout=TIMEOUT_S)

    try:
        slots, pruned, drifted = esper_like.run_esper_like(
            num_slots, epochs, seed=seed, rank=rank, lone_pruner=world - 1 if prune_at else -1,
            prune_at=prune_at, decide=decide, drifter=0 if drift_at else -1, drift_at=drift_at)
    finally:
        kasmina.clear_cache()
    return {"calls": log.calls, "diverged": log.diverged, "transitioned": log.transitioned,
            "pruned": pruned, "reports": log.reports, "drifted": drifted, "digest_diverged": log.digest_diverged,
            "alpha_steps": [None if s.state is None else s.state.alpha_steps for s in slots],
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


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_alpha_step_drift_is_a_digest_divergence_seen_by_every_rank_and_nothing_moves():
    """Rank 0's alpha controller steps once more on one slot: same stage everywhere, so only
    the state digest tells; both ranks learn it every round after, and the slot never moves."""
    epochs, drift_at = 14, 6
    r0, r1 = values(spawn_ranks(_loop_main, 2, 6, epochs, 0, 5, drift_at, timeout=120))
    drifted = r0["drifted"]
    assert drifted >= 0 and r1["drifted"] == drifted
    assert r0["alpha_steps"][drifted] == r1["alpha_steps"][drifted] + 1
    first = 2 * (drift_at - 1)                     # the epoch round right after the drift
    for r in (r0, r1):
        assert r["calls"] == 2 * epochs
        assert all(not d for d in r["diverged"][:first])
        # from the drift on: this slot, and only it, diverges in every round, on every rank, by digest
        assert all(d == [drifted] for d in r["diverged"][first:]), r["diverged"]
        assert all(d == [drifted] for d in r["digest_diverged"][first:]), r["digest_diverged"]
        assert not any(drifted in t for t in r["transitioned"][first:])
    assert r0["stages"] == r1["stages"]            # no stage differs: the digest alone caught it
    report = r1["reports"][0]
    name = f"env0/r{drifted // 4}c{drifted % 4}"
    assert name in report and "digest" in report and "rank 0" in report and "rank 1" in report, report


def test_decide_round_passes_names_policies_and_digests_to_gate_round(monkeypatch):
    """The real gate_round (a world of one: each local result stands), with a policy per slot
    (HOLDING: unanimous) and a digest per slot (None for an empty slot)."""
    from esper_gate import kasmina, state_digest

    seen = []
    real = kasmina.gate_round

    def spy(slots, gate_results, **kw):
        seen.append(kw)
        return real(slots, gate_results, **kw)

    monkeypatch.setattr(kasmina, "gate_round", spy)
    queued, holding, empty = slot_at(SeedStage.TRAINING), slot_at(SeedStage.HOLDING), EsperLikeSlot(
        "r0c2", seed=0, rank=0)
    queued.request_advance()
    monkeypatch.setattr(queued, "pending_gate_check", lambda: esper_like.GateResult(GateLevel.G2, passed=True))
    log = RoundLog()
    decided = esper_like.run_gate_round([queued, holding, empty], log, names=["a", "b", "c"], policy="rank0",
                                        timeout=2.0)
    [kw] = seen
    assert kw["names"] == ["a", "b", "c"] and kw["policy"] == "rank0" and kw["timeout"] == 2.0
    assert kw["policies"] == ["rank0", "unanimous", "rank0"]
    assert kw["digests"] == [state_digest(0, esper_like.ALPHA_HOLD, "seed_0", "conv_light")] * 2 + [None]
    assert decided[0].passed is True and decided[1] is None and decided[2] is None
    assert queued.state.stage == SeedStage.BLENDING and log.diverged == [[]]


def test_digest_follows_alpha_step_mode_seed_and_blueprint():
    s = slot_at(SeedStage.TRAINING)
    base = esper_like.slot_digest(s)
    assert esper_like.slot_digest(EsperLikeSlot("r0c0", seed=0, rank=0)) is None
    for change in (lambda st: setattr(st, "alpha_steps", 1), lambda st: setattr(st, "alpha_mode", esper_like.ALPHA_UP),
                   lambda st: setattr(st, "seed_id", "seed_9"), lambda st: setattr(st, "blueprint_id", "attn")):
        t = slot_at(SeedStage.TRAINING)
        change(t.state)
        assert esper_like.slot_digest(t) != base
    s._move(SeedStage.BLENDING)
    assert s.state.alpha_mode == esper_like.ALPHA_UP
