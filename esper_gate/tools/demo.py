"""``python -m esper_gate demo``: the problem and the fix, on real ranks, in a loop shaped like Esper's.

Every rank runs the same Esper-shaped training loop (esper_gate/tools/esper_like.py):
per-slot ``step_epoch`` ticks with Esper's local early returns (no seed, a
dwell not served, alpha not at its target), an operator that germinates,
fossilizes and prunes, and gate votes with per-rank noise. Gates are not
synced where they are checked: they are queued, and one round per model
decides every slot, after the ticks and again after the actions, on every
rank, whatever its slots hold. At ``--diverge-at`` the last rank prunes a
seed on its own: the round reports that slot, applies nothing to it, and the
other slots go on. At ``--drift-at`` rank 0's alpha controller takes one
extra step on one slot, inside its stage: the slot's state digest differs, the
round reports which ranks hold which digest, and nothing is applied to it. ``--show-hang`` first runs Esper HEAD's design on the same
loop: one rank-0 ``broadcast_object_list`` per gate check, under a short
timeout.

Ranks are spawned here (gloo on CPU by default) or, under ``torchrun``, are
the launched ones. Every wait is bounded and every spawned process is reaped.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from .._spawn import spawn_ranks
from ..esper import VOCABULARY
from ..report import ranks_text
from . import esper_like

# The old design's "training step" between epochs: a gradient all_reduce.
GRADIENT_NUMEL = 1024
ROUNDS_PER_EPOCH = 2   # after the ticks, after the actions


def slot_names(num_slots: int) -> list[str]:
    """Esper-style slot ids: rows of four."""
    return [f"r{i // 4}c{i % 4}" for i in range(num_slots)]


# ---- output --------------------------------------------------------------------------------
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
    drift_at: int            # 0: no digest drift
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
    out.print(f"esper_gate demo: {world} ranks ({cfg.launched}), {cfg.slots} slots, {cfg.epochs} epochs, "
              f"policy {cfg.policy}, seed {cfg.seed}")
    out.print("  every rank runs an Esper-shaped loop: per-slot step_epoch with local early returns, then one")
    out.print("  gate round for all slots; the operator acts; a second round decides its explicit actions")
    if cfg.diverge_at:
        out.print(f"  at epoch {cfg.diverge_at}, rank {world - 1} prunes a seed on its own, out of step "
                  f"with the other ranks")
    if cfg.drift_at:
        out.print(f"  at epoch {cfg.drift_at}, rank 0's alpha controller steps once more on one slot (same "
                  f"stage, different state digest)")
    old = None
    if cfg.show_hang:
        out.print()
        old = run_old_design(cfg, out)
        out.print()
        out.print(f"the same loop with esper_gate (one round per model, {ROUNDS_PER_EPOCH} per epoch, "
                  f"all {cfg.slots} slots each):")
    summary = run_esper_gate(cfg, out)
    summary["old_design"] = old
    return summary


def run_old_design(cfg: Settings, out: Console) -> dict:
    """Esper HEAD: each gate check, where it happens, runs a rank-0 broadcast_object_list.

    It runs on its own gloo groups with a short timeout, so the hang it walks
    into ends after ``hang_timeout`` seconds instead of never. The gradient
    all_reduce of the next training step runs on a group of its own.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    names = slot_names(cfg.slots)
    limit = datetime.timedelta(seconds=cfg.hang_timeout)
    dist.barrier()  # the short timeout also bounds building these groups: start them together
    gate_group = dist.new_group(backend="gloo", timeout=limit)
    grad_group = dist.new_group(backend="gloo", timeout=limit)
    out.print(f"--show-hang: Esper HEAD's design (one rank-0 broadcast_object_list per gate check), "
              f"same loop, {cfg.hang_timeout:g} s timeout")
    state = {"where": 0, "slot": -1, "since": time.monotonic(), "calls": 0, "foreign": [], "epoch": 0}

    def decide(slots, when):
        for i, slot in enumerate(slots):
            check = slot.pending_gate_check()
            if check is None:
                continue
            state.update(where=1, slot=i, since=time.monotonic())
            adopted, from_slot = esper_like.old_gate_decision(slot, check, gate_group)
            state["calls"] += 1
            if from_slot != slot.slot_id and len(state["foreign"]) < 3:
                state["foreign"].append((state["epoch"], slot.slot_id, from_slot))
            slot.apply_gate_decision(adopted)
        state["where"] = 0

    def training_step(epoch):
        state.update(where=2, slot=-1, since=time.monotonic(), epoch=epoch + 1)
        dist.all_reduce(torch.zeros(GRADIENT_NUMEL), group=grad_group)
        state["where"] = 0

    waited = 0.0
    try:
        esper_like.run_esper_like(cfg.slots, cfg.epochs, seed=cfg.seed, rank=rank, lone_pruner=world - 1,
                                  prune_at=cfg.diverge_at, decide=decide, on_epoch=training_step)
    except RuntimeError:
        waited = time.monotonic() - state["since"]

    record = torch.tensor([state["where"], state["slot"], state["calls"], int(waited * 1000), state["epoch"],
                           len(state["foreign"])], dtype=torch.int64)
    records = _all_gather_ints(record, cfg.backend)
    result = {"hung": any(r[0] != 0 for r in records), "ranks_stuck": [k for k, r in enumerate(records) if r[0]],
              "calls": [r[2] for r in records]}
    if rank == world - 1 and state["foreign"]:
        epoch, mine, theirs = state["foreign"][0]
        print(f"  rank {rank}, epoch {epoch}: its gate check for slot {mine} adopted rank 0's decision for "
              f"slot {theirs} (broadcasts pair by call order, not by slot)", flush=True)
    if rank != 0:
        return result
    time.sleep(0.2)  # let the last rank's line come first
    out.print(f"  gate broadcasts made: {', '.join(f'rank {k}: {r[2]}' for k, r in enumerate(records))}")
    if not result["hung"]:
        out.print("  no rank got stuck this time")
        return result
    for k, r in enumerate(records):
        if r[0] == 1:
            where = f"a gate broadcast for slot {names[r[1]]}"
        elif r[0] == 2:
            where = "the gradient all_reduce of its next training step"
        else:
            continue
        out.print(f"  rank {k}: still waiting in {where} (epoch {r[4]}) after {r[3] / 1000:.1f} s")
    out.print(f"  => the job would have hung: with the default timeouts (10 min NCCL, 30 min gloo) it "
              f"waits, then fails without naming rank {world - 1} or the slot")
    return result


