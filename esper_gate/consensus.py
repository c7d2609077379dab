"""GateConsensus: what one GateSync call returns."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from . import ops, wire
from .errors import GateDivergenceError, GateInputError, GatePeerInputError
from .report import DivergenceReport, parse_report, ranks_text

if TYPE_CHECKING:
    from .gate_sync import GateSync

__all__ = ["GateConsensus"]


class GateConsensus:
    """The result of one GateSync call.

    ``decisions`` and ``diverged`` are tensors on the gate's device; reading
    them on the host is the consumer's one sync. ``report()`` copies the
    report to the host once, when asked. On CUDA, a call that the watcher
    aborted has ``decisions`` all false, and every host read here raises its
    GateTimeoutError.
    """

    __slots__ = ("_owner", "seq", "decisions", "_report_tensor", "_report", "_report_words", "_diverged",
                 "_local_problem", "_ready", "_inputs")

    def __init__(self, owner: "GateSync", seq: int, decisions: torch.Tensor, report: torch.Tensor,
                 local_problem: str | None = None, ready=None, inputs=None):
        self._owner = owner
        self.seq = seq
        self.decisions = decisions
        self._report_tensor = report
        self._report: DivergenceReport | None = None
        self._report_words: list[int] | None = None
        self._diverged: torch.Tensor | None = None
        self._local_problem = local_problem
        self._ready = ready
        self._inputs = inputs  # (votes, stages, targets, site, poison): to name this rank's own bad input

    @property
    def diverged(self) -> torch.Tensor:
        """Bool tensor, true for each slot that was not agreed (never transitioned)."""
        self._owner._raise_if_failed(self.seq)
        if self._diverged is None:
            n = self.decisions.shape[0]
            status = self._report_tensor[wire.GLOBAL_WORDS: wire.GLOBAL_WORDS + wire.SLOT_WORDS * n]
            status = status.view(n, wire.SLOT_WORDS)[:, wire.S_STATUS]
            self._diverged = (status & wire.STATUS_DIVERGED) != 0
        return self._diverged

    def _wait_ready(self) -> None:
        """Wait for this call's GPU work; the watcher bounds the wait (it aborts a
        stuck collective at the deadline), and a failed call raises its error."""
        owner = self._owner
        if self._ready is not None:
            start = time.monotonic()
            # A sync takes tens of microseconds on NCCL: spin first, then back off.
            while not self._ready.query():
                if owner._failed_at(self.seq):
                    break
                if time.monotonic() - start > 0.005:
                    time.sleep(0.0002)
        owner._raise_if_failed(self.seq)

    def report_words(self) -> list[int]:
        """The raw report as host ints (layout in esper_gate.wire; one copy, on first use)."""
        if self._report_words is None:
            self._wait_ready()
            self._report_words = self._report_tensor.tolist()
        return self._report_words

    def report(self) -> DivergenceReport:
        """The decoded report (one device-to-host copy, on first use)."""
        if self._report is None:
            self._report = parse_report(self.report_words(), self._owner.slot_names, call=self.seq,
                                        vocabulary=self._owner.vocabulary)
        return self._report

    def host_decisions(self) -> list[bool]:
        """The decisions as a Python list (on CUDA, waits for the GPU, bounded by the deadline)."""
        self._wait_ready()
        return self.decisions.tolist()

    def _own_poison_reason(self) -> str | None:
        """Why the kernels refuse this rank's input (None: they don't).

        Above 64 ranks the reduced buffer holds only a count of poisoned
        ranks, so a rank learns its own reason by packing and decoding its
        input as a world of one, with the same kernels; only on the error path.
        """
        v, s, t, site, poison = self._inputs
        buf = ops.pack(v, s, t, self.seq, site, self._owner.policy, 0, 1, poison)
        words = ops.decode(buf, v.shape[0], 1, self._owner.policy)[1].tolist()
        mine = parse_report(words, self._owner.slot_names, call=self.seq)
        return mine.poison_reasons.get(0, "unknown reason") if mine.poisoned_count else None

    def _raise_global(self, rep: DivergenceReport) -> None:
        me = self._owner.rank
        if rep.poisoned_count:
            if self._local_problem:
                raise GateInputError(self._local_problem)
            if me in rep.poisoned_ranks:
                raise GateInputError(self._owner._describe_bad_values(self.seq, rep.poison_reasons.get(me)))
            if not rep.exact and self._inputs is not None:
                reason = self._own_poison_reason()
                if reason is not None:
                    raise GateInputError(self._owner._describe_bad_values(self.seq, reason))
            others = [r for r in rep.poisoned_ranks if r != me]
            who = ranks_text(others) if others else f"{rep.poisoned_count} rank(s)"
            why = "; ".join(f"rank {r}: {rep.poison_reasons.get(r, 'unknown reason')}" for r in others)
            raise GatePeerInputError(
                f"esper_gate call {self.seq}: {who} passed bad input"
                f"{f' ({why})' if why else ''}; no slot was transitioned on any rank",
                others, rep.poison_reasons, rep)
        if not rep.header_ok or rep.corrupt:
            raise GateDivergenceError(str(rep), rep)

    def raise_if_diverged(self) -> "GateConsensus":
        """Raise the matching GateError if ranks disagreed on anything; else return self."""
        rep = self.report()
        self._raise_global(rep)
        if not rep.ok:
            raise GateDivergenceError(str(rep), rep)
        return self

    def __repr__(self) -> str:
        return f"GateConsensus(seq={self.seq}, decisions={self.decisions})"
