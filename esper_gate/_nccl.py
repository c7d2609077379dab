"""The gate's own NCCL communicator: the Python face of csrc/nccl/nccl_comm.cpp.

The communicator uses the ``libnccl.so.2`` that torch already loaded (found in
the process, never linked or loaded a second time), so the gate and torch share
one NCCL. It is built non-blocking, so its construction returns at once and its
progress is polled (``state()``); its all_reduce runs on a gate stream ordered
against the caller's stream by events, without a host sync and without c10d.

Importable in every build: in a CPU-only build (or a CUDA build without torch's
nccl.h) ``library_info()`` says why there is no NCCL and the rest raises
``GateConfigError`` with that reason.

Interface used by the owned transport (and implemented by its CPU test double)::

    NcclComm(unique_id: bytes, rank: int, world: int, device: torch.device)
        .state() -> "pending" | "ready" | "error: <text>"   (also "aborted", "destroyed" after those)
        .all_reduce_(buf)       in place, SUM, int64, CUDA buffer on the comm's device
        .abort()                ncclCommAbort; any thread, also while an all_reduce is stuck
        .destroy()              finalize + destroy when healthy (abort when finalize cannot finish)
        .close()                idempotent; aborts a live communicator and forgets it
"""
from __future__ import annotations

import json
import os
import threading
import time

import torch

from .errors import GateConfigError, GateError

__all__ = ["library_info", "check_library", "check_blocking_env", "wait_enqueued", "unique_id", "config_probe",
           "NcclComm", "MappedWords", "version_code", "UNIQUE_ID_BYTES", "MIN_VERSION"]

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES in nccl.h


def version_code(version) -> int:
    """NCCL's NCCL_VERSION(X, Y, Z) code of a ``(major, minor, patch)`` tuple (nccl.h)."""
    x, y, z = (int(v) for v in version)
    return x * 1000 + y * 100 + z if (x <= 2 and y <= 8) else x * 10000 + y * 100 + z