def run_esper_gate(cfg: Settings, out: Console) -> dict:
    import torch
    import torch.distributed as dist

    from .. import kasmina

    rank, world = dist.get_rank(), dist.get_world_size()
    names = slot_names(cfg.slots)
    log = esper_like.RoundLog()
    latencies: list[float] = []
    counts = {"gate_checks": 0, "reported": False, "drift_reported": False}

    def decide(slots, when):
        counts["gate_checks"] += sum(s.pending_gate_target is not None for s in slots)
        started = time.perf_counter()
        esper_like.run_gate_round(slots, log, names=names, policy=cfg.policy, timeout=cfg.timeout)
        latencies.append(time.perf_counter() - started)
        if log.diverged[-1] and log.reports and not counts["reported"]:
            counts["reported"] = True
            out.print(f"  round {log.calls} (epoch {(log.calls + 1) // ROUNDS_PER_EPOCH}, after the "
                      f"{'ticks' if when == 'epoch' else 'actions'}): {log.reports[-1]}")
        epoch = (log.calls + 1) // ROUNDS_PER_EPOCH
        before = set(log.digest_diverged[-2]) if len(log.digest_diverged) > 1 else set()
        new = [i for i in log.digest_diverged[-1] if i not in before]  # the drift shows as a new digest split
        if cfg.drift_at and epoch >= cfg.drift_at and new and not counts["drift_reported"]:
            counts["drift_reported"] = True
            out.print(f"  round {log.calls} (epoch {epoch}, after the "
                      f"{'ticks' if when == 'epoch' else 'actions'}): {log.last_notes[new[0]]}")

    try:
        out.bar(0, cfg.epochs)
        slots, pruned, drifted = esper_like.run_esper_like(
            cfg.slots, cfg.epochs, seed=cfg.seed, rank=rank, lone_pruner=world - 1 if cfg.diverge_at else -1,
            prune_at=cfg.diverge_at, decide=decide, on_epoch=lambda e: out.bar(e, cfg.epochs),
            drifter=0 if cfg.drift_at else -1, drift_at=cfg.drift_at)
    finally:
        kasmina.clear_cache()

    # one gather of plain ints (no pickling): per call and slot, 1 = diverged here, 2 = transitioned
    # here, 4 = the ranks' state digests differ
    calls = log.calls
    flags = torch.zeros(calls * cfg.slots, dtype=torch.int64)
    for c in range(calls):
        for i in log.diverged[c]:
            flags[c * cfg.slots + i] += 1
        for i in log.transitioned[c]:
            flags[c * cfg.slots + i] += 2
        for i in log.digest_diverged[c]:
            flags[c * cfg.slots + i] += 4
    stages = [-1 if s.state is None else int(s.state.stage) for s in slots]
    transitions = sum(len(t) for t in log.transitioned)
    head = torch.tensor([calls, transitions, counts["gate_checks"]] + stages, dtype=torch.int64)
    everyone = _all_gather_ints(torch.cat([head, flags]), cfg.backend)
    n_head = 3 + cfg.slots
    calls_by_rank = [r[0] for r in everyone]
    diverged_pairs = {(c, i) for r in everyone for c in range(calls) for i in range(cfg.slots)
                      if r[n_head + c * cfg.slots + i] & 1}
    applied_diverged = sum(1 for r in everyone for (c, i) in diverged_pairs if r[n_head + c * cfg.slots + i] & 2)
    diverged_slots = sorted({i for _c, i in diverged_pairs})
    digest_pairs = {(c, i) for r in everyone for c in range(calls) for i in range(cfg.slots)
                    if r[n_head + c * cfg.slots + i] & 4}
    # every rank learns every slot's divergence: count, per rank, the slot-rounds it saw diverged
    seen_by_rank = [sum(1 for c in range(calls) for i in range(cfg.slots) if r[n_head + c * cfg.slots + i] & 1)
                    for r in everyone]
    out_of_step = [i for i in range(cfg.slots) if len({r[3 + i] for r in everyone}) > 1]
    summary = {
        "epochs": cfg.epochs, "calls_by_rank": calls_by_rank, "transitions_by_rank": [r[1] for r in everyone],
        "gate_checks_by_rank": [r[2] for r in everyone], "vetoes": sum(len(v) for v in log.vetoed),
        "divergences": len(diverged_pairs), "diverged_slots": [names[i] for i in diverged_slots],
        "divergences_seen_by_rank": seen_by_rank,
        "pruned_alone": names[pruned] if cfg.diverge_at and pruned >= 0 else None,
        "drifted": names[drifted] if cfg.drift_at and drifted >= 0 else None, "drift_at": cfg.drift_at,
        "digest_divergences": len(digest_pairs), "digest_slots": sorted({names[i] for _c, i in digest_pairs}),
        "applied_to_diverged": applied_diverged, "out_of_step": [names[i] for i in out_of_step],
        "median_latency_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "final_stages": stages,
    }
    expected_diverged = sorted((summary[k] for k in ("pruned_alone", "drifted") if summary[k]),
                               key=names.index)
    expected_digest = [summary["drifted"]] if summary["drifted"] else []
    summary["ok"] = (len(set(calls_by_rank)) == 1 and calls_by_rank[0] == ROUNDS_PER_EPOCH * cfg.epochs
                     and applied_diverged == 0 and len(set(seen_by_rank)) == 1
                     and summary["diverged_slots"] == expected_diverged
                     and set(expected_digest) <= set(summary["digest_slots"]) <= set(expected_diverged)
                     and not (summary["drifted"] and summary["drifted"] in summary["out_of_step"])
                     and set(summary["out_of_step"]) <= set(expected_diverged))
    _print_summary(out, summary, world, cfg.backend)
    return summary


