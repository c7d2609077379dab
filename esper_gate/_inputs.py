"""What a gate call's inputs become before the collective: pure functions, no ranks involved.

``prepare`` always returns tensors the op takes, so that nothing can fail
between a rank's "entered" heartbeat and its collective. A problem found
here does not raise: it travels as a poison code, so every rank learns of
it in the same call, and the text is raised on this rank afterwards.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import operator
import zlib
from typing import NamedTuple, Sequence

import torch

from . import wire
from .errors import GateInputError

__all__ = ["Prepared", "prepare", "check_settings", "check_names", "names_problem", "as_timedelta", "timeout_text",
           "site_fingerprint", "state_digest", "bad_values_text", "MAX_TIMEOUT_S", "UINT32", "slot_state_defaults",
           "check_slot_state"]

UINT32 = 0xFFFFFFFF


class Prepared(NamedTuple):
    """One call's inputs as the op takes them.

    ``poison`` is 0 or the reason code of ``problem``, this rank's text for it;
    with a problem the tensors are zeros that stand in for the bad ones.
    ``policies`` (policy codes) and ``digests`` are None when the call sends
    none: every slot then has the gate's policy, and digest 0, and the buffer
    carries no slot state. A gate with the slot state gives both in every
    call, its defaults included, so all its buffers have one size.
    """
    votes: torch.Tensor
    stages: torch.Tensor
    targets: torch.Tensor
    site: int
    poison: int = 0
    problem: str | None = None
    policies: torch.Tensor | None = None
    digests: torch.Tensor | None = None


def site_fingerprint(num_slots: int, slot_names: Sequence[str] | None, tag: str = "") -> int:
    """A 32-bit fingerprint of the slot layout (stable across processes).

    The layout is encoded as a JSON list, so no name can pass for a separator:
    ['a\x1fb', 'c'] and ['a', 'b\x1fc'] are different layouts.
    """
    text = json.dumps([tag, num_slots, list(slot_names or [])])
    return zlib.crc32(text.encode("utf-8")) & UINT32


@functools.lru_cache(maxsize=256)
def _names_site(names: tuple) -> int:
    # A training loop passes the same names call after call: fingerprint them once.
    return site_fingerprint(len(names), names)


def _digest_item(value) -> list:
    """One value of a state digest as tagged JSON-able data, so 1, 1.0, True and "1" differ."""
    if value is None or isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):  # IntEnum too: its value, whatever its str()
        return ["i", str(int(value))]
    if isinstance(value, float):
        return ["f", value.hex()]  # exact, and -0.0, inf and nan have one spelling each
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, bytes):
        return ["y", value.hex()]
    if isinstance(value, (tuple, list)):
        return ["t", [_digest_item(v) for v in value]]
    if hasattr(value, "__index__"):  # IntEnum, numpy integers
        return ["i", str(operator.index(value))]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _digest_item(value.item())
    raise GateInputError(f"state_digest takes ints, floats, strs, bytes, bools, None and tuples of them, "
                         f"got {type(value).__name__} {value!r}")


def state_digest(*values) -> int:
    """A stable 32-bit digest (0..2**32-1) of a slot's state, for ``GateSync(..., digests=...)``.

    Pass what must be equal on every rank when the slot transitions and that
    the stage does not show: in Esper the alpha step, the alpha controller's
    mode, the seed id and the blueprint id. The same values give the same
    digest in every process and Python version (BLAKE2b over a tagged,
    type-exact encoding: ``1``, ``1.0``, ``True`` and ``"1"`` differ, floats by
    their exact bits). Two different states collide with probability 2**-32.
    """
    text = json.dumps([_digest_item(v) for v in values], separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little")


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
    return check_names(slot_names, num_slots, "slot_names")


def check_names(names, num_slots: int, what: str = "names") -> list[str]:
    """The slot names as strings, one per slot; a wrong count is the caller's error."""
    if isinstance(names, (str, bytes)):
        raise GateInputError(f"{what} must be a sequence of {num_slots} names, got the string {names!r}")
    out = [str(n) for n in names]
    if len(out) != num_slots:
        raise GateInputError(f"{what} has {len(out)} names for num_slots={num_slots}")
    return out


