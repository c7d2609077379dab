"""GateSync: the object a training loop holds for cross-rank gate consensus.

A sync, end to end: ``GateSync.__call__`` (this file) turns the inputs into
tensors the op takes, notes the call's deadline for the watcher
(``_watcher.py``), and calls ``torch.ops.esper_gate.sync`` (csrc/ops.cpp:
pack, one all_reduce on the dedicated group, decode); the result is a
``GateConsensus`` (``consensus.py``), whose reads raise what went wrong.

One ``GateSync`` per (group, slot layout, policy). Each call is one
``torch.ops.esper_gate.sync`` on a dedicated process group, so gate traffic
has its own communicator (on NCCL, its own high-priority stream) and never
queues behind gradient buckets. Around the op it keeps what turns failures
into named errors instead of hangs or crashes:

* a call counter (``seq``) and a site fingerprint, checked on the wire;
* a configuration exchange through the store at construction, so ranks built
  with different settings all fail on the first call, with no collective;
* a watcher thread per GateSync. A call only assigns an int and appends to a
  deque; the thread publishes heartbeats (entered, completed) in the store,
  marks CUDA calls completed when the GPU has finished them, and, when the
  oldest unfinished call passes its deadline (measured from the call), names
  the ranks that never arrived and aborts the stuck collective, whether or
  not anyone is reading the result. The group's own timeout is set past that
  deadline, so NCCL's watchdog (which ends the process) never fires first.
"""
from __future__ import annotations

import datetime
import json
import logging
import operator
import os
import threading
import time
import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from . import ops, wire
from .errors import GateConfigError, GateError, GateInputError, GateTimeoutError
from ._watcher import _HEARTBEAT_INTERVAL_S, _Call, _read_heartbeats, _Watcher
from .consensus import GateConsensus
from .report import ranks_text

__all__ = ["GateSync", "GateConsensus", "site_fingerprint"]

log = logging.getLogger("esper_gate")

_STORE_PREFIX = "esper_gate"
_DEAD_RANK_GRACE_S = 2.5 * _HEARTBEAT_INTERVAL_S
_HEARTBEAT_SETTLE_S = 0.6
# Longest a diagnosis takes (settle, then the dead-rank grace, plus store
# round trips): a caller whose collective failed waits this long at most for
# the watcher's verdict.
_DIAGNOSIS_BOUND_S = _HEARTBEAT_SETTLE_S + _DEAD_RANK_GRACE_S + 2.0
# gloo raises in the caller's thread when its timeout passes and leaves the
# process running, so its group timeout can be the gate's own. Every other
# backend (NCCL first) is aborted by the watcher at the gate's deadline, and
# its group timeout lies this far past it: NCCL's watchdog ends the process
# when that timeout passes (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the default).
_SELF_TIMING_BACKENDS = ("gloo",)
_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_GROUP_TIMEOUT_MARGIN = datetime.timedelta(seconds=60)
_UINT32 = 0xFFFFFFFF


def site_fingerprint(num_slots: int, slot_names: Sequence[str] | None, tag: str = "") -> int:
    """A 32-bit fingerprint of the slot layout (stable across processes)."""
    text = f"{tag}|{num_slots}|" + "\x1f".join(slot_names or [])
    return zlib.crc32(text.encode("utf-8")) & _UINT32


def _as_timedelta(timeout) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
        return timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return datetime.timedelta(seconds=float(timeout))
    raise GateInputError(f"timeout must be a positive datetime.timedelta or number of seconds, got {timeout!r}")


