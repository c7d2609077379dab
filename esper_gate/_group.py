"""A gate's group lifecycle: which ranks, the store rendezvous that meets them,
and the dedicated process group gate traffic runs on.

The rendezvous has one verdict per attempt. Each attempt (an *epoch*) has a
``verdict`` key that the first rank to decide writes with compare-and-set:
``ok`` once every rank's settings are in the store, or ``abandoned:<ranks>``
from a rank whose wait ran out, naming the ranks it did not see. Every rank
reads the same verdict: on ``ok`` all build the group; on ``abandoned`` the
ranks that were counted raise the same GateTimeoutError, and a rank named in
it (it came too late for that attempt) moves to the next epoch, where a
rebuild on the other ranks meets it, or its own deadline names them.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _register_process_group, _unregister_process_group

from ._inputs import timeout_text
from ._store import StoreUnresponsive, StoreWorker
from .errors import GateConfigError, GateInputError, GateTimeoutError
from .report import ranks_text

__all__ = ["parent_group", "config_error", "check_group_backend", "device_backend", "free_gate_group",
           "gate_group_timeout", "new_gate_group", "Rendezvous",
           "SELF_TIMING_BACKENDS", "self_timing", "shared_devices"]

STORE_PREFIX = "esper_gate"
# gloo raises in the caller's thread when its timeout passes and leaves the
# process running, so its group timeout can be the gate's own. Every other
# backend (NCCL first) is aborted by the watcher at the gate's deadline, and
# its group timeout lies this far past it: NCCL's watchdog ends the process
# when that timeout passes (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the default).
SELF_TIMING_BACKENDS = ("gloo",)
_GROUP_TIMEOUT_MARGIN = datetime.timedelta(seconds=60)
_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_ABANDONED = "abandoned:"
# The longest a store request of construction waits past construction's deadline
# (the watcher's STORE_BOUND_S), and the longest the store's host delays its raise
# for the present ranks to read a construction verdict (the calls' ACK_WAIT_S).
STORE_BOUND_S = 2.0
BUILD_ACK_WAIT_S = 2.0


def parent_group(group=None):
    """The group to agree over (default: the world), or None when there is nobody to
    agree with (torch.distributed not initialized, or a group of one rank)."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    return None if dist.get_world_size(group) == 1 else group


def device_backend(backend: str, device_type: str) -> str:
    """The backend that serves ``device_type`` ("cpu:gloo,cuda:nccl" -> "gloo" for cpu)."""
    if ":" not in backend:
        return backend
    pairs = dict(part.split(":", 1) for part in backend.split(","))
    return pairs.get(device_type, backend)


def self_timing(backend: str, device: torch.device) -> bool:
    """Whether the backend serving ``device`` raises in the caller at its own timeout (no abort needed)."""
    return device_backend(backend, device.type) in SELF_TIMING_BACKENDS


def gate_group_timeout(timeout: datetime.timedelta, self_timing: bool) -> datetime.timedelta:
    return timeout if self_timing else timeout + max(_GROUP_TIMEOUT_MARGIN, timeout)


_client_lock = threading.Lock()
_client: tuple = (None, None)  # (the job's store, this process's client of it for gate traffic)


def gate_store():
    """This process's own client of the job's store, which every gate's requests go through.

    A store client runs one request at a time, a blocking wait included (TCPStore's
    activeOpLock_). On the client c10d and the user share, a gate's requests would queue
    behind whatever another thread waits for there, such as a user's new_group waiting
    for its peers' keys; and when those peers' new_group waited in turn behind their own
    gate's wait for this rank, no rank made progress until a timeout (seen with a user
    thread making groups while gates were built). One client for all gates, made when the
    first gate is built on a job's store, costs the store's host one connection per rank.
    """
    global _client
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    with _client_lock:
        if _client[0] is not store:  # the first gate, or a new job's store after destroy and init
            _client = (store, store.clone())
        return _client[1]


