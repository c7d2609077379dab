"""Diagnosis: which ranks a failed call names, and why, from the ranks' heartbeats.

It knows nothing of threads, groups or results: it reads heartbeats through
the function it is given and sleeps through the one it is given, so tests
drive it with a dict and a fake clock.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ._inputs import timeout_text
from ._store import StoreUnresponsive
from .errors import GateError, GateTimeoutError
from .report import ranks_text

__all__ = ["Diagnosis", "short", "SETTLE_S", "DEAD_RANK_GRACE_S", "BOUND_S"]

# Heartbeats are written asynchronously, once a second (_watcher.HEARTBEAT_INTERVAL_S)
# unless a call waits long: a rank that arrived just before the failure, and whose
# call completed at once, may need this long to show it.
SETTLE_S = 1.2
# Longer than two heartbeat intervals (_watcher.HEARTBEAT_INTERVAL_S = 1 s):
# a rank whose beat did not move in this time is dead or frozen.
DEAD_RANK_GRACE_S = 2.5
# Longest a diagnosis takes (settle, the dead-rank grace, store round trips):
# a caller whose collective failed waits this long at most for the verdict.
BOUND_S = SETTLE_S + DEAD_RANK_GRACE_S + 2.0
# A rank is named late when it says it has waited this much less than this
# rank's wait minus the timeout: more than its heartbeat can be stale
# (_watcher.LONG_CALL_POLL_S) plus a store round trip and a poll.
LATE_SLACK_S = 0.15
# A stop of this process (Watcher.stalled_s) this long before its call (beyond the
# timeout) still counts as the reason its peers gave up on the call.
STALL_WINDOW_S = 5.0

# What the op raises before its collective: structural checks, an unknown
# (destroyed) group, no memory. Errors of the collective itself are others.
LOCAL_FAILURES = (ValueError, TypeError, torch.OutOfMemoryError)

Beats = dict  # rank -> (entered, completed, beat) or None (never written)


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Diagnosis:
    """Names the ranks behind a failed call of one gate.

    Args:
        read_heartbeats: ``world -> {rank: (entered, completed, beat) | None}``;
            raises when the store is gone.
        rank, world: this rank in the gate's group, and the group's size.
        store_host: the group rank whose process hosts the store, or None when
            that process is outside the group.
        timeout: the gate's timeout, for the messages.
        sleep: how to wait (injectable for tests).
        read_whereabouts: ``ranks -> {rank: (gate, call, completed) | None}``, where each
            rank last was among the parent group's gates (``_watcher.Whereabouts``); raises
            when the store is gone.
        gate_index: this gate's index among them.
    """

    def __init__(self, read_heartbeats: Callable[[int], Beats], rank: int, world: int,
                 store_host: int | None, timeout, sleep: Callable[[float], None] = time.sleep,
                 read_whereabouts: Callable | None = None, gate_index: int = 0,
                 clock: Callable[[], float] = time.monotonic, stalled: Callable[[float], float] | None = None):
        self._read = read_heartbeats
        # since -> the longest stop of this process that ended after ``since`` (Watcher.stalled_s)
        self._stalled = stalled
        self._read_where = read_whereabouts
        self._clock = clock
        self.gate_index = gate_index
        self.rank = rank
        self.world = world
        self.store_host = store_host
        self.timeout = timeout
        self._sleep = sleep

    def _absent(self, beats: Beats, seq: int) -> list[int]:
        return [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < seq)]

    def _late(self, beats: Beats, seq: int, waited_s: float | None) -> dict[int, float]:
        """{rank: seconds} for ranks that entered call ``seq`` after this rank's deadline,
        by how long each says it has waited there (``waited_s``: this rank's own wait)."""
        if waited_s is None:
            return {}
        timeout_s = self.timeout.total_seconds()
        late = {}
        for r, b in beats.items():
            if r == self.rank or b is None or b[0] != seq or len(b) < 4 or b[3] < 0:
                continue
            lateness = waited_s - timeout_s - b[3] / 1000
            if lateness > LATE_SLACK_S:
                late[r] = lateness
        return late

    def diagnose(self, seq: int, exc: BaseException, completed_here: int, started: float | None = None) -> GateError:
        """The error for call ``seq`` whose collective failed with ``exc``;
        ``completed_here``: the last call this rank saw complete (every rank took part in
        it); ``started``: when this rank made the call (``clock`` time), to tell late ranks."""
        if isinstance(exc, LOCAL_FAILURES):
            # Raised before the collective: the peers are waiting for this rank.
            return GateTimeoutError(
                f"esper_gate call {seq}: rank {self.rank} did not arrive at the collective: its op failed "
                f"before it ({short(exc)}). No rank applied a transition for this call.", [self.rank],
                {self.rank: completed_here}, call=seq)
        if self._stalled is not None and started is not None:
            stalled = self._stalled(started - self.timeout.total_seconds() - STALL_WINDOW_S)
            if stalled >= min(self.timeout.total_seconds(), DEAD_RANK_GRACE_S):
                return self.stopped_here(seq, stalled, exc)
        try:
            beats = self._read(self.world)
            missing = self._absent(beats, seq)
            absent_first = missing
            if missing:
                self._sleep(SETTLE_S)
                beats = self._read(self.world)
                missing = self._absent(beats, seq)
            late = {} if missing else self._late(beats, seq, None if started is None else self._clock() - started)
            if not missing and not late:
                # Absent after this rank's deadline, then done with the call within the
                # settling time: it came after the deadline (its collective may even have
                # completed against this rank's contribution, after the call was failed).
                late = {r: 0.0 for r in absent_first if beats[r] is not None and beats[r][1] >= seq}
            if late:
                return self._late_error(seq, late, beats, completed_here, exc)
            if not missing:
                # every rank arrived: name those whose heartbeat stopped (dead or frozen)
                self._sleep(DEAD_RANK_GRACE_S)
                later = self._read(self.world)
                missing = [r for r in beats if r != self.rank and (later[r] is None or beats[r] is None
                                                                     or later[r][2] == beats[r][2])]
                beats = later
        except Exception as store_exc:  # noqa: BLE001 - the store itself is gone
            return self.store_gone(seq, store_exc, exc)
        last = {r: max(b[1] if b is not None else -1, completed_here) for r, b in beats.items()}
        what = "GateSync construction" if seq == 0 else f"esper_gate call {seq}"
        if missing:
            done = ", ".join(f"rank {r}: {last[r] if last[r] >= 0 else 'none'}" for r in missing)
            elsewhere = self._elsewhere(missing)
            absent = [r for r in missing if r not in elsewhere]
            parts = [f"rank {r} is waiting in gate #{g} of this group (its call {c} there), not in this gate "
                     f"(#{self.gate_index}; were the gates built in a different order on different ranks?)"
                     for r, (g, c) in sorted(elsewhere.items())[:3]]
            if absent:
                parts.insert(0, f"{ranks_text(absent)} did not arrive (waited up to {timeout_text(self.timeout)})")
            return GateTimeoutError(
                f"{what}: {'; '.join(parts)}. Last call completed: {done}. No rank applied a transition for this "
                f"call. Collective error: {short(exc)}", missing, last, call=seq)
        return GateError(f"{what} failed in the collective: {short(exc)}")

    def _elsewhere(self, missing: list[int]) -> dict[int, tuple[int, int]]:
        """{rank: (gate, call)} for missing ranks waiting in a call of another gate on the
        same parent group (gates built in different orders on different ranks): the call
        they entered last, not completed there. A rank that completed its last call
        elsewhere is waiting nowhere: it did not arrive."""
        if self._read_where is None:
            return {}
        try:
            where = self._read_where(missing)
        except Exception:  # noqa: BLE001 - a hint only; a dead store is named elsewhere
            return {}
        return {r: (w[0], w[1]) for r, w in where.items()
                if w is not None and w[0] >= 0 and w[0] != self.gate_index and not w[2]}

    def _late_error(self, seq, late, beats, completed_here, exc) -> GateTimeoutError:
        ranks = sorted(late)
        last = {r: max(b[1] if b is not None else -1, completed_here) for r, b in beats.items()}
        err = GateTimeoutError(
            f"esper_gate call {seq}: {ranks_text(ranks)} arrived too late: after this rank had waited "
            f"{timeout_text(self.timeout)}. No rank applied a transition for this call. Collective error: "
            f"{short(exc)}", ranks, last, call=seq)
        err.late_ranks = ranks  # in the call: they read this verdict, and the store's host waits for that
        return err

    def stopped_here(self, seq: int, stalled_s: float, exc: BaseException) -> GateTimeoutError:
        """This process was stopped (SIGSTOP, a debugger) or starved for ``stalled_s`` around the
        call: its peers' deadlines passed while it could not answer, so it names itself, as they do."""
        host = " (it hosts the job's store, so no rank's store request was answered meanwhile)" \
            if self.store_host == self.rank else ""
        return GateTimeoutError(
            f"esper_gate call {seq}: rank {self.rank} was stopped or starved for {stalled_s:.1f} s around this call"
            f"{host}, longer than its peers wait ({timeout_text(self.timeout)}). No rank applied a transition for "
            f"this call. Collective error: {short(exc)}", [self.rank], {self.rank: None}, call=seq)

    def store_gone(self, seq: int, store_exc: BaseException, exc: BaseException) -> GateTimeoutError:
        host = self.store_host
        who = f"rank {host}" if host is not None else "global rank 0 (outside this group)"
        missing = [host] if host is not None else []
        what = "GateSync construction" if seq == 0 else f"esper_gate call {seq}"
        if isinstance(store_exc, StoreUnresponsive):
            text = (f"{what}: {who}, which hosts the job's store, has not answered for {store_exc.seconds:.1f} s "
                    f"(stopped or overloaded?).")
        else:
            text = (f"{what}: {who} did not arrive: it hosts the job's store, which stopped answering "
                    f"({short(store_exc)}), so that process has most likely died.")
        return GateTimeoutError(
            f"{text} No rank applied a transition for this call. Collective error: {short(exc)}", missing,
            {r: None for r in missing}, call=seq)
