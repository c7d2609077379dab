"""Run W simulated ranks through pack -> SUM -> decode in one process."""
from __future__ import annotations

from typing import Sequence

import torch

import esper_gate
from esper_gate import wire
from reference import RankInput, carries_slot_state


def _tensors(inp: RankInput, device, slot_state: bool | None = None) -> tuple:
    """The op's arguments for one rank. ``slot_state`` (default: whether this rank sends
    policies or digests) True sends the defaults where the rank has none, as a GateSync
    with the slot state does, so every rank of the call packs a buffer of one size."""
    votes = torch.tensor([int(v) for v in inp.votes], dtype=torch.int64, device=device)
    if all(int(v) in (0, 1) for v in inp.votes):
        votes = votes.bool()
    stages = torch.tensor(list(inp.stages), dtype=torch.int64, device=device)
    targets = torch.tensor(list(inp.targets), dtype=torch.int64, device=device)
    policies = None if inp.policies is None else torch.tensor(
        [wire.POLICY_CODES[p] if isinstance(p, str) else int(p) for p in inp.policies], dtype=torch.int64,
        device=device)
    digests = None if inp.digests is None else torch.tensor(list(inp.digests), dtype=torch.int64, device=device)
    if slot_state:
        n = len(inp.votes)
        if policies is None:
            policies = torch.full((n,), wire.POLICY_CODES[inp.policy], dtype=torch.int64, device=device)
        if digests is None:
            digests = torch.zeros(n, dtype=torch.int64, device=device)
    return votes, stages, targets, policies, digests


def pack_rank(inp: RankInput, rank: int, world: int, device="cpu", tensors=None) -> torch.Tensor:
    votes, stages, targets, policies, digests = tensors if tensors is not None else _tensors(inp, device)
    w = inp.world if inp.world is not None else world
    return esper_gate.pack(votes, stages, targets, inp.seq, inp.site, inp.policy, rank, w, inp.poison,
                           policies=policies, digests=digests)


def reduce_all(inputs: Sequence[RankInput], device="cpu") -> torch.Tensor:
    """Every rank's buffer summed, as the all_reduce leaves it on every rank.

    The call carries the slot state when some rank sends policies or digests
    (the others send the defaults). A running sum, so memory stays one buffer at any world size; ranks with
    the same slot values share their input tensors (the pack op still runs
    once per rank, with that rank's id)."""
    world = len(inputs)
    slot_state = carries_slot_state(inputs)
    cache: dict = {}
    total = None
    for r, inp in enumerate(inputs):
        key = (tuple(int(v) for v in inp.votes), tuple(inp.stages), tuple(inp.targets),
               None if inp.policies is None else tuple(inp.policies),
               None if inp.digests is None else tuple(inp.digests), inp.policy)
        if key not in cache:
            cache[key] = _tensors(inp, device, slot_state)
        buf = pack_rank(inp, r, world, device, cache[key])
        total = buf if total is None else total.add_(buf)
    return total


def decode_view(reduced: torch.Tensor, inputs: Sequence[RankInput], view: int):
    """What rank ``view`` decodes from the reduced buffer, with its own slot count and policy."""
    me = inputs[view]
    decision, report = esper_gate.decode(reduced, len(me.votes), len(inputs), me.policy)
    return decision.cpu().tolist(), report.cpu().tolist()


def simulate(inputs: Sequence[RankInput], view: int = 0, device="cpu"):
    """What rank ``view`` gets back: ``(decision list, report list, reduced buffer)``."""
    reduced = reduce_all(inputs, device)
    return (*decode_view(reduced, inputs, view), reduced)
