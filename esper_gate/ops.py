"""Typed thin wrappers over ``torch.ops.esper_gate`` and their fake kernels.

The fake (meta) kernels let the ops trace under ``torch.compile`` with
``fullgraph=True``: they only compute output sizes from the wire layout.
"""
from __future__ import annotations

import torch

from . import wire

__all__ = ["pack", "decode", "sync"]


def pack(votes: torch.Tensor, stages: torch.Tensor, targets: torch.Tensor, seq: int, site: int,
         policy: str, rank: int, world_size: int, poison: int = 0) -> torch.Tensor:
    """Pack this rank's contribution into the int64 buffer that is all-reduced with SUM.

    Args:
        votes: ``[S]`` bool (or int64 0/1), 1 where the local gate passed.
        stages: ``[S]`` int64 stage id of each slot (0..63).
        targets: ``[S]`` int64 target of the gate being checked (0..63).
        seq: the caller's call counter (low 32 bits go on the wire).
        site: 32-bit fingerprint of the call site and slot layout.
        policy: ``"unanimous"``, ``"rank0"``, ``"majority"`` or ``"any"``.
        rank, world_size: this rank and the number of ranks.
        poison: 0, or a reason code 1..31 that marks this rank's input as bad.

    Out-of-range values do not raise: they poison the buffer, so every rank
    learns of them in the same collective. Malformed tensors raise.
    """
    return torch.ops.esper_gate.pack.default(votes, stages, targets, seq, site, policy, rank,
                                             world_size, poison)


def decode(reduced: torch.Tensor, num_slots: int, world_size: int,
           policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the all-reduced buffer into ``(decision[S] bool, report int64)``."""
    return torch.ops.esper_gate.decode.default(reduced, num_slots, world_size, policy)


def sync(votes: torch.Tensor, stages: torch.Tensor, targets: torch.Tensor, seq: int, site: int,
         policy: str, group_name: str, poison: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pack, one SUM all_reduce on the process group named ``group_name``, decode.

    Every rank of the group must call it. On CUDA it returns without waiting
    for the GPU. See ``esper_gate.GateSync`` for the object most users want.
    """
    return torch.ops.esper_gate.sync.default(votes, stages, targets, seq, site, policy,
                                             group_name, poison)


def _group_size(group_name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


@torch.library.register_fake("esper_gate::pack")
def _pack_fake(votes, stages, targets, seq, site, policy, rank, world_size, poison=0):
    torch._check(votes.dim() == 1, lambda: f"expected 1-D votes, got {votes.dim()}-D")
    n = votes.shape[0]
    return votes.new_empty((wire.buffer_words(n, world_size),), dtype=torch.int64)


@torch.library.register_fake("esper_gate::decode")
def _decode_fake(reduced, num_slots, world_size, policy):
    return (reduced.new_empty((num_slots,), dtype=torch.bool),
            reduced.new_empty((wire.report_words(num_slots, world_size),), dtype=torch.int64))


@torch.library.register_fake("esper_gate::sync")
def _sync_fake(votes, stages, targets, seq, site, policy, group_name, poison=0):
    n = votes.shape[0]
    world = _group_size(group_name)
    return (votes.new_empty((n,), dtype=torch.bool),
            votes.new_empty((wire.report_words(n, world),), dtype=torch.int64))
