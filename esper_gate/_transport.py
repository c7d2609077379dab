"""Transports: how one gate call's packed buffer meets the other ranks.

A transport runs the whole op for a prepared call and returns
``(decisions, report)``; it can say whether its backend saw an error, abort
a stuck collective, and be torn down. ``C10dTransport`` runs
``torch.ops.esper_gate.sync`` on the gate's dedicated c10d process group
(gloo, NCCL, or a test backend registered with c10d); ``LocalTransport`` is
a world of one, with no collective.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from . import ops
from ._group import self_timing
from ._inputs import Prepared

__all__ = ["C10dTransport", "LocalTransport"]

log = logging.getLogger("esper_gate")


class LocalTransport:
    """A world of one: pack and decode here, no collective."""

    name = None
    self_timing = True

    def sync(self, p: Prepared, seq: int, policy: str):
        buf = ops.pack(p.votes, p.stages, p.targets, seq, p.site, policy, 0, 1, p.poison, p.policies, p.digests)
        return ops.decode(buf, p.votes.shape[0], 1, policy)

    def failed(self) -> bool:
        return False

    def invalidate(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class C10dTransport:
    """Gate calls on a dedicated c10d process group.

    On CUDA every call's decisions are and-ed with a device flag that
    ``invalidate`` clears, so a call aborted at its deadline reads as all
    false on the device, whoever reads it and whenever.
    """

    def __init__(self, group, backend: str, device: torch.device):
        self.group = group
        self.name = group.group_name
        self.device = device
        # gloo raises in the caller at its own timeout; other backends must be aborted.
        self.self_timing = self_timing(backend, device)
        self._valid = torch.ones(1, dtype=torch.bool, device=device) if device.type == "cuda" else None

    def sync(self, p: Prepared, seq: int, policy: str):
        decision, report = torch.ops.esper_gate.sync.default(
            p.votes, p.stages, p.targets, seq, p.site, policy, self.name, p.poison, p.policies, p.digests)
        if self._valid is not None:
            decision.logical_and_(self._valid)
        return decision, report

    def failed(self) -> bool:
        """Whether the backend reports an error on the group (NCCL's watchdog aborted it).
        False when it cannot tell."""
        if self.group is None:
            return False
        try:
            from torch._C._distributed_c10d import ErrorType

            return self.group._get_backend(self.device).get_error() != ErrorType.SUCCESS
        except Exception:  # noqa: BLE001 - a backend without error reporting
            return False

    def invalidate(self) -> None:
        """Make every CUDA call's decisions read false from here on."""
        if self._valid is None:
            return
        # On a side stream (the caller's stream may be stuck behind the
        # collective), and before the abort lets that stream move on.
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream(device=self.device)
                with torch.cuda.stream(side):
                    self._valid.fill_(False)
                side.synchronize()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: could not clear the result flag on %s", self.device)

    def abort(self) -> None:
        """Stop a stuck collective (nothing to do where the backend times out by itself)."""
        if self.self_timing or self.group is None:
            return
        try:
            self.group.abort()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: aborting the gate's process group failed")

    def close(self) -> None:
        """Free the group: its threads, sockets and communicator (its name is never reused)."""
        group, self.group = self.group, None
        if group is None:
            return
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - already gone with the job's teardown
            pass
