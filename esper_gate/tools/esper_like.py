"""A training loop shaped like Esper's, for the demo and the tests.

It has what makes a per-gate sync unsafe in Esper (esper-lite 2016337e):
``step_epoch`` runs per slot and returns early (no seed; a dwell not yet
served; alpha not yet at its target, slot.py:2424-2466), so how many gate
checks a rank makes depends on its own slots; and a rank can prune a seed on
its own. It does what the integration patch makes Esper do
(integrations/esper/): ``step_epoch(defer_gates=True)`` queues the gate it
would advance, explicit FOSSILIZE actions queue theirs with
``request_advance``, and ``run_gate_round`` decides every slot of the model in
one call that every rank makes twice per epoch (after the ticks, after the
actions), whatever its slots hold.

``old_gate_decision`` is Esper's HEAD for comparison: one rank-0
``broadcast_object_list`` of a dict per gate check (slot.py:2333-2398).

Nothing here imports Esper; stage and gate ids come from ``esper_gate.esper``.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..esper import GateLevel, SeedStage

GATE_OF_TARGET = {SeedStage.TRAINING: GateLevel.G1, SeedStage.BLENDING: GateLevel.G2,
                  SeedStage.HOLDING: GateLevel.G3, SeedStage.FOSSILIZED: GateLevel.G5}
NEXT_STAGE = {SeedStage.GERMINATED: SeedStage.TRAINING, SeedStage.TRAINING: SeedStage.BLENDING,
              SeedStage.BLENDING: SeedStage.HOLDING, SeedStage.HOLDING: SeedStage.FOSSILIZED}
ACTIVE_STAGES = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING,
                 SeedStage.FOSSILIZED)
PRUNABLE_STAGES = (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING)
MIN_TRAINING_EPOCHS = 2      # G2 is queued once the seed has trained this long
BLEND_EPOCHS = 3             # alpha ticks 0 -> 1 in this many epochs, then G3 is queued
EMBARGO_EPOCHS = 3
PASS_THRESHOLD = {GateLevel.G1: 0.2, GateLevel.G2: 0.45, GateLevel.G3: 0.45, GateLevel.G5: 0.5}
VOTE_NOISE = 0.06            # per-rank noise on the shared gate quality: near the threshold, ranks split


@dataclass
class GateResult:
    """Esper's GateResult fields (leyline/schemas.py)."""
    gate: int
    passed: bool
    score: float = 0.0
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    message: str = ""
    timestamp: float = 0.0


ALPHA_HOLD, ALPHA_UP = 0, 1   # Esper's AlphaMode.HOLD and .UP (leyline/alpha.py)


@dataclass
class SeedState:
    seed_id: str
    stage: int = SeedStage.GERMINATED
    epochs_in_stage: int = 0
    alpha: float = 0.0
    alpha_steps: int = 0              # the alpha controller's alpha_steps_done
    alpha_mode: int = ALPHA_HOLD      # UP while blending
    blueprint_id: str = "conv_light"


