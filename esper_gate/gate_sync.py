"""GateSync: the object a training loop holds for cross-rank gate consensus.

One ``GateSync`` per (group, slot layout, policy). Each call is one
``torch.ops.esper_gate.sync`` on a dedicated process group, so gate traffic
has its own communicator and never queues behind gradient buckets. Around
the op it keeps what makes failures diagnosable instead of hangs:

* a call counter (``seq``) and a site fingerprint, checked on the wire;
* a configuration exchange through the store at construction, so ranks built
  with different settings all fail on the first call, with no collective;
* heartbeats through the store, written by a background thread (off the hot
  path: a call only assigns two integers), so a collective
  that times out or breaks names the rank that never arrived and the last
  call each rank completed.
"""
from __future__ import annotations

import datetime
import json
import threading
import time
import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from . import ops, wire
from .errors import (GateConfigError, GateDivergenceError, GateError, GateInputError,
                     GatePeerInputError, GateTimeoutError)
from .report import DivergenceReport, _ranks_text, parse_report

__all__ = ["GateSync", "GateConsensus", "site_fingerprint"]

_STORE_PREFIX = "esper_gate"
_HEARTBEAT_INTERVAL_S = 1.0
_HEARTBEAT_POLL_S = 0.2
_DEAD_RANK_GRACE_S = 2.5 * _HEARTBEAT_INTERVAL_S
_HEARTBEAT_SETTLE_S = 0.6


def site_fingerprint(num_slots: int, slot_names: Sequence[str] | None, tag: str = "") -> int:
    """A 32-bit fingerprint of the slot layout (stable across processes)."""
    text = f"{tag}|{num_slots}|" + "\x1f".join(slot_names or [])
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _as_timedelta(timeout) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, (int, float)) and timeout > 0:
        return datetime.timedelta(seconds=float(timeout))
    raise GateInputError(f"timeout must be a positive datetime.timedelta or number of seconds, got {timeout!r}")


class _Heartbeat:
    """Publishes (entered, completed, beat) for this rank in the store.

    A call only assigns two ints: this thread notices the change within
    _HEARTBEAT_POLL_S and does the store round trip, so the hot path never
    waits on the store nor wakes a thread. It also writes at least once per
    _HEARTBEAT_INTERVAL_S, so peers can tell a live rank from a dead one.
    """

    def __init__(self, store, rank: int):
        self._store = store
        self._key = f"hb/{rank}"
        self.entered = 0
        self.completed = 0
        self._beat = 0
        self._stop = threading.Event()
        self._written = self._write()
        self._thread = threading.Thread(target=self._run, name=f"esper_gate-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _write(self) -> tuple[int, int]:
        state = (self.entered, self.completed)
        self._beat += 1
        self._store.set(self._key, f"{state[0]},{state[1]},{self._beat}")
        return state

    def _run(self) -> None:
        failures = 0
        last_write = time.monotonic()
        while not self._stop.wait(_HEARTBEAT_POLL_S):
            now = time.monotonic()
            if (self.entered, self.completed) == self._written and now - last_write < _HEARTBEAT_INTERVAL_S:
                continue
            try:
                self._written = self._write()
                last_write = now
                failures = 0
            except Exception:  # the store went away (rank 0 gone, shutdown)
                failures += 1
                if failures >= 3:
                    break

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * _HEARTBEAT_INTERVAL_S)


def _read_heartbeats(store, world: int) -> dict[int, tuple[int, int, int] | None]:
    out: dict[int, tuple[int, int, int] | None] = {}
    for r in range(world):
        key = f"hb/{r}"
        try:
            if not store.check([key]):
                out[r] = None
                continue
            e, c, b = (int(x) for x in store.get(key).decode().split(","))
            out[r] = (e, c, b)
        except Exception:
            out[r] = None
    return out


