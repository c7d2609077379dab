"""``python -m esper_gate demo``: the problem and the fix, on real ranks.

Every rank runs Esper-like seed lifecycles in every slot (germinate, train,
blend, hold, fossilize; prunes cool down through EMBARGOED and RESETTING)
with its own noisy gate votes. Once per epoch one esper_gate sync decides all
slots and only agreed transitions are applied. At ``--diverge-at`` one rank
prunes a seed on its own, out of step with the others: the sync reports it
and no rank transitions that slot. ``--show-hang`` first runs the old
per-slot ``all_reduce`` design on the same scenario under a short timeout.

Ranks are spawned here (gloo on CPU by default) or, under ``torchrun``, are
the launched ones. Every wait is bounded and every spawned process is reaped.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from .._spawn import spawn_ranks
from ..esper import VOCABULARY, GateLevel, SeedStage
from ..report import ranks_text

# stage -> (gate checked there, stage it leads to)
GATE_OF_STAGE = {
    SeedStage.DORMANT: (GateLevel.G0, SeedStage.GERMINATED),
    SeedStage.GERMINATED: (GateLevel.G1, SeedStage.TRAINING),
    SeedStage.TRAINING: (GateLevel.G2, SeedStage.BLENDING),
    SeedStage.BLENDING: (GateLevel.G3, SeedStage.HOLDING),
    SeedStage.HOLDING: (GateLevel.G5, SeedStage.FOSSILIZED),
}
ACTIVE_SEED_STAGES = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING)
PRUNABLE_STAGES = (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING)
# A gate fails until the seed has spent this many epochs in its stage.
MIN_EPOCHS_IN_STAGE = {SeedStage.DORMANT: 1, SeedStage.GERMINATED: 1, SeedStage.TRAINING: 4,
                       SeedStage.BLENDING: 3, SeedStage.HOLDING: 3}
# The shared quality must clear this (germination is easy, promotion is not).
PASS_THRESHOLD = {SeedStage.DORMANT: 0.3, SeedStage.GERMINATED: 0.4, SeedStage.TRAINING: 0.6,
                  SeedStage.BLENDING: 0.6, SeedStage.HOLDING: 0.6}
# Each rank sees the shared quality through its own noise: ranks near the
# threshold disagree, which is what a veto is.
VOTE_NOISE = 0.06
PRUNE_PROBABILITY = 0.04
EMBARGO_EPOCHS = 3

# The old design's "training step" between gate rounds: a gradient all_reduce.
GRADIENT_NUMEL = 1024


# ---- the seed lifecycle simulation (identical code on every rank) ------------------------

@dataclass
class SlotState:
    stage: int = SeedStage.DORMANT
    epochs_in_stage: int = 0


@dataclass
class GateCheck:
    target: int
    vote: bool


class Lifecycles:
    """Seed lifecycles in ``num_slots`` slots as one rank sees them.

    Prunes and cooldowns come from a seed shared by all ranks (per epoch and
    slot), so they happen in lockstep; only the gate votes carry per-rank
    noise, and only a synced gate decision moves a seed forward.
    """

    def __init__(self, num_slots: int, seed: int, rank: int):
        self.slots = [SlotState() for _ in range(num_slots)]
        self.seed = seed
        self.rank = rank
        self.prunes = 0

    def begin_epoch(self, epoch: int) -> list[GateCheck | None]:
        """Apply this epoch's shared events; return each slot's gate check (None: no gate)."""
        checks: list[GateCheck | None] = []
        for i, slot in enumerate(self.slots):
            shared = random.Random(f"{self.seed}:{epoch}:{i}")
            quality, prune_roll = shared.random(), shared.random()
            slot.epochs_in_stage += 1
            if slot.stage == SeedStage.PRUNED:
                self._move(slot, SeedStage.EMBARGOED)
            elif slot.stage == SeedStage.EMBARGOED and slot.epochs_in_stage > EMBARGO_EPOCHS:
                self._move(slot, SeedStage.RESETTING)
            elif slot.stage == SeedStage.RESETTING:
                self._move(slot, SeedStage.DORMANT)
            elif slot.stage in PRUNABLE_STAGES and prune_roll < PRUNE_PROBABILITY:
                self._move(slot, SeedStage.PRUNED)
                self.prunes += 1
            if slot.stage not in GATE_OF_STAGE:
                checks.append(None)
                continue
            noise = random.Random(f"{self.seed}:{epoch}:{i}:rank{self.rank}").uniform(-VOTE_NOISE, VOTE_NOISE)
            ready = slot.epochs_in_stage >= MIN_EPOCHS_IN_STAGE[slot.stage]
            vote = ready and quality + noise >= PASS_THRESHOLD[slot.stage]
            checks.append(GateCheck(GATE_OF_STAGE[slot.stage][0], vote))
        return checks

    @staticmethod
    def _move(slot: SlotState, stage: int) -> None:
        slot.stage, slot.epochs_in_stage = stage, 0

    def prune_alone(self, i: int) -> SlotState:
        """This rank prunes slot ``i`` on its own; returns the state to roll back to."""
        before = SlotState(self.slots[i].stage, self.slots[i].epochs_in_stage)
        self._move(self.slots[i], SeedStage.PRUNED)
        return before

    def pass_gate(self, i: int) -> None:
        self._move(self.slots[i], GATE_OF_STAGE[self.slots[i].stage][1])

    def stages(self) -> list[int]:
        return [s.stage for s in self.slots]

    def divergence_slot(self) -> int:
        """The slot a rank will prune on its own: the first with an active seed."""
        for stages in (ACTIVE_SEED_STAGES, tuple(GATE_OF_STAGE)):
            for i, slot in enumerate(self.slots):
                if slot.stage in stages:
                    return i
        return 0


def slot_names(num_slots: int) -> list[str]:
    """Esper-style slot ids: rows of four."""
    return [f"r{i // 4}c{i % 4}" for i in range(num_slots)]


def _sync_inputs(checks: Sequence[GateCheck | None]) -> tuple[list[bool], list[int]]:
    # slots without a gate check take part with vote 0 and target 0, so a
    # rank whose slot is elsewhere in its lifecycle shows up as a divergence
    return ([bool(c is not None and c.vote) for c in checks], [c.target if c is not None else 0 for c in checks])


# ---- output --------------------------------------------------------------------------------

class Console:
    """Rank 0 prints; the other ranks stay quiet."""

    def __init__(self, rank: int):
        self.enabled = rank == 0
        self._bar_open = False

    def print(self, text: str = "") -> None:
        if not self.enabled:
            return
        if self._bar_open:
            sys.stdout.write("\n")
            self._bar_open = False
        print(text, flush=True)

    def bar(self, done: int, total: int, width: int = 30) -> None:
        """An epoch progress bar: redrawn in place on a terminal, a few lines in a log."""
        if not self.enabled:
            return
        filled = width * done // total
        line = f"  epochs [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if sys.stdout.isatty():
            sys.stdout.write("\r" + line)
            self._bar_open = True
            if done == total:
                sys.stdout.write("\n")
                self._bar_open = False
            sys.stdout.flush()
        elif done in {max(1, total * k // 4) for k in range(1, 5)}:
            print(line, flush=True)


# ---- one rank --------------------------------------------------------------------------------

@dataclass
class Settings:
    world: int
    slots: int
    epochs: int
    policy: str
    backend: str
    diverge_at: int          # 0: no divergence
    seed: int
    timeout: float
    show_hang: bool
    hang_timeout: float
    launched: str            # how the ranks came to be, for the header


def _device(backend: str):
    import torch

    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_rank(cfg: Settings) -> dict:
    """The demo on this rank (the process group is initialized). Returns the summary."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Console(rank)
    names = slot_names(cfg.slots)
    out.print(f"esper_gate demo: {world} ranks ({cfg.launched}), {cfg.slots} slots, {cfg.epochs} epochs, "
              f"policy {cfg.policy}, seed {cfg.seed}")
    out.print("  every rank runs seed lifecycles in every slot with its own noisy gate votes;")
    out.print("  once per epoch one esper_gate sync decides all slots, and only agreed transitions apply")
    if cfg.diverge_at:
        out.print(f"  at epoch {cfg.diverge_at}, rank {world - 1} prunes one seed on its own, out of step "
                  f"with the other ranks")
    old = None
    if cfg.show_hang:
        out.print()
        old = run_old_design(cfg, out)
        out.print()
        out.print(f"the same scenario with esper_gate (one sync per epoch for all {cfg.slots} slots):")
    summary = run_esper_gate(cfg, out, names)
    summary["old_design"] = old
    return summary