class EsperLikeSlot:
    """A SeedSlot reduced to its lifecycle: the hooks the patch adds, with Esper's early returns."""

    def __init__(self, slot_id: str, *, seed: int, rank: int):
        self.slot_id = slot_id
        self.state: SeedState | None = None
        self._pending: int | None = None
        self._seed, self._rank = seed, rank
        self.epoch = 0  # set by the loop: the gate votes' shared quality depends on it

    @property
    def is_active(self) -> bool:
        return self.state is not None and self.state.stage in ACTIVE_STAGES

    # ---- the lifecycle ---------------------------------------------------------------
    def germinate(self, seed_id: str) -> None:
        self.state = SeedState(seed_id)

    def prune(self) -> None:
        if self.state is not None and self.state.stage in PRUNABLE_STAGES:
            self._move(SeedStage.PRUNED)

    def _move(self, stage: int) -> None:
        assert self.state is not None
        self.state.stage, self.state.epochs_in_stage = stage, 0
        self.state.alpha_mode = ALPHA_UP if stage == SeedStage.BLENDING else ALPHA_HOLD

    def digest_values(self) -> tuple | None:
        """What must be equal across ranks beyond the stage (the Esper patch's
        ``slot_digest_values``): alpha step, alpha mode, seed id, blueprint id; None
        for an empty slot, which goes on the wire as digest 0."""
        if self.state is None:
            return None
        st = self.state
        return (st.alpha_steps, st.alpha_mode, st.seed_id, st.blueprint_id)

    def step_epoch(self, *, defer_gates: bool = True) -> None:
        """Esper's tick: early returns, cooldowns, and a queued gate (never a sync)."""
        if not defer_gates:
            raise ValueError("EsperLikeSlot only queues its gates: call step_epoch(defer_gates=True)")
        self._pending = None
        if self.state is None:
            return
        st = self.state
        st.epochs_in_stage += 1
        if st.stage == SeedStage.GERMINATED:
            self._pending = SeedStage.TRAINING
            return
        if st.stage == SeedStage.TRAINING:
            if st.epochs_in_stage >= MIN_TRAINING_EPOCHS:
                self._pending = SeedStage.BLENDING
            return
        if st.stage == SeedStage.BLENDING:
            st.alpha = min(1.0, st.alpha + 1.0 / BLEND_EPOCHS)   # the alpha tick comes first,
            st.alpha_steps += 1
            if st.alpha >= 1.0:                                   # then G3 sees it
                self._pending = SeedStage.HOLDING
            return
        if st.stage in (SeedStage.HOLDING, SeedStage.FOSSILIZED):
            return
        if st.stage == SeedStage.PRUNED:
            self._move(SeedStage.EMBARGOED)
        elif st.stage == SeedStage.EMBARGOED and st.epochs_in_stage >= EMBARGO_EPOCHS:
            self._move(SeedStage.RESETTING)
        elif st.stage == SeedStage.RESETTING:
            self.state = None

    def request_advance(self, target_stage: int | None = None) -> GateResult | None:
        if not self.is_active:
            return GateResult(gate=GateLevel.G0, passed=False, checks_failed=["no_active_seed"])
        target = NEXT_STAGE.get(self.state.stage) if target_stage is None else target_stage
        if target is None:
            return GateResult(gate=GateLevel.G0, passed=False, checks_failed=["no_valid_transition"])
        self._pending = target
        return None

    @property
    def pending_gate_target(self) -> int | None:
        return self._pending

    def pending_gate_check(self) -> GateResult | None:
        """The local gate: a quality shared by every rank seen through this rank's noise."""
        if self._pending is None or not self.is_active:
            self._pending = None
            return None
        gate = GATE_OF_TARGET[self._pending]
        where = f"{self._seed}:{self.epoch}:{self.slot_id}:{gate}"
        quality = random.Random(where).random()
        score = quality + random.Random(f"{where}:rank{self._rank}").uniform(-VOTE_NOISE, VOTE_NOISE)
        passed = score >= PASS_THRESHOLD[gate]
        return GateResult(gate=gate, passed=passed, score=score,
                          checks_passed=["quality"] if passed else [],
                          checks_failed=[] if passed else ["quality_below_threshold"], message="local")

    def apply_gate_decision(self, result: GateResult) -> GateResult:
        target, self._pending = self._pending, None
        if target is None:
            raise RuntimeError(f"apply_gate_decision on slot {self.slot_id} with no queued gate")
        if result.passed:
            self._move(target)
        return result


# ---- the rounds ------------------------------------------------------------------------

DIVERGENCE_CHECK = "ddp_divergence"


@dataclass
class RoundLog:
    """What this rank saw of the rounds: calls, and per call the slots that diverged or moved."""
    calls: int = 0
    diverged: list[list[int]] = field(default_factory=list)      # per call: slot indices
    transitioned: list[list[int]] = field(default_factory=list)  # per call: slot indices
    vetoed: list[list[int]] = field(default_factory=list)        # per call: passed here, agreed no
    digest_diverged: list[list[int]] = field(default_factory=list)  # per call: slots whose digests differ
    reports: list[str] = field(default_factory=list)             # per call with a divergence: its note
    last_notes: list = field(default_factory=list)               # the last call's notes, per slot (None: agreed)