class GateConsensus:
    """The result of one GateSync call.

    ``decisions`` and ``diverged`` are tensors on the inputs' device; reading
    them on the host is the consumer's one sync. ``report()`` copies the
    report to the host once, when asked.
    """

    __slots__ = ("_owner", "seq", "decisions", "_report_tensor", "_report", "_report_words", "_diverged",
                 "_local_problem", "_ready")

    def __init__(self, owner: "GateSync", seq: int, decisions: torch.Tensor, report: torch.Tensor,
                 local_problem: str | None = None):
        self._owner = owner
        self.seq = seq
        self.decisions = decisions
        self._report_tensor = report
        self._report: DivergenceReport | None = None
        self._report_words: list[int] | None = None
        self._diverged: torch.Tensor | None = None
        self._local_problem = local_problem
        self._ready = None
        if decisions.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    @property
    def diverged(self) -> torch.Tensor:
        """Bool tensor, true for each slot that was not agreed (never transitioned)."""
        if self._diverged is None:
            n = self.decisions.shape[0]
            status = self._report_tensor[wire.GLOBAL_WORDS: wire.GLOBAL_WORDS + wire.SLOT_WORDS * n]
            status = status.view(n, wire.SLOT_WORDS)[:, wire.S_STATUS]
            self._diverged = (status & wire.STATUS_DIVERGED) != 0
        return self._diverged

    def _wait_ready(self) -> None:
        """Bounded wait for the GPU work of this call (a stuck NCCL collective
        becomes a GateTimeoutError instead of a hang)."""
        if self._ready is None:
            return
        start = time.monotonic()
        deadline = start + self._owner.timeout.total_seconds()
        # A sync takes tens of microseconds on NCCL: spin first, then back off.
        while not self._ready.query():
            now = time.monotonic()
            if now > deadline:
                raise self._owner._diagnose(self.seq, TimeoutError(
                    f"the GPU did not finish call {self.seq} within {self._owner.timeout}"))
            if now - start > 0.005:
                time.sleep(0.0002)

    def report_words(self) -> list[int]:
        """The raw report as host ints (layout in esper_gate.wire; one copy, on first use)."""
        if self._report_words is None:
            self._wait_ready()
            self._report_words = self._report_tensor.tolist()
        return self._report_words

    def report(self) -> DivergenceReport:
        """The decoded report (one device-to-host copy, on first use)."""
        if self._report is None:
            self._report = parse_report(self.report_words(), self._owner.slot_names, call=self.seq)
        return self._report

    def host_decisions(self) -> list[bool]:
        """The decisions as a Python list (bounded wait on CUDA)."""
        if self._ready is not None:
            self._wait_ready()
        return self.decisions.tolist()

    def _raise_global(self, rep: DivergenceReport) -> None:
        me = self._owner.rank
        if rep.poisoned_count:
            if me in rep.poisoned_ranks or self._local_problem:
                raise GateInputError(self._local_problem or self._owner._describe_bad_values(
                    rep.poison_reasons.get(me)))
            others = rep.poisoned_ranks
            who = _ranks_text(others) if others else f"{rep.poisoned_count} rank(s)"
            why = "; ".join(f"rank {r}: {rep.poison_reasons.get(r, 'unknown reason')}" for r in others)
            raise GatePeerInputError(
                f"esper_gate call {self.seq}: {who} passed bad input ({why or 'unknown reason'}); "
                f"no slot was transitioned on any rank", others, rep.poison_reasons, rep)
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