def names_problem(names, num_slots: int) -> str | None:
    """Why ``names`` cannot name a call's ``num_slots`` slots, or None when they can
    (None names, or a sized sequence of that many)."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        got = f"the string {names!r}"
    elif not hasattr(names, "__len__") or not hasattr(names, "__iter__"):
        got = f"{type(names).__name__} {names!r}"
    elif len(names) != num_slots:
        got = f"{len(names)} names"
    else:
        return None
    return f"names must be a sequence of {num_slots} slot names, got {got}"


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


def _slot_policies(policies, num_slots: int, default: str, problems: list) -> list[int] | None:
    """Policy codes per slot (None entries: ``default``), or None when every slot has ``default``."""
    if policies is None:
        return None
    if isinstance(policies, str):
        problems.append((wire.REASON_POLICY, f"policies must be a sequence of {num_slots} policy names "
                                             f"(or None), got the string {policies!r}"))
        return None
    try:
        items = list(policies)
    except TypeError:
        problems.append((wire.REASON_POLICY, f"policies must be a sequence of policy names, got "
                                             f"{type(policies).__name__}"))
        return None
    if len(items) != num_slots:
        problems.append((wire.REASON_SHAPE, f"policies must have {num_slots} entries, got {len(items)}"))
        return None
    if all(p is None or p == default for p in items):
        return None  # the gate's own policy in every slot: the header carries it
    codes = []
    for i, p in enumerate(items):
        p = default if p is None else p
        if p not in wire.POLICY_CODES:
            problems.append((wire.REASON_POLICY, f"policies[{i}] is {p!r}, expected one of "
                                                 f"{', '.join(wire.POLICIES)} or None"))
            return None
        codes.append(wire.POLICY_CODES[p])
    return codes


def _slot_digests(digests, num_slots: int, device: torch.device, problems: list):
    """A digest per slot (None entries: 0) as a list, a tensor the op takes as it is, or None."""
    if digests is None:
        return None
    if isinstance(digests, torch.Tensor):
        if digests.device != device:
            problems.append((wire.REASON_DEVICE, f"digests is on {digests.device}, expected {device}"))
        elif digests.dim() != 1 or digests.shape[0] != num_slots:
            problems.append((wire.REASON_SHAPE, f"digests must have shape [{num_slots}], got {list(digests.shape)}"))
        elif digests.dtype.is_floating_point or digests.dtype.is_complex or digests.dtype == torch.bool:
            problems.append((wire.REASON_DTYPE, f"digests must be an integer dtype, got {digests.dtype}"))
        else:
            return digests.to(torch.int64).contiguous()  # out-of-range values: the kernel names them
        return None
    try:
        items = [0 if d is None else _index(d) for d in digests]
    except TypeError as e:
        problems.append((wire.REASON_DIGEST, f"digests must be ints in 0..2**32-1 (esper_gate.state_digest "
                                             f"makes one) or None, got {type(digests).__name__} ({e})"))
        return None
    if len(items) != num_slots:
        problems.append((wire.REASON_SHAPE, f"digests must have {num_slots} entries, got {len(items)}"))
        return None
    for i, d in enumerate(items):
        if not 0 <= d <= wire.MAX_DIGEST:
            problems.append((wire.REASON_DIGEST, f"digests[{i}] is {d}, expected an int in 0..2**32-1 "
                                                 f"(esper_gate.state_digest makes one)"))
            return None
    return items


def check_slot_state(slot_state) -> bool:
    if not isinstance(slot_state, bool):
        raise GateInputError(f"slot_state must be True or False, got {slot_state!r}")
    return slot_state


def slot_state_defaults(num_slots: int, policy: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What a gate with the slot state sends for slots a call leaves at their default:
    ``policy``'s code in every slot, and digest 0 (read-only; built once per gate)."""
    codes = torch.full((num_slots,), wire.POLICY_CODES[policy], dtype=torch.int64, device=device)
    return codes, torch.zeros(num_slots, dtype=torch.int64, device=device)