FOSSILIZE_POLICY = "unanimous"   # G5 is irreversible: unanimous whatever the configured policy


def slot_policy(slot: EsperLikeSlot, default: str) -> str:
    """The slot's policy in the round, chosen from its stage (equal on ranks in step, so the
    policy never makes a slot diverge on its own): HOLDING, whose gate is G5, FOSSILIZE_POLICY."""
    if slot.state is not None and slot.state.stage == SeedStage.HOLDING:
        return FOSSILIZE_POLICY
    return default


def slot_digest(slot: EsperLikeSlot) -> int | None:
    """``esper_gate.state_digest`` of the slot's digest values; None (0 on the wire) when empty."""
    from .. import state_digest

    values = slot.digest_values()
    return None if values is None else state_digest(*values)


def decide_round(slots: Sequence[EsperLikeSlot], checks: list, *, names: Sequence[str], policy: str,
                 timeout: float | None) -> tuple[list, list[str | None]]:
    """The adapter the Esper patch has: ``esper_gate.kasmina.gate_round`` with env-qualified
    names, a policy and a state digest per slot.

    Returns (decided gate results, per slot: its divergence note as this rank learns it, or
    None). Every rank learns every slot's divergence, also where it had no gate.
    """
    from .. import kasmina

    outcomes = kasmina.gate_round(slots, checks, policy=policy, names=list(names), timeout=timeout,
                                  policies=[slot_policy(s, policy) for s in slots],
                                  digests=[slot_digest(s) for s in slots])
    decided = [None if o.gate_result is None else dataclasses.replace(o.gate_result, passed=o.passed)
               for o in outcomes]
    return decided, [(o.note or "diverged") if o.diverged else None for o in outcomes]


def run_gate_round(slots: Sequence[EsperLikeSlot], log: RoundLog, *, names: Sequence[str], policy: str,
                   timeout: float | None = None) -> list:
    """One round for the model: check queued gates, decide all slots at once, apply."""
    checks = [s.pending_gate_check() for s in slots]
    decided, notes = decide_round(slots, checks, names=names, policy=policy, timeout=timeout)
    moved = []
    for i, (slot, result) in enumerate(zip(slots, decided)):
        if result is None:
            continue
        stage = slot.state.stage
        slot.apply_gate_decision(result)
        if slot.state is not None and slot.state.stage != stage:
            moved.append(i)
    diverged = [note is not None for note in notes]
    log.calls += 1
    log.diverged.append([i for i, d in enumerate(diverged) if d])
    log.digest_diverged.append([i for i, note in enumerate(notes) if note is not None and "digest" in note])
    log.vetoed.append([i for i, (c, r) in enumerate(zip(checks, decided))
                       if c is not None and r is not None and c.passed and not r.passed and not diverged[i]])
    log.transitioned.append(moved)
    log.last_notes = list(notes)
    first = next((note for note in notes if note is not None), None)
    if first:
        log.reports.append(first)
    return decided