def _per_rank(values: list[int], unit: str = "") -> str:
    if len(set(values)) == 1:
        return f"{values[0]}{unit} on every rank"
    return ", ".join(f"rank {k}: {v}" for k, v in enumerate(values))


def _print_summary(out: Console, s: dict, world: int, backend: str) -> None:
    counts: dict[int, int] = {}
    for stage in s["final_stages"]:
        counts[stage] = counts.get(stage, 0) + 1
    stages_text = ", ".join(f"{n} {'empty' if st == -1 else VOCABULARY.stage(st)}"
                            for st, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    cores = (f"; {world} rank{'s' if world > 1 else ''} on {os.cpu_count()} CPU cores"
             if backend == "gloo" else "")
    if s["divergences"]:
        where = ", ".join(s["diverged_slots"])
        caught = f"{s['divergences']} slot-rounds, on {where} only" + (
            f" (rank {world - 1} pruned {s['pruned_alone']} on its own)" if s["pruned_alone"] else "")
        caught += "; seen by " + _per_rank(s["divergences_seen_by_rank"])
    else:
        caught = "0"
    if s["digest_divergences"]:
        digest = f"{s['digest_divergences']} slot-rounds, on {', '.join(s['digest_slots'])}"
        if s["drifted"]:
            digest += (f"; {s['drifted']}: rank 0's alpha step drifted at epoch {s['drift_at']}, its stage "
                       f"the same on every rank (only the digest tells)")
    else:
        digest = "0" + (" (nothing drifted: no seed to drift)" if s["drift_at"] else "")
    in_step = len(s["final_stages"]) - len(s["out_of_step"])
    rows = [
        ("epochs", f"{s['epochs']}"),
        ("round calls per rank", _per_rank(s["calls_by_rank"]) + f" ({ROUNDS_PER_EPOCH} per epoch)"),
        ("transitions applied", _per_rank(s["transitions_by_rank"])),
        ("vetoes", f"{s['vetoes']} on rank 0 (its gate passed, the consensus said no)"),
        ("divergences caught", caught),
        ("of which state-digest divergences", digest),
        ("transitions applied to diverged slots", f"{s['applied_to_diverged']}"),
        ("gate checks a per-check sync would pair", _per_rank(s["gate_checks_by_rank"])
         + " (Esper HEAD: one broadcast each)"),
        ("median round latency", f"{s['median_latency_ms']:.2f} ms (the whole call, including the wait for "
                                 f"the slowest rank{cores})"),
        ("slots in step at the end", f"{in_step} of {len(s['final_stages'])}"
         + (f" ({', '.join(s['out_of_step'])} differs)" if s["out_of_step"] else "")),
        ("final slot stages (rank 0)", stages_text),
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
    p.add_argument("--drift-at", type=int, default=None, metavar="EPOCH",
                   help="epoch at which rank 0's alpha controller takes one extra step on one slot, "
                        "inside its stage (default: halfway between --diverge-at and the end; -1: never)")
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
    if args.drift_at is not None:
        drift_at = args.drift_at
    else:
        drift_at = (diverge_at or args.epochs // 2) + max(1, (args.epochs - (diverge_at or args.epochs // 2)) // 2)
        drift_at = drift_at if drift_at <= args.epochs else -1
    if drift_at == -1 or world == 1:
        drift_at = 0
    elif not 1 <= drift_at <= args.epochs or drift_at == diverge_at:
        return None, (f"--drift-at must be within 1..{args.epochs} and differ from --diverge-at "
                      f"{diverge_at} (or -1 for none), got {args.drift_at}")
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
                   diverge_at=diverge_at, drift_at=drift_at, seed=args.seed, timeout=args.timeout, show_hang=args.show_hang,
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
