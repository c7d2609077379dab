"""What a gate call's inputs become before the collective: pure functions, no ranks involved.

``prepare`` always returns tensors the op takes, so that nothing can fail
between a rank's "entered" heartbeat and its collective. A problem found
here does not raise: it travels as a poison code, so every rank learns of
it in the same call, and the text is raised on this rank afterwards.
"""
from __future__ import annotations

import datetime
import json
import operator
import zlib
from typing import NamedTuple, Sequence

import torch

from . import wire
from .errors import GateInputError

__all__ = ["Prepared", "prepare", "check_settings", "as_timedelta", "timeout_text", "site_fingerprint",
           "bad_values_text", "MAX_TIMEOUT_S", "UINT32"]

UINT32 = 0xFFFFFFFF


class Prepared(NamedTuple):
    """One call's inputs as the op takes them.

    ``poison`` is 0 or the reason code of ``problem``, this rank's text for it;
    with a problem the tensors are zeros that stand in for the bad ones.
    """
    votes: torch.Tensor
    stages: torch.Tensor
    targets: torch.Tensor
    site: int
    poison: int = 0
    problem: str | None = None


def site_fingerprint(num_slots: int, slot_names: Sequence[str] | None, tag: str = "") -> int:
    """A 32-bit fingerprint of the slot layout (stable across processes).

    The layout is encoded as a JSON list, so no name can pass for a separator:
    ['a\x1fb', 'c'] and ['a', 'b\x1fc'] are different layouts.
    """
    text = json.dumps([tag, num_slots, list(slot_names or [])])
    return zlib.crc32(text.encode("utf-8")) & UINT32


# The longest timeout a gate takes: one week. Longer ones break below us. The
# process-group timeout travels to c10d and gloo as a count of milliseconds,
# which overflows past 2**31 ms (24.8 days), and on NCCL the gate group's
# timeout is twice the gate's (_group.gate_group_timeout), so its watchdog
# needs the gate's below 12.4 days. Past that, construction hung with every
# rank present (9e9 s, 1e11 s, timedelta(days=10**5)) or gloo refused the
# group with "Invalid timeout" (1e13 s, timedelta.max). A week leaves margin.
MAX_TIMEOUT_S = 7 * 24 * 3600


def as_timedelta(timeout) -> datetime.timedelta:
    """A timeout of more than 0 and at most MAX_TIMEOUT_S (a timedelta or seconds) as a
    timedelta; below timedelta's resolution, one microsecond."""
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = timeout
    else:
        raise GateInputError(f"timeout must be a positive datetime.timedelta or number of seconds, got {timeout!r}")
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also nan
        raise GateInputError(f"timeout must be more than 0 s and at most MAX_TIMEOUT_S = {MAX_TIMEOUT_S} s "
                             f"(one week), got {timeout!r}")
    if isinstance(timeout, datetime.timedelta):
        return timeout
    return max(datetime.timedelta(seconds=float(seconds)), datetime.timedelta(microseconds=1))


def timeout_text(timeout) -> str:
    """'3 s', '0.5 s', '1e-06 s', '604800 s': a timeout (a timedelta or seconds) as
    messages print it. str(timedelta) would print '0:00:00' for anything below a second."""
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return f"{seconds:.3g} s" if abs(seconds) < 1000 else f"{seconds:.0f} s"


def check_settings(num_slots, policy, slot_names) -> list[str]:
    """Refuse settings no gate can have; return the slot names reports use."""
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or not 1 <= num_slots <= wire.MAX_SLOTS:
        raise GateInputError(f"num_slots must be an int in 1..{wire.MAX_SLOTS}, got {num_slots!r}")
    if policy not in wire.POLICIES:
        raise GateInputError(f"unknown policy {policy!r}, expected one of {', '.join(wire.POLICIES)}")
    if slot_names is None:
        return [str(i) for i in range(num_slots)]
    names = [str(n) for n in slot_names]
    if len(names) != num_slots:
        raise GateInputError(f"slot_names has {len(names)} names for num_slots={num_slots}")
    return names


def bad_values_text(call: str, reason: str | None) -> str:
    """This rank's message for input the kernels found bad (``call``: "esper_gate call 3 on rank 1")."""
    return (f"{call}: bad input: {reason or 'unknown reason'} "
            f"(votes must be 0/1, stage and target ids 0..{wire.MAX_ID})")


def _index(x) -> int:
    """``operator.index``, and numpy's bool as a Python bool reads (numpy.bool_ has no __index__)."""
    try:
        return operator.index(x)
    except TypeError:
        if type(x).__module__ == "numpy" and getattr(getattr(x, "dtype", None), "kind", None) == "b":
            return int(x)
        raise


