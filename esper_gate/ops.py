"""Typed thin wrappers over ``torch.ops.esper_gate`` and their fake kernels.

The fake (meta) kernels let the ops trace under ``torch.compile`` with
``fullgraph=True``: they run the real kernels' argument checks, then compute
output sizes from the wire layout.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

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


def _resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except Exception as e:
        raise ValueError(
            f"esper_gate.sync: unknown process group name '{group_name}': pass group.group_name "
            f"of an initialized torch.distributed group ({e})") from e


# ---- the real kernels' argument checks, for the fake kernels ----------------
#
# A fake kernel runs instead of the real one under FakeTensorMode, under
# torch.compile and for any call with a meta tensor among its inputs, so it
# must refuse exactly what csrc/esper_gate.h refuses, in the same order, with
# the same exception type (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE ->
# TypeError) and the same message. Otherwise a malformed call traces, or
# returns a buffer no kernel filled. Bad *values* (ids out of range, votes
# that are not 0/1, a bad site) are not checked: the real kernels poison the
# buffer with them instead of raising, and a fake cannot see data anyway.

def _scalar_type_name(t: torch.Tensor) -> str:
    # The C++ ScalarType name ("Float", "Long"), as TORCH_CHECK prints it.
    return t.type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_1d(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_value(t.dim() == 1, lambda: (
        f"{op}: expected {name} to be a 1-D tensor, got {t.dim()}-D (shape {list(t.shape)})"))
    torch._check_value(t.is_contiguous(), lambda: (
        f"{op}: expected {name} to be contiguous, got strides {list(t.stride())}"))


def _check_slot_count(op: str, num_slots) -> None:
    torch._check_value(1 <= num_slots <= wire.MAX_SLOTS, lambda: (
        f"{op}: expected 1..{wire.MAX_SLOTS} slots, got {num_slots}"))


def _check_world(op: str, rank: int, world_size: int) -> None:
    torch._check_value(1 <= world_size <= wire.MAX_WORLD, lambda: (
        f"{op}: world_size must be in 1..{wire.MAX_WORLD}, got {world_size}"))
    torch._check_value(0 <= rank < world_size, lambda: (
        f"{op}: rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank}"))


def _parse_policy(op: str, policy: str) -> int:
    torch._check_value(policy in wire.POLICY_CODES, lambda: (
        f"{op}: unknown policy '{policy}', expected one of "
        + ", ".join(f"'{p}'" for p in wire.POLICIES)))
    return wire.POLICY_CODES[policy]


def _check_pack_inputs(op: str, votes, stages, targets, poison: int) -> None:
    _check_1d(op, "votes", votes)
    _check_1d(op, "stages", stages)
    _check_1d(op, "targets", targets)
    torch._check_type(votes.dtype in (torch.bool, torch.int64), lambda: (
        f"{op}: expected votes of dtype torch.bool or torch.int64, got {_scalar_type_name(votes)}"))
    torch._check_type(stages.dtype == torch.int64, lambda: (
        f"{op}: expected stages of dtype torch.int64, got {_scalar_type_name(stages)}"))
    torch._check_type(targets.dtype == torch.int64, lambda: (
        f"{op}: expected targets of dtype torch.int64, got {_scalar_type_name(targets)}"))
    n = votes.numel()
    torch._check_value(stages.numel() == n and targets.numel() == n, lambda: (
        f"{op}: expected votes, stages and targets of equal length, got {n}, {stages.numel()} "
        f"and {targets.numel()}"))
    _check_slot_count(op, n)
    torch._check_value(stages.device == votes.device and targets.device == votes.device, lambda: (
        f"{op}: expected votes, stages and targets on one device, got {votes.device}, "
        f"{stages.device} and {targets.device}"))
    torch._check_value(0 <= poison <= wire.REASON_MAX, lambda: (
        f"{op}: poison must be a reason code in 0..{wire.REASON_MAX}, got {poison}"))


def _check_decode_inputs(op: str, reduced, num_slots: int, world_size: int) -> None:
    _check_slot_count(op, num_slots)
    _check_world(op, 0, world_size)
    _check_1d(op, "reduced", reduced)
    torch._check_type(reduced.dtype == torch.int64, lambda: (
        f"{op}: expected reduced of dtype torch.int64, got {_scalar_type_name(reduced)}"))
    words = wire.buffer_words(num_slots, world_size)
    torch._check_value(reduced.numel() == words, lambda: (
        f"{op}: expected a reduced buffer of {words} words for {num_slots} slots and world_size "
        f"{world_size}, got {reduced.numel()}"))


@torch.library.register_fake("esper_gate::pack")
def _pack_fake(votes, stages, targets, seq, site, policy, rank, world_size, poison=0):
    op = "esper_gate.pack"
    _check_pack_inputs(op, votes, stages, targets, poison)
    _parse_policy(op, policy)
    _check_world(op, rank, world_size)
    return votes.new_empty((wire.buffer_words(votes.shape[0], world_size),), dtype=torch.int64)


@torch.library.register_fake("esper_gate::decode")
def _decode_fake(reduced, num_slots, world_size, policy):
    op = "esper_gate.decode"
    _check_decode_inputs(op, reduced, num_slots, world_size)
    _parse_policy(op, policy)
    return (reduced.new_empty((num_slots,), dtype=torch.bool),
            reduced.new_empty((wire.report_words(num_slots, world_size),), dtype=torch.int64))


@torch.library.register_fake("esper_gate::sync")
def _sync_fake(votes, stages, targets, seq, site, policy, group_name, poison=0):
    op = "esper_gate.sync"
    _check_pack_inputs(op, votes, stages, targets, poison)
    _parse_policy(op, policy)
    # Plain meta tensors (not FakeTensors) reach this kernel outside any
    # tracing: that is a real call, and every peer is waiting for its
    # collective. Meta tensors hold no data to reduce, so no decision can be
    # computed; returning empty tensors would hand the caller decisions no
    # rank made. Pack and decode keep meta's usual meaning (shapes only),
    # since neither involves another rank.
    torch._check_value(is_fake(votes), lambda: (
        f"{op}: got votes, stages and targets on {votes.device} outside tracing; a meta tensor "
        f"has no data to all_reduce, so the gate cannot be decided (pass tensors on the gate's "
        f"device)"))
    group = _resolve_group(group_name)
    world = group.size()
    _check_world(op, group.rank(), world)
    n = votes.shape[0]
    return (votes.new_empty((n,), dtype=torch.bool),
            votes.new_empty((wire.report_words(n, world),), dtype=torch.int64))