def run_old_design(cfg: Settings, out: Console) -> dict:
    """The per-slot design Esper uses today: per slot, all_reduce(MIN) of one int and .item().

    It runs on its own gloo groups with a short timeout, so the hang it walks
    into ends after ``hang_timeout`` seconds instead of never. The gradient
    all_reduce of the next training step runs on a group of its own: on the
    gate's group the mis-paired sizes would abort gloo instead of hanging.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    names = slot_names(cfg.slots)
    limit = datetime.timedelta(seconds=cfg.hang_timeout)
    # the short timeout also bounds building these groups: start them together
    dist.barrier()
    gate_group = dist.new_group(backend="gloo", timeout=limit)
    grad_group = dist.new_group(backend="gloo", timeout=limit)
    out.print(f"--show-hang: the old per-slot design (one all_reduce(MIN) of one int and one .item() per "
              f"slot per gate check), same scenario, {cfg.hang_timeout:g} s timeout")
    life = Lifecycles(cfg.slots, cfg.seed, rank)
    stuck_in, stuck_slot, waited, called, forced = 0, -1, 0.0, [], -1
    collectives = 0
    for epoch in range(1, cfg.diverge_at + 1):
        checks = life.begin_epoch(epoch)
        if epoch == cfg.diverge_at:
            forced = life.divergence_slot()
            if rank == world - 1:
                life.prune_alone(forced)
                checks[forced] = None  # no active seed here any more: no gate check
        called = []
        decisions = {}
        started = time.monotonic()
        try:
            for i, check in enumerate(checks):
                if check is None:
                    continue
                stuck_in, stuck_slot, started = 1, i, time.monotonic()
                vote = torch.tensor([int(check.vote)])
                dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=gate_group)
                decisions[i] = bool(vote.item())
                called.append(i)
                collectives += 1
            stuck_in, stuck_slot, started = 2, -1, time.monotonic()
            dist.all_reduce(torch.zeros(GRADIENT_NUMEL), group=grad_group)
            stuck_in = 0
        except RuntimeError:
            waited = time.monotonic() - started
            break
        for i, passed in decisions.items():
            if passed:
                life.pass_gate(i)

    # the world group is healthy: gather what each rank went through
    record = torch.full((4 + cfg.slots,), -1, dtype=torch.int64)
    record[:4] = torch.tensor([stuck_in, stuck_slot, len(called), int(waited * 1000)])
    record[4:4 + len(called)] = torch.tensor(called, dtype=torch.int64)
    records = _all_gather_ints(record, cfg.backend)
    result = {"hung": any(r[0] != 0 for r in records), "ranks_stuck": [k for k, r in enumerate(records) if r[0]]}
    if rank != 0:
        return result

    last = world - 1
    others = list(range(last))
    calls_of = [[c for c in r[4:] if c >= 0] for r in records]
    in_step = cfg.diverge_at - 1
    if in_step:
        epochs_text = "epoch 1" if in_step == 1 else f"epochs 1-{in_step}"
        out.print(f"  {epochs_text}: ranks in step; {collectives - len(calls_of[0])} gate all_reduces so far "
                  f"(one per slot per gate check)")
    out.print(f"  epoch {cfg.diverge_at}: rank {last} pruned slot {names[forced]} on its own, so it has no gate "
              f"to check there and skips that slot's all_reduce")
    wrong = [(k, calls_of[0][k], calls_of[last][k]) for k in range(min(len(calls_of[0]), len(calls_of[last])))
             if calls_of[0][k] != calls_of[last][k]]
    if wrong:
        pairs = ", ".join(f"{names[a]} with {names[b]}" for _k, a, b in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        out.print(f"  all_reduces pair by call order, not by slot: {len(wrong)} gate decisions on "
                  f"{ranks_text(others)} silently used rank {last}'s vote for another slot ({pairs}{more})")
    if not result["hung"]:
        out.print("  no rank got stuck this time (the out-of-step slot had no gate check on any rank)")
        return result
    for k, r in enumerate(records):
        if r[0] == 1:
            where = f"the gate all_reduce for slot {names[r[1]]}"
        elif r[0] == 2:
            where = "the gradient all_reduce of its next training step"
        else:
            continue
        out.print(f"  rank {k}: still waiting in {where} after {r[3] / 1000:.1f} s")
    out.print(f"  => the job would have hung: with the default timeouts (10 min NCCL, 30 min gloo) it "
              f"waits, then fails without naming rank {last} or the slot")
    return result


def run_esper_gate(cfg: Settings, out: Console, names: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    from ..gate_sync import GateSync

    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(cfg.backend)
    gs = GateSync(cfg.slots, policy=cfg.policy, timeout=cfg.timeout, slot_names=names, device=device,
                  vocabulary=VOCABULARY)
    life = Lifecycles(cfg.slots, cfg.seed, rank)
    transitions = vetoes = divergences = applied_while_diverged = gate_checks = 0
    latencies: list[float] = []
    injected = ""
    try:
        out.bar(0, cfg.epochs)
        for epoch in range(1, cfg.epochs + 1):
            checks = life.begin_epoch(epoch)
            gate_checks += sum(c is not None for c in checks)
            forced, saved = -1, None
            if epoch == cfg.diverge_at:
                forced = life.divergence_slot()
                slot = life.slots[forced]
                injected = (f"rank {world - 1} pruned slot {names[forced]} on its own "
                            f"({VOCABULARY.stage(slot.stage)} -> {SeedStage.PRUNED.name}) without a gate sync")
                if rank == world - 1:
                    saved = life.prune_alone(forced)
                    checks[forced] = None
            votes, targets = _sync_inputs(checks)
            stages = life.stages()

            started = time.perf_counter()
            consensus = gs(torch.tensor(votes, device=device), torch.tensor(stages, device=device),
                           torch.tensor(targets, device=device))
            decisions = consensus.host_decisions()
            latencies.append(time.perf_counter() - started)

            diverged = consensus.diverged.tolist()
            if any(diverged):
                divergences += sum(diverged)
                out.print(f"  epoch {epoch}: {injected or 'ranks out of step'}")
                out.print("    " + str(consensus.report()).replace("\n", "\n    "))
            slot_votes = None
            for i, check in enumerate(checks):
                if diverged[i]:
                    applied_while_diverged += int(decisions[i])
                    continue
                if check is None:
                    continue
                if decisions[i]:
                    life.pass_gate(i)
                    transitions += 1
                    continue
                if slot_votes is None:
                    slot_votes = consensus.report().slots
                if slot_votes[i].yes > 0:
                    vetoes += 1
            if saved is not None:
                # like Esper after a rollback: the rank that went its own way
                # restores the slot to the state every other rank still holds
                life.slots[forced] = saved
            if forced >= 0 and diverged[forced]:
                out.print(f"    no rank transitioned slot {names[forced]}; rank {world - 1} rolls its prune "
                          f"back, so the next epoch starts in step again")
            out.bar(epoch, cfg.epochs)
    finally:
        syncs = gs.calls
        gs.close()

    # one gather of plain ints (no pickling) to compare every rank's final state
    mine = torch.tensor(life.stages() + [transitions, applied_while_diverged], dtype=torch.int64)
    everyone = _all_gather_ints(mine, cfg.backend)
    identical = all(r == everyone[0] for r in everyone)
    never_applied = all(r[-1] == 0 for r in everyone)
    summary = {
        "epochs": cfg.epochs, "transitions": transitions, "vetoes": vetoes, "divergences": divergences,
        "injected": 1 if injected else 0, "collectives": syncs, "per_slot_collectives": gate_checks,
        "median_latency_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "identical": identical, "never_applied_diverged": never_applied, "prunes": life.prunes,
        "final_stages": life.stages(),
    }
    summary["ok"] = (identical and never_applied and syncs == cfg.epochs
                     and divergences == summary["injected"])
    _print_summary(out, summary, world, cfg.backend, [r[-2] for r in everyone])
    return summary


def _print_summary(out: Console, s: dict, world: int, backend: str, transitions_by_rank: list[int]) -> None:
    counts: dict[int, int] = {}
    for stage in s["final_stages"]:
        counts[stage] = counts.get(stage, 0) + 1
    stages_text = ", ".join(f"{n} {VOCABULARY.stage(st)}"
                            for st, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if len(set(transitions_by_rank)) == 1:
        applied = f"{s['transitions']} on every rank"
    else:
        applied = "differs by rank: " + ", ".join(f"rank {k}: {n}" for k, n in enumerate(transitions_by_rank))
    if world == 1:
        collectives = f"0 ({s['collectives']} syncs; a world of one decides locally)"
    elif s["collectives"] == s["epochs"]:
        collectives = f"{s['collectives']} (one per epoch)"
    else:
        collectives = f"{s['collectives']} (expected one per epoch: {s['epochs']})"
    cores = (f"; {world} rank{'s' if world > 1 else ''} on {os.cpu_count()} CPU cores"
             if backend == "gloo" else "")
    rows = [
        ("epochs", f"{s['epochs']}"),
        ("transitions applied", applied),
        ("vetoes", f"{s['vetoes']} (a rank passed its gate, the consensus said no)"),
        ("prunes", f"{s['prunes']} (shared decisions; cooldown through EMBARGOED and RESETTING)"),
        ("divergences caught", f"{s['divergences']} (injected: {s['injected']})"),
        ("transitions applied to diverged slots", "0 on every rank" if s["never_applied_diverged"] else "SOME"),
        ("collectives issued", collectives),
        ("per-slot design would issue", f"{s['per_slot_collectives']} (one all_reduce and one .item() per slot "
                                        f"per gate check; {2 * s['per_slot_collectives']} for rank-0 broadcast)"),
        ("median sync latency", f"{s['median_latency_ms']:.2f} ms (the whole call, including the wait for "
                                f"the slowest rank{cores})"),
        ("final slot stages identical on all ranks", "yes" if s["identical"] else "NO"),
        ("final slot stages", stages_text),
    ]
    width = max(len(k) for k, _ in rows) + 1
    out.print()
    out.print(f"summary ({world} ranks)")
    for key, value in rows:
        out.print(f"  {key + ':':{width}s} {value}")


def _all_gather_ints(tensor, backend: str) -> list[list[int]]:
    import torch
    import torch.distributed as dist

    device = _device(backend)
    tensor = tensor.to(device)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return [p.tolist() for p in parts]


# ---- launching ---------------------------------------------------------------------------------

def _pg_timeout(cfg: Settings) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(30.0, 3 * cfg.timeout))


def _spawned_rank(rank: int, world: int, cfg: Settings) -> dict:
    """One spawned rank (spawn_ranks has initialized its process group)."""
    return run_rank(cfg)


def _deadline_s(cfg: Settings) -> float:
    startup = 60.0 + 5.0 * cfg.world
    hang = 4 * cfg.hang_timeout + 10 if cfg.show_hang else 0.0
    return startup + hang + 2 * cfg.timeout + 0.005 * cfg.epochs * cfg.slots * cfg.world


def spawn_and_run(cfg: Settings) -> int:
    from ..errors import GateError

    where = "gloo on CPU" if cfg.backend == "gloo" else "NCCL, one GPU per rank"
    print(f"starting {cfg.world} local ranks ({where}) ...", flush=True)
    problems: list[str] = []
    results = []
    try:
        results = spawn_ranks(_spawned_rank, cfg.world, cfg, backend=cfg.backend, timeout=_deadline_s(cfg),
                              pg_timeout_s=_pg_timeout(cfg).total_seconds())
    except (TimeoutError, RuntimeError) as e:  # a rank hung or died without reporting; all are reaped
        problems.append(str(e))
    except KeyboardInterrupt:
        problems.append("interrupted")
    for r in results:
        if r.error is not None:
            # a GateError's message already names ranks and calls; anything else needs its traceback
            trace = "" if isinstance(r.error, GateError) else f"\n{r.traceback}"
            problems.append(f"rank {r.rank} failed: {r.error_type}: {r.error}{trace}")
    for text in problems:
        print(f"esper_gate demo: {text}", file=sys.stderr, flush=True)
    if problems:
        return 1
    return 0 if results[0].value["ok"] else 1


def run_launched(cfg: Settings) -> int:
    """Under torchrun: the launched ranks are the world."""
    import torch
    import torch.distributed as dist

    if cfg.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(cfg.backend, timeout=_pg_timeout(cfg))
    try:
        summary = run_rank(cfg)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if summary["ok"] else 1


# ---- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m esper_gate demo",
        description="Seed lifecycles on real ranks with one esper_gate sync per epoch; one rank goes out "
                    "of step and the sync reports it instead of hanging. Runs under torchrun too.")
    p.add_argument("--world", type=int, default=4, help="ranks to spawn (ignored under torchrun; default 4)")
    p.add_argument("--slots", type=int, default=16, help="seed slots per rank (default 16)")
    p.add_argument("--epochs", type=int, default=40, help="epochs, one gate sync each (default 40)")
    p.add_argument("--policy", default="unanimous", choices=("unanimous", "rank0", "majority", "any"),
                   help="consensus policy (default unanimous)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                   help="gloo (CPU, default) or nccl (one GPU per rank)")
    p.add_argument("--diverge-at", type=int, default=None, metavar="EPOCH",
                   help="epoch at which the last rank prunes a seed on its own (default: the middle "
                        "epoch; -1: never)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated gate qualities (default 0)")
    p.add_argument("--show-hang", action="store_true",
                   help="first run the old per-slot all_reduce design on the same scenario, under a "
                        "short timeout, to show that it would have hung")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a gate sync waits for the slowest rank (default 10)")
    p.add_argument("--hang-timeout", type=float, default=3.0,
                   help="seconds the old design waits before it counts as hung (default 3)")
    return p


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def settings_from(argv: Sequence[str]) -> tuple[Settings | None, str | None]:
    """Parse and check the options; returns (settings, None) or (None, error message)."""
    args = _parser().parse_args(list(argv))
    launched = _launched_by_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if launched else args.world
    from .. import wire

    if not 1 <= world <= wire.MAX_WORLD:
        return None, f"--world must be within 1..{wire.MAX_WORLD}, got {world}"
    if not 1 <= args.slots <= wire.MAX_SLOTS:
        return None, f"--slots must be within 1..{wire.MAX_SLOTS}, got {args.slots}"
    if args.epochs < 1:
        return None, f"--epochs must be at least 1, got {args.epochs}"
    if args.timeout <= 0 or args.hang_timeout <= 0:
        return None, f"timeouts must be positive, got --timeout {args.timeout} --hang-timeout {args.hang_timeout}"
    diverge_at = args.diverge_at if args.diverge_at is not None else max(1, args.epochs // 2)
    if diverge_at == -1 or world == 1:
        diverge_at = 0
    elif not 1 <= diverge_at <= args.epochs:
        return None, f"--diverge-at must be within 1..{args.epochs} (or -1 for none), got {args.diverge_at}"
    if args.show_hang and not diverge_at:
        return None, "--show-hang needs a divergence: at least 2 ranks and --diverge-at other than -1"
    if args.backend == "nccl":
        import torch

        import esper_gate

        if esper_gate.BUILD_INFO.get("build") != "cuda":
            return None, ("--backend nccl needs esper_gate built with CUDA; this build is "
                          f"{esper_gate.BUILD_INFO.get('build')!r} (use --backend gloo)")
        needed = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched else world
        if torch.cuda.device_count() < needed:
            return None, (f"--backend nccl needs one GPU per rank: {needed} local ranks, "
                          f"{torch.cuda.device_count()} GPU(s) visible (use --backend gloo)")
    where = "launched by torchrun" if launched else "spawned here"
    device = "gloo on CPU" if args.backend == "gloo" else "NCCL on GPUs"
    cfg = Settings(world=world, slots=args.slots, epochs=args.epochs, policy=args.policy, backend=args.backend,
                   diverge_at=diverge_at, seed=args.seed, timeout=args.timeout, show_hang=args.show_hang,
                   hang_timeout=args.hang_timeout, launched=f"{where}, {device}")
    return cfg, None


def main(argv: Sequence[str] | None = None) -> int:
    cfg, error = settings_from(sys.argv[1:] if argv is None else argv)
    if error is not None:
        print(f"esper_gate demo: {error}", file=sys.stderr)
        return 2
    if _launched_by_torchrun():
        return run_launched(cfg)
    return spawn_and_run(cfg)


if __name__ == "__main__":
    sys.exit(main())