def old_gate_decision(slot: EsperLikeSlot, result: GateResult, group) -> tuple[GateResult, str]:
    """Esper HEAD's ``_sync_gate_decision``: rank 0's result, broadcast as a pickled dict.

    The dict also carries rank 0's slot id, which HEAD does not send, so the
    demo can show whose decision a rank adopted. Returns (adopted, rank 0's slot id).
    """
    import torch.distributed as dist

    payload = [{"gate": int(result.gate), "passed": result.passed, "slot": slot.slot_id}
               if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    got = payload[0]
    return dataclasses.replace(result, gate=got["gate"], passed=got["passed"]), got["slot"]


# ---- the loop ----------------------------------------------------------------------------

class Operator:
    """Tamiyo's stand-in: one action per epoch, decided from a seed shared by every rank.

    Germinate into the first empty slot, fossilize a HOLDING seed, or prune.
    A slot is germinated once, so a slot that a rank pruned on its own stays
    out of step (as in Esper until a restore) without spreading to others.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.germinated: set[int] = set()
        self.out_of_step: set[int] = set()

    def leave_alone(self, slot: int) -> None:
        """Act no more on a slot the ranks hold differently (Esper would restore it from a checkpoint)."""
        if slot >= 0:
            self.out_of_step.add(slot)

    def act(self, epoch: int, slots: Sequence[EsperLikeSlot]) -> tuple[str, int]:
        roll = random.Random(f"{self.seed}:op:{epoch}").random()
        mine = [(i, s) for i, s in enumerate(slots) if i not in self.out_of_step]
        empty = [i for i, s in mine if s.state is None and i not in self.germinated]
        holding = [i for i, s in mine if s.state is not None and s.state.stage == SeedStage.HOLDING]
        prunable = [i for i, s in mine if s.state is not None and s.state.stage in PRUNABLE_STAGES]
        if holding and roll < 0.6:
            slots[holding[0]].request_advance(SeedStage.FOSSILIZED)
            return "FOSSILIZE", holding[0]
        if empty and roll < 0.9:
            self.germinated.add(empty[0])
            slots[empty[0]].germinate(f"seed_{empty[0]}")
            return "GERMINATE", empty[0]
        if prunable and roll >= 0.97:
            slots[prunable[-1]].prune()
            return "PRUNE", prunable[-1]
        return "WAIT", -1


def lone_prune_slot(slots: Sequence[EsperLikeSlot]) -> int:
    """The slot a rank prunes on its own, else -1: the first TRAINING seed (the other ranks
    keep checking its G2 every epoch), else the first BLENDING or HOLDING one."""
    for stages in ((SeedStage.TRAINING,), PRUNABLE_STAGES):
        for i, s in enumerate(slots):
            if s.state is not None and s.state.stage in stages:
                return i
    return -1


def drift_slot(slots: Sequence[EsperLikeSlot], skip: int = -1) -> int:
    """The slot whose alpha step drifts on one rank, else -1: the first BLENDING seed (its alpha
    is moving), else the first other active seed before FOSSILIZED; never ``skip``."""
    for stages in ((SeedStage.BLENDING,), (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.HOLDING)):
        for i, s in enumerate(slots):
            if i != skip and s.state is not None and s.state.stage in stages:
                return i
    return -1


def run_esper_like(num_slots: int, epochs: int, *, seed: int, rank: int, lone_pruner: int, prune_at: int,
                   decide: Callable[[list[EsperLikeSlot], str], None],
                   on_epoch: Callable[[int], None] | None = None, drifter: int = -1,
                   drift_at: int = 0) -> tuple[list[EsperLikeSlot], int, int]:
    """Esper's epoch, rounds included: tick every slot, round, act, round.

    ``decide(slots, when)`` is the round (``when``: "epoch" or "action").
    At ``prune_at`` rank ``lone_pruner`` prunes a seed on its own instead of
    acting. At ``drift_at``, after the ticks, rank ``drifter``'s alpha
    controller takes one extra step on one slot (``drift_slot``): same stage,
    different state digest. Returns the slots, the slot pruned alone and the
    slot that drifted (-1: none).
    """
    slots = [EsperLikeSlot(f"r{i // 4}c{i % 4}", seed=seed, rank=rank) for i in range(num_slots)]
    operator = Operator(seed)
    pruned_alone = drifted = -1
    for epoch in range(1, epochs + 1):
        for s in slots:
            s.epoch = epoch
            s.step_epoch(defer_gates=True)
        if epoch == drift_at:
            # every rank picks the same slot; one steps its alpha once more, inside the stage
            drifted = drift_slot(slots, skip=pruned_alone)
            if rank == drifter and drifted >= 0:
                slots[drifted].state.alpha_steps += 1
            operator.leave_alone(drifted)
        decide(slots, "epoch")
        if epoch == prune_at:
            # every rank picks the same slot (their states agree until now); one prunes it, the rest wait
            pruned_alone = lone_prune_slot(slots)
            if rank == lone_pruner and pruned_alone >= 0:
                slots[pruned_alone].prune()
            operator.leave_alone(pruned_alone)
        else:
            operator.act(epoch, slots)
        decide(slots, "action")
        if on_epoch is not None:
            on_epoch(epoch)
    return slots, pruned_alone, drifted