class GateSync:
    """Cross-rank gate consensus for ``num_slots`` slots; build it on every rank.

    Args:
        num_slots: slots synchronized per call (1..1024).
        policy: "unanimous" (default), "rank0", "majority" (strict) or "any".
        group: the ranks that must agree (default: the world).
        timeout: how long a call waits for the slowest rank before raising
            GateTimeoutError naming the ranks that did not arrive.
        slot_names: names used in reports (default "0", "1", ...); they also
            enter the layout fingerprint, so ranks with other names fail.
        device: where results live when inputs are Python sequences (default:
            the current CUDA device for NCCL groups, else the CPU).

    Outside an initialized process group, or in a world of one, it decides
    locally and issues no collective.
    """

    _instances: dict[str, int] = {}

    def __init__(self, num_slots: int, *, policy: str = "unanimous", group=None,
                 timeout=datetime.timedelta(seconds=60), slot_names: Sequence[str] | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or not 1 <= num_slots <= wire.MAX_SLOTS:
            raise GateInputError(f"num_slots must be an int in 1..{wire.MAX_SLOTS}, got {num_slots!r}")
        if policy not in wire.POLICIES:
            raise GateInputError(f"unknown policy {policy!r}, expected one of {', '.join(wire.POLICIES)}")
        if slot_names is not None:
            slot_names = [str(n) for n in slot_names]
            if len(slot_names) != num_slots:
                raise GateInputError(f"slot_names has {len(slot_names)} names for num_slots={num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self.timeout = _as_timedelta(timeout)
        self.slot_names = slot_names or [str(i) for i in range(num_slots)]
        self.site = site_fingerprint(num_slots, slot_names)
        self._seq = 0
        self._broken: str | None = None
        self._config_error: GateConfigError | None = None
        self._heartbeat: _Heartbeat | None = None
        self._group = None
        self.group_name: str | None = None

        parent = group if group is not None else (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if parent is None or dist.get_world_size(parent) == 1:
            self.distributed = False
            self.rank, self.world_size = 0, 1
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            return

        self.distributed = True
        self.ranks = dist.get_process_group_ranks(parent)
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank(parent)
        if self.rank < 0:
            raise GateError("GateSync: this process is not a member of the given group")
        if self.world_size > wire.MAX_WORLD:
            raise GateInputError(f"esper_gate supports up to {wire.MAX_WORLD} ranks, the group has {self.world_size}")
        backend = dist.get_backend(parent)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
        self.device = torch.device(device)

        count = GateSync._instances.get(parent.group_name, 0)
        GateSync._instances[parent.group_name] = count + 1
        self.instance_id = f"{parent.group_name}/{count}"
        from torch.distributed.distributed_c10d import _get_default_store

        self._store = dist.PrefixStore(f"{_STORE_PREFIX}/{self.instance_id}/", _get_default_store())
        self._exchange_config()
        self._group = dist.new_group(ranks=self.ranks, backend=backend, timeout=self.timeout,
                                     use_local_synchronization=True)
        self.group_name = self._group.group_name
        self._heartbeat = _Heartbeat(self._store, self.rank)

    # ---- construction ---------------------------------------------------
    def _config(self) -> dict:
        return {"num_slots": self.num_slots, "policy": self.policy, "site": self.site,
                "world": self.world_size}

    def _exchange_config(self) -> None:
        """Rendezvous through the store (bounded by timeout) and compare settings."""
        self._store.set(f"cfg/{self.rank}", json.dumps(self._config()))
        keys = [f"cfg/{r}" for r in range(self.world_size)]
        try:
            self._store.wait(keys, self.timeout)
        except Exception as e:
            missing = [r for r in range(self.world_size) if not self._store.check([f"cfg/{r}"])]
            raise GateTimeoutError(
                f"GateSync construction: {_ranks_text(missing)} did not arrive within {self.timeout} "
                f"(every rank of the group must construct GateSync; the gate was never reached there). "
                f"No collective was issued.", missing, {r: -1 for r in missing}, call=0) from e
        configs = {r: json.loads(self._store.get(f"cfg/{r}").decode()) for r in range(self.world_size)}
        mine = self._config()
        differing = {r: c for r, c in configs.items() if c != mine}
        if differing:
            lines = [f"rank {r}: num_slots={c['num_slots']}, policy={c['policy']}, slot layout "
                     f"fingerprint={c['site']:#010x}" for r, c in sorted(configs.items())]
            self._config_error = GateConfigError(
                f"GateSync was built with different settings on different ranks "
                f"(this is rank {self.rank}):\n  " + "\n  ".join(lines)
                + "\nEvery rank must pass the same num_slots, policy and slot_names.", configs)

    # ---- calls ----------------------------------------------------------
    def _coerce(self, name: str, value, problems: list, ref_device) -> torch.Tensor | None:
        n = self.num_slots
        if isinstance(value, torch.Tensor):
            t = value
        else:
            try:
                t = torch.tensor([int(x) for x in value], dtype=torch.int64, device=ref_device)
            except (TypeError, ValueError) as e:
                problems.append((wire.REASON_OTHER, f"{name} must be a tensor or a sequence of ints ({e})"))
                return None
        if t.dim() != 1 or t.shape[0] != n:
            problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got {list(t.shape)}"))
            return None
        if t.device != ref_device:
            problems.append((wire.REASON_DEVICE, f"{name} is on {t.device}, expected {ref_device}"))
            return None
        if name == "votes" and t.dtype == torch.bool:
            return t.contiguous()
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            problems.append((wire.REASON_DTYPE, f"{name} must be {'bool or ' if name == 'votes' else ''}"
                                                f"an integer dtype, got {t.dtype}"))
            return None
        return t.to(torch.int64).contiguous()

    def _prepare(self, votes, stages, targets):
        # Fast path: tensors that the op takes as they are.
        n1 = (self.num_slots,)
        if (type(votes) is torch.Tensor and type(stages) is torch.Tensor and type(targets) is torch.Tensor
                and (votes.dtype is torch.bool or votes.dtype is torch.int64)
                and stages.dtype is torch.int64 and targets.dtype is torch.int64
                and votes.shape == n1 and stages.shape == n1 and targets.shape == n1
                and votes.device == stages.device == targets.device
                and votes.is_contiguous() and stages.is_contiguous() and targets.is_contiguous()):
            return votes, stages, targets, 0, None
        ref = next((x.device for x in (votes, stages, targets) if isinstance(x, torch.Tensor)), self.device)
        problems: list = []
        v = self._coerce("votes", votes, problems, ref)
        s = self._coerce("stages", stages, problems, ref)
        t = self._coerce("targets", targets, problems, ref)
        if problems:
            code, _ = problems[0]
            zeros = torch.zeros(self.num_slots, dtype=torch.int64, device=ref)
            text = f"esper_gate call {self._seq + 1} on rank {self.rank}: " + "; ".join(p for _, p in problems)
            return zeros.bool(), zeros, zeros, code, text
        return v, s, t, 0, None

    def _describe_bad_values(self, reason: str | None) -> str:
        return (f"esper_gate call {self._seq} on rank {self.rank}: bad input: {reason or 'unknown'} "
                f"(votes must be 0/1, stage and target ids 0..{wire.MAX_ID})")

    def __call__(self, votes, stages, targets, *, site: int | None = None) -> GateConsensus:
        """One sync of all slots. Every rank of the group must call it, in the same order.

        ``votes`` (bool or 0/1), ``stages`` and ``targets`` (ids 0..63) are
        tensors or sequences of length ``num_slots``. ``site`` overrides the
        layout fingerprint for this call (the per-slot adapter passes the slot
        id's fingerprint so ranks at different slots are told apart).
        """
        if self._broken:
            raise GateError(f"this GateSync is unusable after an earlier failure ({self._broken}); "
                            f"build a new one on every rank")
        if self._config_error is not None:
            raise self._config_error
        v, s, t, poison, problem = self._prepare(votes, stages, targets)
        call_site = self.site if site is None else int(site)
        self._seq += 1
        seq = self._seq
        if not self.distributed:
            buf = ops.pack(v, s, t, seq, call_site, self.policy, 0, 1, poison)
            decision, report = ops.decode(buf, self.num_slots, 1, self.policy)
        else:
            self._heartbeat.entered = seq
            try:
                decision, report = torch.ops.esper_gate.sync.default(
                    v, s, t, seq, call_site, self.policy, self.group_name, poison)
            except Exception as e:
                self._broken = f"call {seq}: {type(e).__name__}"
                raise self._diagnose(seq, e) from e
            self._heartbeat.completed = seq
        result = GateConsensus(self, seq, decision, report, problem)
        if problem is not None:
            raise GateInputError(problem)
        if not decision.is_cuda:
            # CPU results are already on the host: fail fast, in the same call
            # on every rank, for bad input and for ranks at different calls.
            flags = int(report.numpy()[wire.G_FLAGS])
            if not flags & wire.FLAG_HEADER_OK:
                result._raise_global(result.report())
        return result

    def _diagnose(self, seq: int, exc: BaseException) -> GateError:
        """Turn a failed or timed-out collective into an error that names ranks."""
        try:
            beats = _read_heartbeats(self._store, self.world_size)
        except Exception as e:  # the store itself is gone
            return GateError(f"esper_gate call {seq} failed ({exc}) and the store is unreachable "
                             f"({e}); rank 0 hosts it and may be gone")
        missing = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < seq)]
        if missing:
            # heartbeats are written asynchronously: give ranks that arrived
            # just before the failure a moment to show it
            time.sleep(_HEARTBEAT_SETTLE_S)
            beats = _read_heartbeats(self._store, self.world_size)
            missing = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < seq)]
        if not missing:
            # everyone arrived: look for ranks whose heartbeat stopped (dead)
            time.sleep(_DEAD_RANK_GRACE_S)
            later = _read_heartbeats(self._store, self.world_size)
            missing = [r for r in beats if r != self.rank and (later[r] is None or beats[r] is None
                                                                 or later[r][2] == beats[r][2])]
            beats = later
        # Every rank took part in our last call whose collective returned, so
        # it completed at least that one, whatever its heartbeat had time to say.
        done_here = seq - 1
        last = {r: max(b[1] if b is not None else -1, done_here) for r, b in beats.items()}
        if missing:
            done = ", ".join(f"rank {r}: {last[r]}" for r in missing)
            return GateTimeoutError(
                f"esper_gate call {seq}: {_ranks_text(missing)} did not arrive (waited up to "
                f"{self.timeout}); last call completed: {done}. No rank applied a transition for "
                f"this call. Collective error: {exc}", missing, last, call=seq)
        return GateError(f"esper_gate call {seq} failed in the collective: {exc}")

    @property
    def group(self):
        """The dedicated process group gate traffic runs on (None when local)."""
        return self._group

    @property
    def calls(self) -> int:
        """Number of calls made so far (the seq of the last call)."""
        return self._seq

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None

    def __repr__(self) -> str:
        return (f"GateSync(num_slots={self.num_slots}, policy={self.policy!r}, rank={self.rank}, "
                f"world_size={self.world_size}, distributed={self.distributed}, calls={self._seq})")