def _version_tuple(code: int):
    if not code:
        return None
    if code < 20900:  # the old encoding, NCCL <= 2.8
        return (code // 1000, code % 1000 // 100, code % 100)
    return (code // 10000, code % 10000 // 100, code % 100)


def _fmt(version) -> str:
    return ".".join(map(str, version)) if version else "none"


def _ops():
    """torch.ops.esper_gate with the NCCL ops, or None."""
    try:
        import esper_gate  # noqa: F401  (loads _C)
    except ImportError:
        return None
    ops = torch.ops.esper_gate
    return ops if hasattr(ops, "nccl_library_info") else None


def _unbuilt_reason() -> str:
    from . import build_info

    info = build_info.read() or {}
    if info.get("build") != "cuda":
        return ("esper_gate is a CPU-only build: the gate's own NCCL communicator is compiled only in "
                "the CUDA build")
    nccl = info.get("nccl")
    if isinstance(nccl, str) and nccl.startswith("none"):
        return f"this CUDA build has no NCCL communicator ({nccl})"
    return "this build of esper_gate has no NCCL ops (rebuild it)"


def _torch_nccl_version():
    """torch.cuda.nccl.version() as a tuple, or None with the reason."""
    try:
        v = torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001 - a CPU torch has no NCCL binding
        return None, f"torch.cuda.nccl.version() failed: {e}"
    return (tuple(v) if isinstance(v, (tuple, list)) else _version_tuple(int(v))), None


MIN_VERSION = (2, 14, 0)  # kMinNcclVersion in csrc/nccl/nccl_comm.cpp, which says why


def library_info() -> dict:
    """Which NCCL the gate would use, and whether it can.

    Keys: ``path`` (the loaded libnccl, realpath), ``version`` (its
    ``ncclGetVersion``, a tuple), ``header_version`` (of the nccl.h this build
    was compiled against), ``min_version`` (the oldest the gate can drive),
    ``torch_version`` (``torch.cuda.nccl.version()``: the nccl.h torch was
    built with, a constant of the build, not the library loaded),
    ``torch_path``, ``copies`` (every libnccl.so* mapped in this process),
    ``differs`` (a sentence when the loaded library is not the version torch
    was built with, else empty), ``usable`` and ``why`` (empty when usable).

    The gate refuses only what it cannot work with: no library, two copies
    (the gate could not tell which one torch uses), or one older than
    ``min_version``. A loaded library newer than torch's build-time version is
    the usual result of upgrading the nvidia-nccl wheel, and torch runs on it too.
    """
    torch_version, torch_why = _torch_nccl_version()
    out = {"path": None, "version": None, "header_version": None, "min_version": MIN_VERSION,
           "torch_version": torch_version, "torch_path": os.path.dirname(torch.__file__), "copies": [],
           "differs": "", "usable": False, "why": ""}
    ops = _ops()
    if ops is None:
        out["why"] = _unbuilt_reason()
        return out
    raw = json.loads(ops.nccl_library_info())
    out["copies"] = list(raw["copies"])
    out["path"] = raw["path"] or None
    out["version"] = _version_tuple(raw["version"])
    out["header_version"] = _version_tuple(raw["header_version"])
    if raw.get("min_version"):
        out["min_version"] = _version_tuple(raw["min_version"])
    if torch_version is not None and out["version"] is not None and version_code(torch_version) != raw["version"]:
        out["differs"] = (f"the loaded NCCL ({_fmt(out['version'])}) is not the version torch {torch.__version__} "
                          f"was built with ({_fmt(torch_version)}, torch.cuda.nccl.version()); torch and the gate "
                          f"both use the loaded one")
    elif torch_version is None:
        out["differs"] = f"torch reports no build-time NCCL version ({torch_why})"
    if raw["why"]:
        out["why"] = raw["why"]
    elif raw["version"] < version_code(out["min_version"]):
        out["why"] = (f"the loaded {out['path']} is NCCL {_fmt(out['version'])}, older than the "
                      f"{_fmt(out['min_version'])} the gate needs (ncclConfig_t with `blocking`, "
                      f"ncclCommInitRankConfig, ncclCommFinalize): upgrade the nvidia-nccl wheel")
    out["usable"] = not out["why"]
    return out


def check_library() -> dict:
    """``library_info()``, or ``GateConfigError`` saying why the gate cannot use NCCL."""
    info = library_info()
    if not info["usable"]:
        raise GateConfigError(f"esper_gate cannot use NCCL: {info['why']}")
    return info


BLOCKING_ENV = "NCCL_COMM_BLOCKING"


def check_blocking_env(environ=None) -> None:
    """Refuse ``NCCL_COMM_BLOCKING=1`` with a GateConfigError naming it.

    NCCL lets that variable override ``config.blocking`` (envConfigOverride in
    src/init.cc at v2.28.9-1 and v2.30.7-1: 0 and 1 win over the config, other
    values are ignored). A blocking communicator waits on the host for the
    peers in init and in every collective, and an abort then waits behind
    them: no deadline of the gate could end a call whose peer never comes.
    NCCL parses the value as an integer (strtoll); so does this check.
    """
    value = (os.environ if environ is None else environ).get(BLOCKING_ENV)
    if value is None:
        return
    try:
        number = int(value.strip(), 0)
    except ValueError:
        return  # NCCL warns and keeps the config's value
    if number == 1:
        raise GateConfigError(
            f"{BLOCKING_ENV}={value} makes every NCCL communicator blocking, the gate's own too: a rank that "
            f"never arrives would then block its peers' init and collective on the host with no deadline, and "
            f"the gate's abort would wait behind them. Unset {BLOCKING_ENV} (or set it to 0) for processes that "
            f"build a GateSync on CUDA")


# How the host waits while NCCL enqueues an all_reduce (every call of a world of
# two or more on a non-blocking communicator: see all_reduce_start_ in
# csrc/nccl/nccl_comm.cpp). NCCL's launch thread takes tens of microseconds, so
# the wait spins on ncclCommGetAsyncError (an atomic load) for ENQUEUE_SPIN_S
# and only then sleeps, doubling from ENQUEUE_FIRST_SLEEP_S to
# ENQUEUE_MAX_SLEEP_S (the first collective, when NCCL connects to the peers,
# or a peer that never comes). A fixed sleep per look made every call cost at
# least one sleep (~200 us plus the kernel's timer slack).
ENQUEUE_SPIN_S = 200e-6
ENQUEUE_FIRST_SLEEP_S = 20e-6
ENQUEUE_MAX_SLEEP_S = 1e-3


def wait_enqueued(poll, *, timeout_s: float = 0.0, what: str = "the all_reduce", clock=time.perf_counter,
                  sleep=time.sleep) -> int:
    """Call ``poll()`` until it returns 0 (enqueued); return how many sleeps the wait took.

    ``poll`` raises when the communicator failed or was aborted, which is how a
    wait ends when a peer never comes (the gate's deadline aborts it). With
    ``timeout_s`` > 0 it also ends by itself, in a GateError.
    """
    start = clock()
    nap, sleeps = ENQUEUE_FIRST_SLEEP_S, 0
    while poll():
        waited = clock() - start
        if waited < ENQUEUE_SPIN_S:
            continue
        if 0 < timeout_s <= waited:
            raise GateError(f"{what} was still being enqueued after {waited:.3f} s (NCCL connects to the peers "
                            f"at the first collective; a peer that never calls keeps it pending): abort the "
                            f"communicator")
        sleep(nap)
        sleeps += 1
        nap = min(2 * nap, ENQUEUE_MAX_SLEEP_S)
    return sleeps


def unique_id() -> bytes:
    """A new ncclUniqueId (128 bytes); rank 0 makes it, the store carries it to the others."""
    ops = _require()
    return bytes(ops.nccl_unique_id().tolist())


def config_probe() -> dict:
    """The ncclConfig_t that ``NcclComm`` passes to ncclCommInitRankConfig, field by field."""
    return json.loads(_require().nccl_config_probe())


def _require():
    check_library()
    return torch.ops.esper_gate


def _cuda_index(device, what: str) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise GateConfigError(f"{what}: the gate's NCCL communicator needs a CUDA device, got {dev}")
    count = torch.cuda.device_count()
    if count == 0:
        raise GateConfigError(f"{what}: no CUDA device is visible to this process (torch.cuda.device_count() "
                              f"is 0), so {dev} cannot host the gate's NCCL communicator")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise GateConfigError(f"{what}: {dev} does not exist: this process sees {count} CUDA device(s)")
    return index


class NcclComm:
    """One rank of the gate's own NCCL communicator (non-blocking init; see the module docstring)."""

    def __init__(self, unique_id: bytes, rank: int, world: int, device):
        if not isinstance(unique_id, (bytes, bytearray)) or len(unique_id) != UNIQUE_ID_BYTES:
            got = f"{len(unique_id)} bytes" if isinstance(unique_id, (bytes, bytearray)) else type(unique_id).__name__
            raise ValueError(f"NcclComm: unique_id must be the {UNIQUE_ID_BYTES} bytes of unique_id(), got {got}")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"NcclComm: rank {rank!r} is not in a world of {world!r} "
                             f"(expected integers with 0 <= rank < world)")
        self.rank, self.world = rank, world
        self._handle = None
        self.enqueue_sleeps = 0  # sleeps taken while NCCL enqueued this communicator's calls
        self.in_progress_calls = 0  # calls whose ncclAllReduce returned ncclInProgress (the GPU check reads it)
        self._lock = threading.Lock()  # close() and destroy() from several threads release once
        index = _cuda_index(device, "NcclComm")
        self.device = torch.device("cuda", index)
        ops = _require()
        check_blocking_env()
        uid = torch.frombuffer(bytearray(unique_id), dtype=torch.uint8)
        # Returns at once: ncclCommInitRankConfig with config.blocking = 0 (csrc/nccl/nccl_comm.cpp).
        self._handle = ops.nccl_comm_init(uid, rank, world, index)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise GateConfigError("NcclComm: closed")
        return self._handle

    def state(self) -> str:
        """"pending" (init or an enqueue in progress), "ready", "error: <NCCL's text>", "aborted",
        "destroyed". Makes no CUDA call (ncclCommGetAsyncError), so a deadline thread may poll it."""
        return torch.ops.esper_gate.nccl_comm_state(self.handle)

    def all_reduce_(self, buf: torch.Tensor, enqueue_timeout_s: float = 0.0) -> torch.Tensor:
        """SUM-all_reduce ``buf`` (int64, contiguous, on the comm's device) in place.

        The gate stream waits for the caller's current stream, runs one
        ncclAllReduce, and the caller's stream waits for it: returns without
        waiting for the GPU. Refuses a communicator that is not ``ready``.
        NCCL enqueues every call of a world of two or more on a thread of its
        own; the host waits for that (``wait_enqueued``: spins, then sleeps),
        until ``enqueue_timeout_s`` (0: until ``abort()`` from another thread).
        """
        ops = torch.ops.esper_gate
        handle = self.handle
        if ops.nccl_all_reduce_start_(buf, handle):
            self.in_progress_calls += 1
            self.enqueue_sleeps += wait_enqueued(lambda: ops.nccl_all_reduce_poll(buf, handle),
                                                 timeout_s=enqueue_timeout_s,
                                                 what=f"the all_reduce (rank {self.rank} of {self.world})")
        return buf

    def abort(self) -> None:
        """ncclCommAbort: ends a stuck all_reduce and frees the communicator. Any thread; idempotent."""
        if self._handle is not None:
            torch.ops.esper_gate.nccl_comm_abort(self._handle)

    def destroy(self, timeout_s: float = 10.0) -> str:
        """End a healthy communicator: ncclCommFinalize, wait (bounded) until it is quiescent, then
        ncclCommDestroy. Aborts instead when it is not ready or finalize does not finish in
        ``timeout_s`` (a peer gone). Returns "destroyed" or "aborted"."""
        if self._handle is None:
            return "closed"
        state = self.state()
        if state in ("aborted", "destroyed"):
            return state
        if state != "ready":
            self.abort()
            return "aborted"
        torch.ops.esper_gate.nccl_comm_finalize(self._handle)
        deadline = time.monotonic() + timeout_s
        while (state := self.state()) == "pending" and time.monotonic() < deadline:
            time.sleep(0.001)
        if state != "ready":
            self.abort()
            return "aborted"
        torch.ops.esper_gate.nccl_comm_destroy(self._handle)
        return "destroyed"

    def close(self) -> None:
        """Abort if still live, then forget the handle. Idempotent."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            torch.ops.esper_gate.nccl_comm_release(handle)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter teardown
            pass

    def __repr__(self):
        return f"NcclComm(rank={self.rank}, world={self.world}, device={self.device}, handle={self._handle})"


class MappedWords:
    """``n`` int64 words of pinned host memory mapped into a GPU's address space.

    ``.host`` (a CPU tensor) and ``.device`` (a CUDA tensor on ``device``) view
    the same words: a kernel reads what the host wrote with no CUDA call on the
    host side, and the host reads what a kernel wrote once that kernel ran.
    The memory is freed (cudaFreeHost) when both views are gone.
    """

    def __init__(self, n: int, device):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"MappedWords: n must be a positive int, got {n!r}")
        index = _cuda_index(device, "MappedWords")
        ops = _ops()
        if ops is None:
            raise GateConfigError(f"MappedWords: {_unbuilt_reason()}")
        self.host, self.device = ops.nccl_mapped_words(n, index)
