"""Typed thin wrappers over ``torch.ops.esper_gate``, and the fake kernel of ``sync``.

pack and decode trace under ``torch.compile`` (``fullgraph=True``) and run on
meta tensors through their Meta kernels in C++, which are the real kernels'
argument checks and output sizes with no launch. ``sync`` needs the process
group's world size, so its fake kernel is registered here (the C++ library
names this module for it); it runs the pack and decode Meta kernels too.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


__all__ = ["pack", "decode", "sync"]


def pack(votes: torch.Tensor, stages: torch.Tensor, targets: torch.Tensor, seq: int, site: int,
         policy: str, rank: int, world_size: int, poison: int = 0, policies: torch.Tensor | None = None,
         digests: torch.Tensor | None = None) -> torch.Tensor:
    """Pack this rank's contribution into the int64 buffer that is all-reduced with SUM.

    Args:
        votes: ``[S]`` bool (or int64 0/1), 1 where the local gate passed.
        stages: ``[S]`` int64 stage id of each slot (0..63).
        targets: ``[S]`` int64 target of the gate being checked (0..62), or
            ``esper_gate.NO_GATE`` (63) where the slot has no gate this call.
        seq: the caller's call counter (low 32 bits go on the wire).
        site: 32-bit fingerprint of the call site and slot layout.
        policy: ``"unanimous"``, ``"rank0"``, ``"majority"`` or ``"any"``.
        rank, world_size: this rank and the number of ranks.
        poison: 0, or a reason code 1..31 that marks this rank's input as bad.
        policies: ``[S]`` int64 policy code of each slot (the index in
            ``wire.POLICIES``), or None: every slot has ``policy``.
        digests: ``[S]`` int64 state digest of each slot (0..2**32-1), or
            None: every digest is 0.

    Out-of-range values do not raise: they poison the buffer, so every rank
    learns of them in the same collective. Malformed tensors raise.
    """
    return torch.ops.esper_gate.pack.default(votes, stages, targets, seq, site, policy, rank,
                                             world_size, poison, policies, digests)


def decode(reduced: torch.Tensor, num_slots: int, world_size: int,
           policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the all-reduced buffer into ``(decision[S] bool, report int64)``."""
    return torch.ops.esper_gate.decode.default(reduced, num_slots, world_size, policy)


def sync(votes: torch.Tensor, stages: torch.Tensor, targets: torch.Tensor, seq: int, site: int,
         policy: str, group_name: str, poison: int = 0, policies: torch.Tensor | None = None,
         digests: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pack, one SUM all_reduce on the process group named ``group_name``, decode.

    Every rank of the group must call it. On CUDA it returns without waiting
    for the GPU. See ``esper_gate.GateSync`` for the object most users want.
    """
    return torch.ops.esper_gate.sync.default(votes, stages, targets, seq, site, policy,
                                             group_name, poison, policies, digests)


# ---- the fake kernel of sync: here only because it needs the group's rank and world
# size; the checks and sizes are pack's and decode's Meta kernels (csrc/ops.cpp).

def _as_sync_error(e: Exception) -> Exception:
    # sync's checks are pack's; the message names the op the caller called,
    # as the real sync does (csrc/ops.cpp, as_sync_message).
    msg = str(e)
    if msg.startswith("esper_gate.pack:"):
        msg = "esper_gate.sync:" + msg[len("esper_gate.pack:"):]
    return type(e)(msg)


@torch.library.register_fake("esper_gate::sync")
def _sync_fake(votes, stages, targets, seq, site, policy, group_name, poison=0, policies=None, digests=None):
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    world = group.size()
    try:
        buffer = torch.ops.esper_gate.pack.default(votes, stages, targets, seq, site, policy,
                                                   group.rank(), world, poison, policies, digests)
    except (TypeError, ValueError) as e:
        raise _as_sync_error(e) from None
    # Plain meta tensors (not FakeTensors) here are a real call outside tracing, with
    # peers waiting: no data to reduce, so no decision (empty tensors would be decisions
    # no rank made). Pack and decode keep meta's meaning (shapes), involving no peer.
    torch._check_value(is_fake(votes), lambda: (
        f"esper_gate.sync: got votes, stages and targets on {votes.device} outside tracing; a meta "
        f"tensor has no data to all_reduce, so the gate cannot be decided (pass tensors on the "
        f"gate's device)"))
    return torch.ops.esper_gate.decode.default(buffer, votes.shape[0], world, policy)


# ---- side effects: a sync is a collective (every peer waits for this rank), so a traced
# graph keeps it even when nothing reads its outputs. Its functional schema is what FX's
# dead-code elimination (Graph.eliminate_dead_code: Dynamo, AOTAutograd, Inductor) would
# drop; has_side_effect marks it impure, and the NCCL all_reduce ops (mutating) too.
def _mark_side_effects() -> None:
    import torch.fx.node

    for name in ("sync", "nccl_all_reduce_start_", "nccl_all_reduce_poll"):
        if hasattr(torch.ops.esper_gate, name):
            packet = getattr(torch.ops.esper_gate, name)
            torch.fx.node.has_side_effect(packet)
            torch.fx.node.has_side_effect(packet.default)


_mark_side_effects()