def _device_backend(backend: str, device_type: str) -> str:
    """The backend that serves ``device_type`` ("cpu:gloo,cuda:nccl" -> "gloo" for cpu)."""
    if ":" not in backend:
        return backend
    pairs = dict(part.split(":", 1) for part in backend.split(","))
    return pairs.get(device_type, backend)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class GateSync:
    """Cross-rank gate consensus for ``num_slots`` slots; build it on every rank.

    Args:
        num_slots: slots synchronized per call (1..1024).
        policy: "unanimous" (default), "rank0", "majority" (strict) or "any".
        group: the ranks that must agree (default: the world).
        timeout: how long a call (and the construction) waits for the slowest
            rank before raising GateTimeoutError naming the ranks that did not
            arrive.
        slot_names: names used in reports (default "0", "1", ...); they also
            enter the layout fingerprint, so ranks with other names fail.
        device: the device of the inputs and results (default: the current
            CUDA device for NCCL groups, else the CPU). Inputs on another
            device are bad input, reported on every rank in the same call.
        backend: the backend of the dedicated group (default: the group's).
        vocabulary: a ``report.Vocabulary`` naming stage and target ids in
            reports (default: the ids themselves, "stage 3 -> target 2").

    Construction is collective: a store rendezvous, a dedicated group and
    one warm-up sync that creates its communicator, all bounded by
    ``timeout``. Outside an initialized process group, or in a world of one,
    it decides locally and issues no collective.
    """

    # parent group name -> GateSyncs built on it so far; the same on every rank
    # because a construction counts only once every rank has finished it.
    _built: dict[str, int] = {}

    def __init__(self, num_slots: int, *, policy: str = "unanimous", group=None,
                 timeout=datetime.timedelta(seconds=60), slot_names: Sequence[str] | None = None,
                 device: torch.device | str | None = None, backend: str | None = None, vocabulary=None):
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
        self._timeout_s = self.timeout.total_seconds()
        self.slot_names = slot_names or [str(i) for i in range(num_slots)]
        self.vocabulary = vocabulary
        self.site = site_fingerprint(num_slots, slot_names)
        self._seq = 0
        self._failure: GateError | None = None
        self._failure_seq: int | None = None
        self._failure_lock = threading.Lock()
        self._failure_ready = threading.Event()
        self._failure_delivered = False
        self._config_error: GateConfigError | None = None
        self._watcher: _Watcher | None = None
        self._group = None
        self._valid: torch.Tensor | None = None
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
        self.backend = str(backend) if backend is not None else str(dist.get_backend(parent))
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in self.backend else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._self_timing = _device_backend(self.backend, self.device.type) in _SELF_TIMING_BACKENDS
        self.group_timeout = self.timeout if self._self_timing else self.timeout + max(
            _GROUP_TIMEOUT_MARGIN, self.timeout)
        self._build(parent)

    # ---- construction ---------------------------------------------------
    def _config(self) -> dict:
        return {"num_slots": self.num_slots, "policy": self.policy, "site": self.site,
                "world": self.world_size}

    def _build(self, parent) -> None:
        from torch.distributed.distributed_c10d import _get_default_store

        base = dist.PrefixStore(f"{_STORE_PREFIX}/{parent.group_name}/", _get_default_store())
        built = GateSync._built.get(parent.group_name, 0)
        # The rendezvous of a construction that timed out on some rank is
        # abandoned (its epoch is bumped), so a rank that arrives late never
        # pairs with keys left by ranks that gave up, and "build a new one on
        # every rank" meets on the new epoch.
        self._epoch_key = f"{built}/epoch"
        self._epoch_store = base
        epoch = int(base.add(self._epoch_key, 0))
        self._epoch = epoch
        self.instance_id = f"{parent.group_name}/{built}.{epoch}"
        self._store = dist.PrefixStore(f"{built}.{epoch}/", base)
        self._exchange_config()
        self._watcher = _Watcher(self._store, self.rank, self._expire,
                                 self._group_failed if self.device.type == "cuda" else None)
        try:
            self._group = self._new_group(parent)
            self.group_name = self._group.group_name
            if self.device.type == "cuda":
                self._valid = torch.ones(1, dtype=torch.bool, device=self.device)
            if self._config_error is None:  # ranks with other slot counts would all_reduce other sizes
                self._warm_up()
        except BaseException as e:
            self._abandon()
            if self._failure is not None:
                raise self._failure from e
            raise
        GateSync._built[parent.group_name] = built + 1

    def _abandon(self) -> None:
        """Undo a construction that failed on this rank, so that a rebuild on
        every rank meets again: a new rendezvous epoch, and no half-built group
        left to shift the names of later groups."""
        try:
            self._epoch_store.compare_set(self._epoch_key, str(self._epoch), str(self._epoch + 1))
        except Exception:  # noqa: BLE001 - the store is gone; nothing left to meet on
            pass
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._group is not None:
            try:
                if not self._self_timing:
                    self._abort_group()
                dist.destroy_process_group(self._group)
            except Exception:  # noqa: BLE001
                pass
            self._group = None

    def _exchange_config(self) -> None:
        """Rendezvous through the store (bounded by timeout) and compare settings."""
        self._store.set(f"cfg/{self.rank}", json.dumps(self._config()))
        keys = [f"cfg/{r}" for r in range(self.world_size)]
        try:
            self._store.wait(keys, self.timeout)
            if int(self._epoch_store.add(self._epoch_key, 0)) != self._epoch:
                raise TimeoutError("another rank gave up on this rendezvous")
        except Exception as e:
            missing = [r for r in range(self.world_size) if not self._safe_check(f"cfg/{r}")]
            self._abandon()
            raise GateTimeoutError(
                f"GateSync construction: {ranks_text(missing) if missing else 'a rank'} did not arrive "
                f"within {self.timeout} (every rank of the group must construct GateSync; the gate was "
                f"never reached there). No collective was issued; build a new GateSync on every rank to "
                f"retry.", missing, {r: -1 for r in missing}, call=0) from e
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

    def _safe_check(self, key: str) -> bool:
        try:
            return bool(self._store.check([key]))
        except Exception:  # noqa: BLE001
            return False

    def _new_group(self, parent):
        if self.backend != "nccl":
            return dist.new_group(ranks=self.ranks, backend=self.backend, timeout=self.group_timeout,
                                  use_local_synchronization=True)
        # * A high-priority stream comes from its own per-device pool, apart
        #   from the one every default-priority group and torch.cuda.Stream()
        #   draw from (c10/cuda/CUDAStream.h); docs/integrating-esper.md says
        #   what that guarantees.
        # * device_id makes new_group create the communicator now, while every
        #   rank has just met at the rendezvous (distributed_c10d.py, 2.14:
        #   _new_process_group_helper -> eager_connect_single_device).
        # * ProcessGroupNCCL reads TORCH_NCCL_ASYNC_ERROR_HANDLING in its
        #   constructor (ProcessGroupNCCL.hpp:67-72, 165-179). With the default
        #   3, an error NCCL sees on gate traffic (a peer's socket closing)
        #   ends the process; 2 aborts the gate's communicator instead, and
        #   GateSync turns that into a named error.
        opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        saved = os.environ.get(_NCCL_ERROR_HANDLING)
        os.environ[_NCCL_ERROR_HANDLING] = "2"
        try:
            return dist.new_group(ranks=self.ranks, backend="nccl", timeout=self.group_timeout,
                                  use_local_synchronization=True, pg_options=opts, device_id=self.device)
        finally:
            if saved is None:
                os.environ.pop(_NCCL_ERROR_HANDLING, None)
            else:
                os.environ[_NCCL_ERROR_HANDLING] = saved

    def _warm_up(self) -> None:
        """One sync at construction: it creates the communicator (NCCL sets
        it up lazily on the first collective, which blocks the host) and loads
        the kernels, under the gate's deadline, so that the first gate call
        costs what every later one does."""
        zeros = torch.zeros(self.num_slots, dtype=torch.int64, device=self.device)
        call = self._watcher.begin(0, time.monotonic() + self._timeout_s)
        try:
            decision, _report = torch.ops.esper_gate.sync.default(
                zeros.bool(), zeros, zeros, 0, self.site, self.policy, self.group_name, 0)
        except Exception as e:
            raise self._fail_from_caller(0, e) from e
        if decision.is_cuda:
            call.event = torch.cuda.Event()
            call.event.record()
            while not call.event.query():
                if self._failed_at(0):
                    break
                time.sleep(0.0005)
            self._raise_if_failed(0)
        else:
            self._watcher.end_host(0)

    # ---- failures -------------------------------------------------------
    def _failed_at(self, seq: int) -> bool:
        return self._failure_seq is not None and seq >= self._failure_seq

    def _raise_if_failed(self, seq: int) -> None:
        if self._failure is not None and self._failure_seq is not None and seq >= self._failure_seq:
            self._failure_delivered = True
            raise self._failure

    def _fail(self, seq: int, err: GateError) -> GateError:
        """Record the first failure of this GateSync; later calls raise it."""
        with self._failure_lock:
            if self._failure is not None:
                return self._failure
            self._failure = err
            self._failure_seq = seq
        self._failure_ready.set()
        return err

    def _call_completed(self, call: _Call) -> bool:
        if call.event is not None:
            return call.event.query() and not self._group_failed()
        return self._watcher is not None and self._watcher.completed >= call.seq

    def _expire(self, call: _Call) -> None:
        """The watcher's deadline for ``call`` passed: name the missing ranks,
        make the call's results say no, abort the stuck collective."""
        seq = call.seq
        try:
            err = self._diagnose(seq, TimeoutError(
                f"call {seq} did not complete within {self.timeout} of being made"))
        except Exception as e:  # noqa: BLE001 - the verdict must come out whatever happens
            err = GateError(f"esper_gate call {seq} did not complete within {self.timeout} ({_short(e)})")
        if self._call_completed(call):
            # The last rank arrived while the diagnosis gave its heartbeat time
            # to land: the collective finished, on every rank, so nothing failed.
            self._watcher.expired = False
            return
        err = self._fail(seq, err)
        if self._valid is not None:
            self._invalidate_device_results()
        if not self._self_timing:
            self._abort_group()
        log.error("%s", err)

    def _invalidate_device_results(self) -> None:
        # Clears the flag that every CUDA call's decisions are and-ed with,
        # on a side stream (the caller's stream may be stuck behind the
        # collective) and before the abort lets that stream move on.
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream(device=self.device)
                with torch.cuda.stream(side):
                    self._valid.fill_(False)
                side.synchronize()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: could not clear the result flag on %s", self.device)

    def _group_failed(self) -> bool:
        """Whether the backend reports an error on the gate's group (NCCL's
        watchdog aborted it). False when it cannot tell."""
        group = self._group
        if group is None:
            return False
        try:
            from torch._C._distributed_c10d import ErrorType

            return group._get_backend(self.device).get_error() != ErrorType.SUCCESS
        except Exception:  # noqa: BLE001 - a backend without error reporting
            return False

    def _abort_group(self) -> None:
        try:
            self._group.abort()
        except Exception:  # noqa: BLE001
            log.exception("esper_gate: aborting the gate's process group failed")

    def _fail_from_caller(self, seq: int, exc: BaseException) -> GateError:
        """The collective raised in the caller's thread: the watcher's verdict
        when it made one (its abort raised this), else a diagnosis here."""
        if self._watcher is not None and self._watcher.expired:
            self._failure_ready.wait(_DIAGNOSIS_BOUND_S)
        if self._failure is not None:
            return self._failure
        return self._fail(seq, self._diagnose(seq, exc))

    def _store_host(self) -> int | None:
        """The group rank whose process hosts the store (global rank 0), if in the group."""
        return self.ranks.index(0) if 0 in self.ranks else None

    def _store_gone(self, seq: int, store_exc: BaseException, exc: BaseException) -> GateTimeoutError:
        host = self._store_host()
        who = f"rank {host}" if host is not None else "global rank 0 (outside this group)"
        missing = [host] if host is not None else []
        return GateTimeoutError(
            f"esper_gate call {seq}: {who} did not arrive: it hosts the job's store, which stopped "
            f"answering ({_short(store_exc)}), so that process has most likely died. No rank applied a "
            f"transition for this call. Collective error: {_short(exc)}", missing,
            {r: None for r in missing}, call=seq)

    def _diagnose(self, seq: int, exc: BaseException) -> GateError:
        """Turn a failed or timed-out collective into an error that names ranks."""
        watcher = self._watcher
        if watcher is not None:
            read = watcher.read_heartbeats
        else:
            def read(world):
                return _read_heartbeats(self._store, world)
        try:
            beats = read(self.world_size)
            missing = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < seq)]
            if missing:
                # heartbeats are written asynchronously: give ranks that arrived
                # just before the failure a moment to show it
                time.sleep(_HEARTBEAT_SETTLE_S)
                beats = read(self.world_size)
                missing = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < seq)]
            if not missing:
                # everyone arrived: look for ranks whose heartbeat stopped (dead)
                time.sleep(_DEAD_RANK_GRACE_S)
                later = read(self.world_size)
                missing = [r for r in beats if r != self.rank and (later[r] is None or beats[r] is None
                                                                     or later[r][2] == beats[r][2])]
                beats = later
        except Exception as store_exc:  # noqa: BLE001 - the store itself is gone
            return self._store_gone(seq, store_exc, exc)
        # Every rank took part in our last call whose collective returned, so
        # it completed at least that one, whatever its heartbeat had time to say.
        done_here = self._watcher.completed if self._watcher is not None else seq - 1
        last = {r: max(b[1] if b is not None else -1, done_here) for r, b in beats.items()}
        what = "GateSync construction" if seq == 0 else f"esper_gate call {seq}"
        if missing:
            done = ", ".join(f"rank {r}: {last[r]}" for r in missing)
            return GateTimeoutError(
                f"{what}: {ranks_text(missing)} did not arrive (waited up to "
                f"{self.timeout}); last call completed: {done}. No rank applied a transition for "
                f"this call. Collective error: {_short(exc)}", missing, last, call=seq)
        return GateError(f"{what} failed in the collective: {_short(exc)}")

    # ---- calls ----------------------------------------------------------
    def _coerce(self, name: str, value, problems: list) -> torch.Tensor | list[int] | None:
        """A 1-D int64 (or bool votes) tensor on the gate's device, a list of
        ints to be copied there, or None after noting the problem."""
        n = self.num_slots
        if isinstance(value, torch.Tensor):
            t = value
            if t.device != self.device:
                problems.append((wire.REASON_DEVICE, f"{name} is on {t.device}, expected {self.device}"))
                return None
            if t.dim() != 1 or t.shape[0] != n:
                problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got {list(t.shape)}"))
                return None
            if name == "votes" and t.dtype == torch.bool:
                return t.contiguous()
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                problems.append((wire.REASON_DTYPE, f"{name} must be {'bool or ' if name == 'votes' else ''}"
                                                    f"an integer dtype, got {t.dtype}"))
                return None
            return t.to(torch.int64).contiguous()
        try:
            items = [operator.index(x) for x in value]
        except TypeError as e:
            kind = type(value).__name__
            problems.append((wire.REASON_DTYPE, f"{name} must be a tensor or a sequence of ints, got {kind} "
                                                f"({e})"))
            return None
        if len(items) != n:
            problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got [{len(items)}]"))
            return None
        lo, hi = (0, 1) if name == "votes" else (0, wire.MAX_ID)
        if any(x < lo or x > hi for x in items):
            # the kernel names the reason; values past int64 cannot reach it
            items = [min(max(x, -1), wire.MAX_ID + 1) for x in items]
        return items

    def _to_device(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Lists to int64 tensors on the gate's device, in one copy that does not
        block the host (pinned staging on CUDA)."""
        if self.device.type == "cuda":
            staged = torch.tensor(rows, dtype=torch.int64, pin_memory=True)
            packed = staged.to(self.device, non_blocking=True)
        else:
            packed = torch.tensor(rows, dtype=torch.int64)
        return list(packed.unbind(0))

    def _prepare(self, votes, stages, targets, site):
        """(votes, stages, targets, site, poison, problem): always tensors the op
        takes, so that no error lies between "entered" and the collective."""
        n1 = (self.num_slots,)
        dev = self.device
        if site is None:
            site = self.site
        elif not (type(site) is int and 0 <= site <= _UINT32):
            try:
                site = operator.index(site)
            except TypeError:
                site = -1
        # Fast path: tensors that the op takes as they are.
        if (type(votes) is torch.Tensor and type(stages) is torch.Tensor and type(targets) is torch.Tensor
                and (votes.dtype is torch.bool or votes.dtype is torch.int64)
                and stages.dtype is torch.int64 and targets.dtype is torch.int64
                and votes.shape == n1 and stages.shape == n1 and targets.shape == n1
                and votes.device == dev and stages.device == dev and targets.device == dev
                and votes.is_contiguous() and stages.is_contiguous() and targets.is_contiguous()
                and 0 <= site <= _UINT32):
            return votes, stages, targets, site, 0, None
        problems: list = []
        coerced = [self._coerce(name, x, problems)
                   for name, x in (("votes", votes), ("stages", stages), ("targets", targets))]
        if not 0 <= site <= _UINT32:
            problems.append((wire.REASON_SITE, f"site must be an int in 0..2**32-1, got {site!r}"))
        if problems:
            code, _ = problems[0]
            zeros = torch.zeros(self.num_slots, dtype=torch.int64, device=dev)
            text = f"esper_gate call {self._seq + 1} on rank {self.rank}: " + "; ".join(p for _, p in problems)
            return zeros.bool(), zeros, zeros, 0, code, text
        lists = [i for i, c in enumerate(coerced) if isinstance(c, list)]
        if lists:
            moved = self._to_device([coerced[i] for i in lists])
            for i, t in zip(lists, moved):
                coerced[i] = t
        v, s, t = coerced
        return v, s, t, site, 0, None

    def _describe_bad_values(self, seq: int, reason: str | None) -> str:
        return (f"esper_gate call {seq} on rank {self.rank}: bad input: {reason or 'unknown reason'} "
                f"(votes must be 0/1, stage and target ids 0..{wire.MAX_ID})")

    def __call__(self, votes, stages, targets, *, site: int | None = None) -> GateConsensus:
        """One sync of all slots. Every rank of the group must call it, in the same order.

        ``votes`` (bool or 0/1), ``stages`` and ``targets`` (ids 0..63) are
        tensors on the gate's device or sequences of ints, of length
        ``num_slots``. ``site`` overrides the layout fingerprint for this call
        (the per-slot adapter passes the slot id's fingerprint so ranks at
        different slots are told apart). Bad input of any kind on one rank is
        a GateInputError there and a GatePeerInputError on the others, in the
        same call.
        """
        if self._failure is not None:
            if not self._failure_delivered:
                # the watcher found it while nobody was reading this GateSync's results
                self._failure_delivered = True
                raise self._failure
            raise GateError(f"this GateSync is unusable after call {self._failure_seq} failed; build a "
                            f"new one on every rank. The failure: {self._failure}") from self._failure
        if self._config_error is not None:
            raise self._config_error
        if self.distributed and self._watcher is None:
            raise GateError("this GateSync was closed; build a new one on every rank")
        v, s, t, call_site, poison, problem = self._prepare(votes, stages, targets, site)
        self._seq += 1
        seq = self._seq
        if not self.distributed:
            buf = ops.pack(v, s, t, seq, call_site, self.policy, 0, 1, poison)
            decision, report = ops.decode(buf, self.num_slots, 1, self.policy)
            ready = None
        else:
            call = self._watcher.begin(seq, time.monotonic() + self._timeout_s)
            try:
                decision, report = torch.ops.esper_gate.sync.default(
                    v, s, t, seq, call_site, self.policy, self.group_name, poison)
            except Exception as e:
                self._failure_delivered = True
                raise self._fail_from_caller(seq, e) from e
            if decision.is_cuda:
                decision.logical_and_(self._valid)
                ready = torch.cuda.Event()
                ready.record()
                call.event = ready
            else:
                ready = None
                self._watcher.end_host(seq)
        result = GateConsensus(self, seq, decision, report, problem, ready, (v, s, t, call_site, poison))
        if problem is not None:
            raise GateInputError(problem)
        if not decision.is_cuda:
            # CPU results are already on the host: fail fast, in the same call
            # on every rank, for bad input and for ranks at different calls.
            flags = int(report.numpy()[wire.G_FLAGS])
            if not flags & wire.FLAG_HEADER_OK:
                result._raise_global(result.report())
        return result

    @property
    def group(self):
        """The dedicated process group gate traffic runs on (None when local)."""
        return self._group

    @property
    def calls(self) -> int:
        """Number of calls made so far (the seq of the last call)."""
        return self._seq

    @property
    def failure(self) -> GateError | None:
        """The error that made this GateSync unusable, or None."""
        return self._failure

    def close(self) -> None:
        """Stop the watcher thread (the dedicated group stays until the job's teardown)."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def __repr__(self) -> str:
        return (f"GateSync(num_slots={self.num_slots}, policy={self.policy!r}, rank={self.rank}, "
                f"world_size={self.world_size}, distributed={self.distributed}, calls={self._seq})")