def _coerce(name: str, value, num_slots: int, device: torch.device, problems: list):
    """A 1-D int64 (or bool votes) tensor on ``device``, a list of ints to be
    copied there, or None after noting the problem."""
    n = num_slots
    if isinstance(value, torch.Tensor):
        t = value
        if t.device != device:
            problems.append((wire.REASON_DEVICE, f"{name} is on {t.device}, expected {device}"))
            return None
        if t.dim() != 1 or t.shape[0] != n:
            problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got {list(t.shape)}"))
            return None
        if name == "votes" and t.dtype == torch.bool:
            return t.contiguous()
        # A bool stage would read as stage 0 or 1 (UNKNOWN, DORMANT in Esper): a
        # caller's mix-up, not an id.
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            problems.append((wire.REASON_DTYPE, f"{name} must be {'bool or ' if name == 'votes' else ''}"
                                                f"an integer dtype, got {t.dtype}"))
            return None
        return t.to(torch.int64).contiguous()
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "tolist"):
        # a numpy array is read as a list, with its shape and dtype checked as a tensor's are
        if value.ndim != 1 or value.shape[0] != n:
            problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got {list(value.shape)}"))
            return None
        if value.dtype.kind not in ("biu" if name == "votes" else "iu"):
            problems.append((wire.REASON_DTYPE, f"{name} must be {'bool or ' if name == 'votes' else ''}"
                                                f"an integer dtype, got numpy {value.dtype}"))
            return None
        value = value.tolist()
    try:
        items = [_index(x) for x in value]
    except TypeError as e:
        kind = type(value).__name__
        problems.append((wire.REASON_DTYPE, f"{name} must be a tensor or a sequence of ints, got {kind} ({e})"))
        return None
    if len(items) != n:
        problems.append((wire.REASON_SHAPE, f"{name} must have shape [{n}], got [{len(items)}]"))
        return None
    lo, hi = (0, 1) if name == "votes" else (0, wire.MAX_ID)
    if any(x < lo or x > hi for x in items):
        # the kernel names the reason; values past int64 cannot reach it
        items = [min(max(x, -1), wire.MAX_ID + 1) for x in items]
    return items


def _to_device(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Lists to int64 tensors on ``device``, in one copy that does not block the
    host (pinned staging on CUDA)."""
    if device.type == "cuda":
        staged = torch.tensor(rows, dtype=torch.int64, pin_memory=True)
        packed = staged.to(device, non_blocking=True)
    else:
        packed = torch.tensor(rows, dtype=torch.int64)
    return list(packed.unbind(0))


def _fast(votes, stages, targets, n1: tuple, device: torch.device) -> bool:
    """Tensors that the op takes as they are (the hot path: no copy, no check in Python)."""
    return (type(votes) is torch.Tensor and type(stages) is torch.Tensor and type(targets) is torch.Tensor
            and (votes.dtype is torch.bool or votes.dtype is torch.int64)
            and stages.dtype is torch.int64 and targets.dtype is torch.int64
            and votes.shape == n1 and stages.shape == n1 and targets.shape == n1
            and votes.device == device and stages.device == device and targets.device == device
            and votes.is_contiguous() and stages.is_contiguous() and targets.is_contiguous())


def prepare(votes, stages, targets, site, *, num_slots: int, device: torch.device, default_site: int,
            call: str) -> Prepared:
    """The inputs of one call as the op takes them (``call`` names the call in problem texts)."""
    given = site
    if site is None:
        site = default_site
    elif not (type(site) is int and 0 <= site <= UINT32):
        try:
            site = operator.index(site)
        except TypeError:
            site = -1
    if 0 <= site <= UINT32 and _fast(votes, stages, targets, (num_slots,), device):
        return Prepared(votes, stages, targets, site)
    problems: list = []
    coerced = [_coerce(name, x, num_slots, device, problems)
               for name, x in (("votes", votes), ("stages", stages), ("targets", targets))]
    if not 0 <= site <= UINT32:
        problems.append((wire.REASON_SITE, f"site must be an int in 0..2**32-1, got {given!r}"))
    if problems:
        zeros = torch.zeros(num_slots, dtype=torch.int64, device=device)
        text = f"{call}: " + "; ".join(p for _, p in problems)
        return Prepared(zeros.bool(), zeros, zeros, 0, problems[0][0], text)
    lists = [i for i, c in enumerate(coerced) if isinstance(c, list)]
    if lists:
        for i, t in zip(lists, _to_device([coerced[i] for i in lists], device)):
            coerced[i] = t
    return Prepared(*coerced, site)
