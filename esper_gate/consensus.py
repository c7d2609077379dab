"""GateConsensus: what one GateSync call returns."""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import torch

from . import ops, wire
from ._inputs import Prepared, bad_values_text
from ._latch import FailureLatch
from .errors import GateDivergenceError, GateInputError, GatePeerInputError
from .report import MAX_TEXT_GROUPS, DivergenceReport, Vocabulary, bounded_text, parse_report, ranks_text

__all__ = ["GateConsensus", "GateView"]


class GateView(NamedTuple):
    """What a result needs to know of the gate that made it."""
    rank: int
    policy: str
    slot_names: Sequence[str]
    vocabulary: Vocabulary | None = None


class GateConsensus:
    """The result of one GateSync call.

    ``decisions`` and ``diverged`` are tensors on the gate's device; reading
    them on the host is the consumer's one sync. ``report()`` copies the
    report to the host once, when asked. On CUDA, a call that the watcher
    aborted has ``decisions`` all false, and every host read here raises its
    GateTimeoutError.

    The host reads (``host_decisions``, ``report``) give the call's one
    outcome, the same on every rank. The device-side ``decisions`` tensor is
    conservative: on a rank whose deadline passed just as its collective
    completed, it can read all false for a call that stands on every rank
    (the rank invalidated it, then lost the verdict to a peer's completion).

    Args:
        seq: the call number.
        decisions, report: the op's outputs.
        gate: the gate's rank, policy and slot names.
        latch: the gate's failure latch; a read of a failed call raises its failure.
        prepared: this rank's inputs as sent (to name this rank's own bad input).
        ready: a CUDA event recorded after the call, or None on the host.
        verdict: the gate's Verdict, when the call's shared outcome is still to be
            read (CUDA): the first host read confirms it, and raises a failure
            that a peer decided first.
        decoded: decode's decisions before the and-ing with the validity word (None:
            the same as ``decisions``); host reads take these once the verdict is known.
        void: says whether this rank's call is void (invalidated, or its communicator
            aborted): with no store to confirm the call, such a call raises.
    """

    __slots__ = ("seq", "decisions", "_gate", "_latch", "_prepared", "_ready", "_verdict", "_report_tensor",
                 "_report", "_report_words", "_diverged", "_decoded", "_void")

    def __init__(self, seq: int, decisions: torch.Tensor, report: torch.Tensor, *, gate: GateView,
                 latch: FailureLatch | None = None, prepared: Prepared | None = None, ready=None, verdict=None,
                 decoded: torch.Tensor | None = None, void=None):
        self.seq = seq
        self._void = void
        self.decisions = decisions
        self._decoded = decisions if decoded is None else decoded
        self._gate = gate
        self._latch = latch if latch is not None else FailureLatch()
        self._prepared = prepared
        self._ready = ready
        self._verdict = verdict  # confirmed at the first host read (None: confirmed already, or local)
        self._report_tensor = report
        self._report: DivergenceReport | None = None
        self._report_words: list[int] | None = None
        self._diverged: torch.Tensor | None = None

    @property
    def diverged(self) -> torch.Tensor:
        """Bool tensor, true for each slot that was not agreed (never transitioned)."""
        self._latch.raise_for(self.seq)
        if self._diverged is None:
            n = self.decisions.shape[0]
            status = self._report_tensor[wire.GLOBAL_WORDS: wire.GLOBAL_WORDS + wire.SLOT_WORDS * n]
            status = status.view(n, wire.SLOT_WORDS)[:, wire.S_STATUS]
            self._diverged = (status & wire.STATUS_DIVERGED) != 0
        return self._diverged

    def _wait_ready(self) -> None:
        """Wait for this call's GPU work; the watcher bounds the wait (it aborts a
        stuck collective at the deadline), and a failed call raises its error."""
        if self._ready is not None:
            start = time.monotonic()
            # A sync takes tens of microseconds on NCCL: spin first, then back off.
            while not self._ready.query():
                if self._latch.failed_at(self.seq):
                    break
                if time.monotonic() - start > 0.005:
                    time.sleep(0.0002)
        self._latch.raise_for(self.seq)
        if self._verdict is not None:
            self._verdict.confirm(self.seq, self._latch, void=self._void)
            self._verdict = None

    def report_words(self) -> list[int]:
        """The raw report as host ints (layout in esper_gate.wire; one copy, on first use)."""
        if self._report_words is None:
            self._wait_ready()
            self._report_words = self._report_tensor.tolist()
        return self._report_words

    def report(self) -> DivergenceReport:
        """The decoded report (one device-to-host copy, on first use)."""
        if self._report is None:
            self._report = parse_report(self.report_words(), self._gate.slot_names, call=self.seq,
                                        vocabulary=self._gate.vocabulary)
        return self._report

    def host_decisions(self) -> list[bool]:
        """The decisions as a Python list (on CUDA, waits for the GPU, bounded by the deadline):
        the call's shared outcome, read after its verdict (see the class's note)."""
        self._wait_ready()
        return self._decoded.tolist()

    def _own_poison_reason(self) -> str | None:
        """Why the kernels refuse this rank's input (None: they don't).

        Above 64 ranks the reduced buffer counts several poisoned ranks per
        reason but names none of them, so a rank learns its own reason by
        packing and decoding its input as a world of one, with the same
        kernels; only on the error path.
        """
        p, policy = self._prepared, self._gate.policy
        buf = ops.pack(p.votes, p.stages, p.targets, self.seq, p.site, policy, 0, 1, p.poison, p.policies, p.digests)
        words = ops.decode(buf, p.votes.shape[0], 1, policy)[1].tolist()
        mine = parse_report(words, self._gate.slot_names, call=self.seq)
        return mine.poison_reasons.get(0, "unknown reason") if mine.poisoned_count else None

    def raise_if_call_failed(self) -> "GateConsensus":
        """Raise what failed the whole call on every rank (bad input on some rank, ranks
        at different calls, a corrupt buffer); else return self. Slot divergence is
        not a failure of the call: ``raise_if_diverged`` raises it too."""
        if self._report is None and not self._report_tensor.is_cuda:
            # On the host the flags word says it without parsing the report.
            self._latch.raise_for(self.seq)
            if int(self._report_tensor.numpy()[wire.G_FLAGS]) & wire.FLAG_HEADER_OK:  # numpy: no 0-d tensor
                return self
        rep = self.report()
        me = self._gate.rank
        where = f"esper_gate call {self.seq} on rank {me}"
        if rep.poisoned_count:
            if self._prepared is not None and self._prepared.problem:
                raise GateInputError(self._prepared.problem)
            if me in rep.poisoned_ranks:
                raise GateInputError(bad_values_text(where, rep.poison_reasons.get(me)))
            if not rep.exact and self._prepared is not None:
                reason = self._own_poison_reason()
                if reason is not None:
                    raise GateInputError(bad_values_text(where, reason))
            others = [r for r in rep.poisoned_ranks if r != me]
            who = ranks_text(others) if others else f"{rep.poisoned_count} rank(s)"
            groups = [(reason, [r for r in ranks if r != me]) for reason, ranks in rep.poison_groups()]
            groups = [(reason, ranks) for reason, ranks in groups if ranks]
            named = [f"{ranks_text(ranks)}: {reason}" for reason, ranks in groups[:MAX_TEXT_GROUPS]]
            if len(groups) > MAX_TEXT_GROUPS:
                named.append(f"… and {len(groups) - MAX_TEXT_GROUPS} more reason(s)")
            # Above 64 ranks several poisoned ranks go unnamed; their reasons arrive counted.
            why = "; ".join(named) if groups else rep.reason_counts_text()
            raise GatePeerInputError(bounded_text(
                f"esper_gate call {self.seq}: {who} passed bad input"
                f"{f' ({why})' if why else ''}; no slot was transitioned on any rank"),
                others, rep.poison_reasons, rep)
        if not rep.header_ok or rep.corrupt:
            raise GateDivergenceError(str(rep), rep)
        return self

    def raise_if_diverged(self) -> "GateConsensus":
        """Raise the matching GateError if ranks disagreed on anything; else return self."""
        rep = self.raise_if_call_failed().report()
        if not rep.ok:
            raise GateDivergenceError(str(rep), rep)
        return self

    def __repr__(self) -> str:
        return f"GateConsensus(seq={self.seq}, decisions={self.decisions})"