def prepare(votes, stages, targets, site, *, num_slots: int, device: torch.device, default_site: int,
            call: str, policies=None, digests=None, default_policy: str = "unanimous",
            names: Sequence[str] | None = None, bad_input: str | None = None, slot_state=None) -> Prepared:
    """The inputs of one call as the op takes them (``call`` names the call in problem texts).

    ``policies`` (names, None = ``default_policy``) and ``digests`` (ints, None = 0) are
    per slot; ``names``, when given and ``site`` is None, make the call's fingerprint, so
    ranks that pass other names for the same call are told apart. ``bad_input``: what
    the caller found wrong before it could make these inputs (its own objects), sent
    as ``wire.REASON_INPUT`` ahead of anything found here.

    ``slot_state``: the gate's ``slot_state_defaults`` when it carries the slot state; every
    call then sends policies and digests (these defaults where the call gives none), so
    its buffer has the one size every rank of the gate expects. None for a gate without
    it: a policy other than ``default_policy`` or any digest is then this rank's bad
    input (it cannot be sent, and a buffer with the slot state would be another size than
    the peers').
    """
    given = site
    # Names a rank cannot use travel as bad input, like the tensors: raising here
    # would leave the other ranks waiting in the collective.
    bad_names = names_problem(names, num_slots)
    if site is None:
        site = default_site if names is None or bad_names else _names_site(tuple(str(n) for n in names))
    elif not (type(site) is int and 0 <= site <= UINT32):
        try:
            site = operator.index(site)
        except TypeError:
            site = -1
    default_codes, default_digests = slot_state if slot_state is not None else (None, None)
    if policies is None and digests is None and not bad_names and bad_input is None and 0 <= site <= UINT32 \
            and _fast(votes, stages, targets, (num_slots,), device):
        return Prepared(votes, stages, targets, site, policies=default_codes, digests=default_digests)
    problems: list = []
    if bad_input is not None:
        problems.append((wire.REASON_INPUT, str(bad_input)))
    if bad_names:
        problems.append((wire.REASON_SHAPE, bad_names))
    coerced = [_coerce(name, x, num_slots, device, problems)
               for name, x in (("votes", votes), ("stages", stages), ("targets", targets))]
    if not 0 <= site <= UINT32:
        problems.append((wire.REASON_SITE, f"site must be an int in 0..2**32-1, got {given!r}"))
    codes = _slot_policies(policies, num_slots, default_policy, problems)
    if slot_state is None and codes is not None:
        problems.append((wire.REASON_POLICY, f"per-slot policies other than the gate's {default_policy!r} given to "
                                             f"a gate built with slot_state=False, which sends none (build every "
                                             f"rank's gate with slot_state=True)"))
        codes = None
    if slot_state is None and digests is not None:
        problems.append((wire.REASON_DIGEST, "digests given to a gate built with slot_state=False, which sends no "
                                             "digests (pass digests=None, or build every rank's gate with "
                                             "slot_state=True)"))
        dig = None
    else:
        dig = _slot_digests(digests, num_slots, device, problems)
    if problems:
        zeros = torch.zeros(num_slots, dtype=torch.int64, device=device)
        text = f"{call}: " + "; ".join(p for _, p in problems)
        return Prepared(zeros.bool(), zeros, zeros, 0, problems[0][0], text, policies=default_codes,
                        digests=default_digests)
    extra = [x for x in (codes, dig) if isinstance(x, list)]
    lists = [i for i, c in enumerate(coerced) if isinstance(c, list)]
    if lists or extra:
        moved = _to_device([coerced[i] for i in lists] + extra, device)
        for i, t in zip(lists, moved):
            coerced[i] = t
        moved = moved[len(lists):]
        if isinstance(codes, list):
            codes, moved = moved[0], moved[1:]
        if isinstance(dig, list):
            dig = moved[0]
    return Prepared(*coerced, site, policies=default_codes if codes is None else codes,
                    digests=default_digests if dig is None else dig)