def not_started_error(store, key: str, world: int, message) -> GateTimeoutError:
    """A construction step that some rank did not finish in time: the error naming the ranks
    that never set ``{key}/{rank}`` in ``store`` (none when the store's host is gone);
    ``message(who)`` words it."""
    try:
        absent = [r for r in range(world) if not store.check([f"{key}/{r}"])]
    except Exception:  # noqa: BLE001 - the store's host is gone
        absent = []
    who = ranks_text(absent) if absent else "a rank"
    return GateTimeoutError(message(who), absent, {r: -1 for r in absent}, call=0)


def supports_set_timeout() -> bool:
    """Whether this torch's ProcessGroup has ``set_timeout`` (the timeout of every later op)."""
    return hasattr(dist.ProcessGroup, "set_timeout")


def set_group_timeout(group, timeout: datetime.timedelta) -> None:
    """Every later op of ``group`` times out after ``timeout`` (ProcessGroup.set_timeout, which
    torch forwards to each backend of the group: gloo's ProcessGroupGloo::setTimeout)."""
    group.set_timeout(timeout)


# ProcessGroupNCCL reads these in its constructor (torch 2.14.1,
# ProcessGroupNCCL.hpp:70-78 names them; the constructor reads them with
# getCvarInt/getCvarBool), so they apply to the gate's group only when set
# around its creation, and the user's groups keep their own:
# * TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly): an error on gate traffic
#   aborts the gate's communicators instead of ending the process (3, the
#   default, is SkipCleanUp: the watchdog throws and the process dies);
# * TORCH_NCCL_DUMP_ON_TIMEOUT=0: this group's watchdog does not write the
#   global "exception_dump" signal on an error, which the default group's
#   heartbeat monitor would take as the cue to dump and kill the process.
_FALLBACK_ENV = {_NCCL_ERROR_HANDLING: "2", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plugin(name: str):
    """The backend registered with ``dist.Backend.register_backend`` under ``name``, or None."""
    return getattr(dist.Backend, "_plugins", {}).get(name.upper())


def check_group_backend(backend: str, device: torch.device) -> None:
    """Refuse, before anything collective, a backend that new_gate_group does not build."""
    chosen = device_backend(backend, device.type)
    if chosen == "gloo" or (chosen == "nccl" and device.type == "cuda") or _plugin(chosen) is not None:
        return
    raise GateInputError(
        f"GateSync: the gate's group on {device.type} would use backend {chosen!r} (from {backend!r}); esper_gate "
        f"builds it with gloo, with nccl for a CUDA gate, or with a backend registered through "
        f"torch.distributed.Backend.register_backend")


def new_gate_group(ranks: list[int], backend: str, device: torch.device, timeout: datetime.timedelta, name: str,
                   store=None):
    """The dedicated process group ``name`` of a gate (every rank in ``ranks`` calls this).
    CUDA gates use their own communicator (_transport.OwnedTransport); this makes the c10d
    group of CPU gates and of the opt-in ProcessGroupNCCL fallback (``transport="c10d"``).

    ``store``: where the ranks meet (the gate's rendezvous store; default: ``gate_store()``
    under a prefix of ``name``). ``free_gate_group`` frees the group.

    The group is assembled from its backend the way c10d's new_group assembles one
    (distributed_c10d._new_process_group_helper: a ProcessGroup over a PrefixStore, the
    backend registered on it), but no per-process state of c10d's is read or changed:
    not the counter that names default-named groups (``_world.group_count``), not what
    local-sync names derive from (``len(_world.pg_names)``), none of ``_world``'s maps. A
    user's thread may make its own groups meanwhile, and a gate on a subgroup leaves later
    names alike on every rank. Only the op needs to find the group, by name
    (``c10d::resolve_process_group``): it is registered under ``name``, unique in the
    process, and the registry holds it weakly (the caller keeps it alive).
    """
    rank, size = ranks.index(dist.get_rank()), len(ranks)
    if store is None:
        store = dist.PrefixStore(f"{STORE_PREFIX}/group/{name}/", gate_store())
    check_group_backend(backend, device)
    chosen = device_backend(backend, device.type)
    group_store = dist.PrefixStore("group/", store)
    backend_store = dist.PrefixStore(f"{device.type}/", group_store)
    pg = dist.ProcessGroup(group_store, rank, size)
    devices = [device.type]
    if chosen == "gloo":
        impl = dist.ProcessGroupGloo(backend_store, rank, size, timeout=timeout)  # connects every rank now
        impl.options.global_ranks_in_group = list(ranks)
        impl.options.group_name = name
        impl._set_sequence_number_for_group()
        kind = dist.ProcessGroup.BackendType.GLOO
        devices = sorted({"cpu", device.type})  # gloo serves CPU tensors, and CUDA ones when given them
    elif chosen == "nccl":
        # * A high-priority stream comes from its own per-device pool, apart
        #   from the one every default-priority group and torch.cuda.Stream()
        #   draw from (c10/cuda/CUDAStream.h); docs/integrating-esper.md says
        #   what that guarantees.
        # * No split_from: the communicator is made for the gate's ranks from
        #   scratch, never by ncclCommSplit of the default group's. new_group
        #   splits when the default group has a bound device (torch 2.14,
        #   _new_process_group_helper: _get_split_source), and then "we will
        #   need to call ncclCommSplit on *all* ranks in this new group's parent
        #   group, even those not in the new group": a subgroup gate, which
        #   non-members never build, would hang in its construction.
        opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        opts._timeout = timeout
        opts.global_ranks_in_group = list(ranks)
        opts.group_name = name
        with _env(_FALLBACK_ENV):
            impl = dist.ProcessGroupNCCL(backend_store, rank, size, opts)
        impl._set_sequence_number_for_group()
        kind = dist.ProcessGroup.BackendType.NCCL
        pg.bound_device_id = device  # before the backend is registered, which copies it
    else:
        plugin = _plugin(chosen)
        if plugin.extended_api:
            from torch._C._distributed_c10d import _DistributedBackendOptions

            opts = _DistributedBackendOptions()
            opts.store, opts.group_rank, opts.group_size, opts.timeout = backend_store, rank, size, timeout
            opts.group_id, opts.global_ranks_in_group = name, list(ranks)
            impl = plugin.creator_fn(opts, None)
        else:
            impl = plugin.creator_fn(backend_store, rank, size, timeout)
        kind = dist.ProcessGroup.BackendType.CUSTOM
    if isinstance(impl, dist.ProcessGroup):  # a plugin may return a whole group, as new_group allows
        pg = impl
    else:
        pg._set_default_backend(kind)
        for d in devices:
            pg._register_backend(torch.device(d), kind, impl)
    pg._set_group_name(name)
    if chosen == "nccl":
        # The communicator is created now, while every rank has just met at the
        # rendezvous, not by the first collective: what new_group(device_id=...)
        # does (distributed_c10d.py, 2.14: _new_process_group_helper ->
        # eager_connect_single_device).
        impl.eager_connect_single_device(device)
    _register_process_group(name, pg)
    return pg


def free_gate_group(group) -> None:
    """Free a group from new_gate_group: its name, its communicators, its threads and sockets
    (the last with the last reference, which the caller drops)."""
    try:
        _unregister_process_group(group.group_name)
    finally:
        group.shutdown()


def shared_devices(configs: dict[int, dict]) -> GateConfigError | None:
    """Two ranks of a CUDA gate on one GPU of one host (NCCL refuses, or hangs): the
    error naming both ranks, the host and the device. ``configs[r]["host"]`` and
    ``["device"]`` come from the rendezvous (the device as its UUID where known)."""
    seen: dict[tuple[str, str], int] = {}
    for r, c in sorted(configs.items()):
        where = (c.get("host"), c.get("device"))
        if where[1] is None or not str(where[1]).startswith("cuda"):
            continue
        if where in seen:
            return GateConfigError(
                f"GateSync: ranks {seen[where]} and {r} are both on {where[1]} of host {where[0]}; each rank of a "
                f"CUDA gate needs a GPU of its own (call torch.cuda.set_device(local_rank) before building the gate, "
                f"or pass device=)", configs)
        seen[where] = r
    return None


def config_error(configs: dict[int, dict], mine: dict, rank: int) -> GateConfigError | None:
    """The error every call of a gate raises when ranks built it with other settings
    (no collective is issued then: ranks with other slot counts would all_reduce other sizes)."""
    # where each rank runs differs by design; shared_devices() checks it; the fast window
    # follows each rank's timeout, and the gate takes the smallest (fast_window())
    def settings(c):
        return {k: v for k, v in c.items() if k not in ("host", "device", "fast_window")}
    if all(settings(c) == settings(mine) for c in configs.values()):
        return None
    lines = [f"rank {r}: num_slots={c['num_slots']}, policy={c['policy']}, slot layout "
             f"fingerprint={c['site']:#010x}" for r, c in sorted(configs.items())]
    return GateConfigError(
        f"GateSync was built with different settings on different ranks (this is rank {rank}):\n  "
        + "\n  ".join(lines) + "\nEvery rank must pass the same num_slots, policy and slot_names.", configs)


def fast_window(configs: dict[int, dict]) -> float:
    """The verdict's fast window every rank uses: the smallest any rank offered (0 if one
    offered none), so that no rank applies a call alone in a window a peer's claim ignores."""
    return min((float(c.get("fast_window", 0.0)) for c in configs.values()), default=0.0)


class Rendezvous:
    """Meets every rank of the parent group (by name) in the job's store before a gate is built.

    Constructions on one parent group are counted alike on every rank (a
    count moves only when every rank has built), so the n-th GateSync on a
    group meets the n-th on every other rank. ``store`` is the prefix store of
    the attempt that met, for the gate's heartbeats.
    """

    # parent group name -> constructions completed on it, in this process
    _built: dict[str, int] = {}

    def __init__(self, parent_name: str, rank: int, world: int, timeout: datetime.timedelta, base_store=None,
                 counts: dict[str, int] | None = None, store_host: int | None = None):
        if base_store is None:
            base_store = gate_store()
        self._counts = counts if counts is not None else Rendezvous._built
        self._parent_name = parent_name
        self._built_count = self._counts.get(parent_name, 0)
        # shared by every gate on the parent group; each gate's keys live under its index
        self.parent_store = dist.PrefixStore(f"{STORE_PREFIX}/{self._parent_name}/", base_store)
        self._base = dist.PrefixStore(f"{self._built_count}/", self.parent_store)
        self.rank, self.world, self.timeout = rank, world, timeout
        # the group rank whose process hosts the job's store (None: outside the group)
        self.store_host = store_host
        self.store = None
        self._epoch: int | None = None
        self._worker: StoreWorker | None = None

    def _ask(self, fn, deadline: float):
        """``fn(store)`` on the rendezvous's store worker, answered by ``deadline`` (plus the
        bound a store request gets), or StoreUnresponsive."""
        return self._worker.request(fn, max(deadline - time.monotonic(), 0.0) + STORE_BOUND_S)

    def meet(self, config: dict) -> dict[int, dict]:
        """Publish this rank's ``config`` and return every rank's, bounded by the timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        keys = [f"cfg/{r}" for r in range(self.world)]
        self._worker = StoreWorker(self._base, name=f"esper_gate-rendezvous-{self.rank}")
        try:
            while True:
                epoch = self._ask(lambda base: int(base.add("epoch", 0)), deadline)
                store = dist.PrefixStore(f"{epoch}/", self._base)
                self._ask(lambda _: store.set(f"cfg/{self.rank}", json.dumps(config)), deadline)

                def wait(_):
                    left = deadline - time.monotonic()
                    try:
                        store.wait(keys, datetime.timedelta(seconds=max(left, 0.001)))
                        return "ok"
                    except Exception:  # noqa: BLE001 - a timeout; a dead store fails the next request too
                        missing = [r for r in range(self.world) if not store.check([f"cfg/{r}"])]
                        # Every key may have landed since the wait gave up: then all are here.
                        return _ABANDONED + ",".join(map(str, missing)) if missing else "ok"
                mine = self._ask(wait, deadline)
                verdict = self._ask(lambda _: store.compare_set("verdict", "", mine).decode(), deadline)
                if verdict == "ok":
                    self._epoch, self.store = epoch, store
                    return self._ask(lambda _: {r: json.loads(store.get(k).decode()) for r, k in enumerate(keys)},
                                     deadline)
                self._ask(lambda base: base.compare_set("epoch", str(epoch), str(epoch + 1)), deadline)
                missing = [int(r) for r in verdict[len(_ABANDONED):].split(",") if r]
                if self.rank not in missing or time.monotonic() >= deadline:
                    self._acknowledge(store, missing)
                    raise self._timeout_error(missing)
                # This rank came after the others gave up on that attempt: meet them at the next.
        except GateTimeoutError:
            raise
        except StoreUnresponsive as e:
            host = f"rank {self.store_host}" if self.store_host is not None else "global rank 0"
            raise GateTimeoutError(
                f"GateSync construction: {host}, which hosts the job's store, has not answered for "
                f"{e.seconds:.1f} s (stopped or overloaded?). No collective was issued.",
                [self.store_host] if self.store_host is not None else [], {}, call=0) from e
        except Exception as e:  # noqa: BLE001 - the store stopped answering
            raise GateTimeoutError(
                f"GateSync construction: the job's store stopped answering ({type(e).__name__}: "
                f"{str(e).strip()[:200]}); the process hosting it (global rank 0) has most likely died. "
                f"No collective was issued.", [], {}, call=0) from e
        finally:
            self._worker.close()

    def _acknowledge(self, store, missing: list[int]) -> None:
        """This rank read an attempt's ``abandoned`` verdict. The store's host waits, before it
        raises (and, usually, exits with the store), until the present ranks have read it too:
        a peer that still waits for the verdict would otherwise find the store gone and name
        the host instead of the ranks that never came."""
        deadline = time.monotonic() + BUILD_ACK_WAIT_S
        try:
            self._ask(lambda _: store.set(f"ack/{self.rank}", "1"), deadline)
            if self.rank != self.store_host:
                return
            present = [f"ack/{r}" for r in range(self.world) if r != self.rank and r not in missing]
            while present and time.monotonic() < deadline:
                if self._ask(lambda _: store.check(present), deadline):
                    return
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - a courtesy to the peers; the verdict is raised regardless
            pass

    def _timeout_error(self, missing: list[int]) -> GateTimeoutError:
        who = ranks_text(missing) if missing else "a rank"
        return GateTimeoutError(
            f"GateSync construction: {who} did not arrive within {timeout_text(self.timeout)} (every rank of the group "
            f"must construct GateSync; the gate was never reached there). No collective was issued; build "
            f"a new GateSync on every rank to retry.", missing, {r: -1 for r in missing}, call=0)

    @property
    def index(self) -> int:
        """This gate's place among the gates built on the parent group (the same on every rank)."""
        return self._built_count

    @property
    def group_name(self) -> str:
        """A name for the gate's group: the same on every member, never used before on this store."""
        return f"esper_gate.{self._parent_name}.{self._built_count}.{self._epoch}"

    def abandon(self) -> None:
        """After the group could not be built on this rank: the next attempt meets on a new epoch."""
        if self._epoch is None:
            return
        worker = StoreWorker(self._base, name=f"esper_gate-rendezvous-{self.rank}")
        try:
            worker.request(lambda base: base.compare_set("epoch", str(self._epoch), str(self._epoch + 1)),
                           STORE_BOUND_S)
        except Exception:  # noqa: BLE001 - the store is gone or stopped; nothing left to meet on
            pass
        finally:
            worker.close()

    def commit(self) -> None:
        """The gate is built on this rank: the next construction on the parent meets anew."""
        self._counts[self._parent_name] = self._built_count + 1
