"""Run W simulated ranks through pack -> SUM -> decode in one process."""
from __future__ import annotations

from typing import Sequence

import torch

import esper_gate
from reference import RankInput


def pack_rank(inp: RankInput, rank: int, world: int, device="cpu") -> torch.Tensor:
    votes = torch.tensor([int(v) for v in inp.votes], dtype=torch.int64, device=device)
    if all(int(v) in (0, 1) for v in inp.votes):
        votes = votes.bool()
    stages = torch.tensor(list(inp.stages), dtype=torch.int64, device=device)
    targets = torch.tensor(list(inp.targets), dtype=torch.int64, device=device)
    w = inp.world if inp.world is not None else world
    return esper_gate.pack(votes, stages, targets, inp.seq, inp.site, inp.policy, rank, w, inp.poison)


def simulate(inputs: Sequence[RankInput], view: int = 0, device="cpu"):
    """What rank ``view`` gets back: ``(decision list, report list, reduced buffer)``."""
    world = len(inputs)
    bufs = [pack_rank(inp, r, world, device) for r, inp in enumerate(inputs)]
    reduced = torch.stack(bufs).sum(0)
    me = inputs[view]
    decision, report = esper_gate.decode(reduced, len(me.votes), world, me.policy)
    return decision.cpu().tolist(), report.cpu().tolist(), reduced
