"""Drop-in gate sync for Esper's seed slots (``kasmina/slot.py``).

``sync_gate_decision(slot, gate_result)`` is the whole body of a
``SeedSlot._sync_gate_decision``; ``gate_round(slots, gate_results)`` does
every slot of a model in one round and tells every rank every slot's outcome,
also where it had no gate (``sync_gate_decisions`` is the same round,
returning gate results). Esper is not imported: a slot is
anything with ``slot_id``, ``state`` (None when empty, else an object with
``.stage``) and ``is_active``; a gate result is a dataclass with ``gate``,
``passed``, ``score``, ``checks_passed``, ``checks_failed``, ``message`` and
``timestamp``.

What comes back says what happened across ranks, in the gate result's own
vocabulary:

* ``"ddp_veto"`` in ``checks_failed``: this rank's gate passed, the others
  (under the policy) said no; the message names the ranks that voted no.
* ``"ddp_divergence"`` in ``checks_failed``: the ranks do not hold the same
  stage and gate for this slot, or are at another slot or gate call; nothing
  is adopted from another rank and no rank transitions the slot. The message
  names the ranks and what they hold.

A rank that never arrives is a ``GateTimeoutError`` naming it; bad input on a
rank is a ``GateInputError`` there and a ``GatePeerInputError`` elsewhere, in
the same call. That includes a slot or gate result the adapter cannot read (a
missing field, a stage or gate given by name, a gate id of ``NO_GATE``): it is
sent as this rank's bad input, never raised before the collective, where the
other ranks would wait out the timeout for this rank.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import operator
import os
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ._group import parent_group
from ._inputs import as_timedelta, names_problem, prepare, slot_state_defaults
from .errors import GateDivergenceError, GateInputError
from .esper import VOCABULARY, SeedStage
from .gate_sync import GateSync, site_fingerprint
from .report import MAX_TEXT_SLOTS, DivergenceReport, SlotDivergence, SlotVotes, bounded_text, ranks_text
from . import wire
from .wire import NO_GATE

__all__ = ["sync_gate_decision", "sync_gate_decisions", "gate_round", "RoundOutcome", "cached_gate_sync",
           "clear_cache", "VETO_CHECK", "DIVERGENCE_CHECK", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

VETO_CHECK = "ddp_veto"
DIVERGENCE_CHECK = "ddp_divergence"
TIMEOUT_ENV = "ESPER_GATE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0

# (parent group name, slot count, policy) -> (parent group, GateSync). The
# parent object is kept to tell a re-initialized world (which may reuse the
# name) from the one the GateSync was built on.
_cache: dict[tuple[str, int, str], tuple[Any, GateSync]] = {}


def clear_cache() -> None:
    """Forget every cached GateSync (stops their heartbeats).

    Call it on every rank, e.g. after a GateTimeoutError left the cached
    GateSync unusable, or before destroying the process group.
    """
    for _parent, gs in _cache.values():
        gs.close()
    _cache.clear()


def _resolve_timeout(timeout) -> datetime.timedelta:
    """The argument, else ``$ESPER_GATE_TIMEOUT``, else 60 s, checked as GateSync checks its own."""
    if timeout is not None:
        return as_timedelta(timeout)
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return as_timedelta(DEFAULT_TIMEOUT_S)
    try:
        return as_timedelta(float(text))
    except (ValueError, GateInputError):
        raise GateInputError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}") from None


def cached_gate_sync(num_slots: int, *, policy: str = "unanimous", group=None, timeout=None) -> GateSync:
    """The GateSync the adapters use for (group, num_slots, policy), built on first use.

    Building it is collective (a store rendezvous bounded by ``timeout``, then
    a dedicated process group), so every rank of the group must reach the
    first call; one that does not is named in a GateTimeoutError. ``timeout``
    (default: ``$ESPER_GATE_TIMEOUT`` seconds, else 60 s) is fixed when the
    GateSync is built. The caller must have checked that ``group`` spans more
    than one rank. Its reports print Esper's stage and gate names.

    Ranks that built it with other settings (a slot fewer on one rank) get its
    GateConfigError here, every one of them, and none keeps the gate: the next
    call builds anew on every rank, so the error ends with the round that
    caused it.
    """
    parent = group if group is not None else dist.group.WORLD
    key = (parent.group_name, num_slots, policy)
    hit = _cache.get(key)
    if hit is not None and hit[0] is parent:
        return hit[1]
    if hit is not None:  # a previous process group with the same name
        hit[1].close()
        del _cache[key]
    gs = GateSync(num_slots, policy=policy, group=parent, timeout=_resolve_timeout(timeout),
                  vocabulary=VOCABULARY)
    if gs.config_error is not None:
        # Every rank saw every rank's settings at the rendezvous, so every rank is here.
        # Kept on some ranks and not others, it would pair one rank's call with
        # another's construction in a later round: a timeout there, or a split.
        gs.close()
        raise gs.config_error
    _cache[key] = (parent, gs)
    return gs


# ---- reading a slot and a gate result -------------------------------------------
#
# What cannot be read is noted, not raised: with peers it travels as this rank's
# bad input in the call (a poisoned call), so every rank fails in that call.

_MISSING = object()
MAX_PROBLEMS_TEXT = 3  # problems spelled out in one error; the rest are counted


def _field(obj, name: str, where: str, problems: list):
    """``obj.name``, or _MISSING after noting why it cannot be read."""
    try:
        return getattr(obj, name)
    except AttributeError:
        problems.append(f"{where} ({type(obj).__name__}) has no {name}")
    except Exception as e:  # noqa: BLE001 - a property that raises: still this rank's input
        problems.append(f"{where}.{name} raised {type(e).__name__}: {e}")
    return _MISSING


def _id(value, what: str, example: str, where: str, problems: list) -> int:
    """An id as an int (out-of-range ids are left to the kernel, which names them)."""
    try:
        return operator.index(value)
    except TypeError:
        problems.append(f"{where}.{what} is {value!r}, expected a {what} id (an int such as {example})")
        return 0


def _slot_stage(slot, where: str, problems: list) -> int:
    """The slot's stage id; an empty slot (no state, or no stage) is DORMANT."""
    state = getattr(slot, "state", None)
    stage = getattr(state, "stage", None) if state is not None else None
    if stage is None:
        return int(SeedStage.DORMANT)
    return _id(stage, "stage", "SeedStage.TRAINING", f"{where}.state", problems)


def _slot_id(slot, where: str, problems: list) -> str:
    slot_id = _field(slot, "slot_id", where, problems)
    return "?" if slot_id is _MISSING else str(slot_id)


def _passed(result, where: str, problems: list) -> bool:
    passed = _field(result, "passed", where, problems)
    if passed is _MISSING:
        return False
    try:
        return bool(passed)
    except Exception as e:  # noqa: BLE001 - e.g. a tensor of several values
        problems.append(f"{where}.passed is {passed!r}, expected a bool ({type(e).__name__}: {e})")
        return False


def _gate(result, where: str, problems: list, hint: str) -> int:
    """The gate result's gate id. ``NO_GATE`` is refused: it would read as "no gate here"
    and quietly veto the slot."""
    gate = _field(result, "gate", where, problems)
    if gate is _MISSING:
        return 0
    gate = _id(gate, "gate", "GateLevel.G2", where, problems)
    if gate == NO_GATE:
        problems.append(f"{where}.gate is {NO_GATE}, which is esper_gate.NO_GATE (the entry of a slot "
                        f"without a gate), not a gate id{hint}")
    return gate


def _problem_text(problems: list[str]) -> str | None:
    if not problems:
        return None
    shown = problems[:MAX_PROBLEMS_TEXT]
    more = len(problems) - len(shown)
    return "; ".join(shown + ([f"… and {more} more"] if more else []))


def _with(gate_result, **changes):
    """A new gate result of the same type with ``changes`` applied."""
    if dataclasses.is_dataclass(gate_result) and not isinstance(gate_result, type):
        return dataclasses.replace(gate_result, **changes)
    out = copy.copy(gate_result)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def _joined(message, note: str) -> str:
    return f"{message}; {note}" if message else note


@dataclasses.dataclass
class _SlotOutcome:
    passed: bool
    check: str | None = None   # VETO_CHECK, DIVERGENCE_CHECK or None
    note: str | None = None    # appended to the message
    gate: int = NO_GATE        # the agreed target; this rank's own where the ranks' differ
    diverged: bool = False


def _resolved(gate_result, outcome: _SlotOutcome):
    changes: dict = {"passed": outcome.passed}
    if outcome.check is not None:
        changes["checks_failed"] = list(gate_result.checks_failed or []) + [outcome.check]
    if outcome.note is not None:
        changes["message"] = _joined(gate_result.message, outcome.note)
    return _with(gate_result, **changes)


# ---- the sync -------------------------------------------------------------------

def _call_mismatch_note(rep: DivergenceReport, my_site: int, slot_ids: Sequence[str]) -> str:
    """Why ranks were at different calls, in terms of slots (and stages, where known)."""
    single = len(slot_ids) == 1
    where = f"slot {slot_ids[0]}" if single else f"this layout of {len(slot_ids)} slots"
    if not rep.rank_calls:  # more than 64 ranks: only summaries are exact
        slots = [sd.describe() for sd in rep.diverged_slots[:MAX_TEXT_SLOTS]]
        if len(rep.diverged_slots) > MAX_TEXT_SLOTS:
            slots.append(f"… and {len(rep.diverged_slots) - MAX_TEXT_SLOTS} more diverged slot(s)")
        detail = "; ".join(rep.mismatch_lines() + slots)
    else:
        # every rank's (stage, target) still arrives when the calls differ
        held: dict[int, str] = {}
        if single and rep.diverged_slots and rep.diverged_slots[0].exact:
            for h in rep.diverged_slots[0].holdings:
                for r in h.ranks:
                    held[r] = rep.vocabulary.holding(h.stage, h.target)
        groups: dict[tuple, list[int]] = {}
        for rc in rep.rank_calls:
            groups.setdefault((rc.site == my_site, rc.seq, rc.site, held.get(rc.rank)), []).append(rc.rank)
        parts = []
        for (same_site, seq, site, holding), ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
            what = where if same_site else "another slot or slot layout"
            state = f", holding {holding}" if holding else ""
            call = f"gate call {seq}" + ("" if same_site else f", site {site:#010x}")
            parts.append(f"{ranks_text(ranks)} at {what}{state} ({call})")
        detail = "; ".join(parts)
    return bounded_text(f"{DIVERGENCE_CHECK}: ranks are at different gate calls: {detail}; no rank transitions {where}")


def _slot_divergence_note(sd: SlotDivergence | None, slot_id: str) -> str:
    if sd is None:
        return f"{DIVERGENCE_CHECK}: slot {slot_id} diverged; no rank transitions it"
    return (f"{DIVERGENCE_CHECK}: ranks do not hold the same state in slot {slot_id}: {sd.holdings_text()}; "
            f"nothing is adopted from another rank and no rank transitions this slot")


def _vote_note(slot: SlotVotes, world: int, vote: bool, policy: str) -> str:
    if slot.votes:
        who = f"{ranks_text(slot.ranks_voting(False))} voted no"
    else:  # above 64 ranks only the count arrives
        who = f"{world - slot.yes} of {world} ranks voted no"
    if vote:
        return f"{VETO_CHECK}: {who} ({slot.yes} of {world} passed, {policy} policy); no rank transitions this slot"
    return f"passed by {policy} consensus although this rank's gate failed: {who} ({slot.yes} of {world} passed)"


def _slot_outcome(slot: SlotVotes, sd: SlotDivergence | None, slot_id: str, vote: bool, world: int,
                  policy: str) -> _SlotOutcome:
    if slot.diverged:
        return _SlotOutcome(False, DIVERGENCE_CHECK, _slot_divergence_note(sd, slot_id))
    if slot.no_gate:
        return _SlotOutcome(False)
    if slot.decided == vote:
        return _SlotOutcome(slot.decided)
    return _SlotOutcome(slot.decided, VETO_CHECK if vote else None, _vote_note(slot, world, vote, policy))


def _sync_report(gs: GateSync, votes: list[bool], stages: list[int], targets: list[int], site: int | None,
                 **per_call) -> DivergenceReport:
    """This call's report, whether or not the ranks agreed.

    Ranks at different calls or slots held differently come back from
    GateSync as a GateDivergenceError (at the call on CPU, at the first read
    on CUDA); for the adapters that is an outcome to report per slot, so its
    report is returned like any other. Bad input on a rank, and a corrupt
    buffer that no slot outcome can be read from, still raise.
    """
    try:
        return gs(votes, stages, targets, site=site, **per_call).raise_if_diverged().report()
    except GateDivergenceError as e:
        if e.report is None or e.report.corrupt:
            raise
        return e.report


def _sync_slots(gs: GateSync, slot_ids: list[str], votes: list[bool], stages: list[int],
                targets: list[int], policies: Sequence[str | None] | None = None,
                digests: Sequence[int | None] | None = None, names: list[str] | None = None,
                bad_input: str | None = None) -> list[_SlotOutcome]:
    """One sync of these slots, and each slot's outcome on this rank. ``names`` (default:
    the slot ids) are what the notes and the call's fingerprint use. ``bad_input``: what
    could not be read from this rank's slots and gate results; the call runs poisoned."""
    n = len(slot_ids)
    given = names
    names = slot_ids if names is None or names_problem(names, n) is not None else names
    site = site_fingerprint(n, names)
    # Names, policies or digests this rank cannot use are its bad input, raised by GateSync
    # after the call, as is what it could not read.
    rep = _sync_report(gs, votes, stages, targets, site, names=given if given is not None else names,
                       policies=policies, digests=digests, bad_input=bad_input)
    if not rep.header_ok:
        note = _call_mismatch_note(rep, site, names)
        return [_SlotOutcome(False, DIVERGENCE_CHECK, note, targets[i], True) for i in range(n)]
    divergences = {sd.slot: sd for sd in rep.diverged_slots}
    outcomes = []
    for i in range(n):
        slot = rep.slots[i]
        o = _slot_outcome(slot, divergences.get(i), names[i], votes[i], gs.world_size, slot.policy)
        o.diverged = slot.diverged
        o.gate = targets[i] if slot.status & wire.STATUS_TARGET_DIFFERS else slot.target
        outcomes.append(o)
    return outcomes


# ---- the adapters ---------------------------------------------------------------

def sync_gate_decision(slot, gate_result, *, policy: str = "unanimous", group=None, timeout=None):
    """The body of a drop-in ``SeedSlot._sync_gate_decision``.

    Returns ``gate_result`` itself when torch.distributed is not initialized
    or the group has one rank. Otherwise issues one esper_gate sync for this
    slot (vote = ``passed``, stage = the slot's stage, target = the gate) on
    every rank and returns a new gate result of the same type whose
    ``passed`` is the consensus; see the module docstring for the
    ``checks_failed`` entries. Every rank must make the same gate calls in the
    same order; a rank that does not is reported, never waited on forever.
    A slot or gate result it cannot read (``gate_result`` None, a missing
    field, a gate id of ``NO_GATE``) is a GateInputError here and a
    GatePeerInputError on the other ranks, in the same call; without peers,
    a GateInputError.
    """
    problems: list[str] = []
    slot_id, stage = _slot_id(slot, "slot", problems), _slot_stage(slot, "slot", problems)
    if gate_result is None:
        problems.append("gate_result is None: sync_gate_decision decides a gate this rank checked "
                        "(gate_round takes None for a slot without a gate)")
        vote, target = False, 0
    else:
        vote = _passed(gate_result, "gate_result", problems)
        target = _gate(gate_result, "gate_result", problems, "")
    problem = _problem_text(problems)
    parent = parent_group(group)
    if parent is None:
        if problem is not None:
            raise GateInputError(f"sync_gate_decision: {problem}")
        return gate_result
    gs = cached_gate_sync(1, policy=policy, group=parent, timeout=timeout)
    [outcome] = _sync_slots(gs, [slot_id], [vote], [stage], [target],
                            bad_input=None if problem is None else f"sync_gate_decision: {problem}")
    return _resolved(gate_result, outcome)


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """One slot's outcome of a ``gate_round``, the same on every rank except ``gate_result``.

    Attributes:
        name: the slot's name in this round (as given in ``names``, else its slot id).
        gate: the gate the ranks agreed on (an Esper ``GateLevel`` value), or None when no
            rank had a gate in this slot. Where the ranks held different gates (the slot
            diverged), this rank's own gate, or None where it had none.
        passed: apply the transition. True only when every rank holds the same stage, gate,
            policy and digest in the slot and its policy passed: then it is True on every rank.
        diverged: the ranks did not agree on the slot (or on the call); nothing is applied
            on any rank, also where this rank had no gate.
        note: why, in words ("ddp_divergence: ... rank 2 holds DORMANT -> no gate", a veto
            naming the ranks that voted no), or None when there is nothing to explain.
        gate_result: this rank's gate result resolved by the round (a new object of its type,
            as ``sync_gate_decisions`` returns it), or None where this rank had no gate.
    """
    name: str
    gate: int | None
    passed: bool
    diverged: bool
    note: str | None = None
    gate_result: Any = None


class _RoundInputs(NamedTuple):
    """A round's slots and gate results as the sync takes them, one entry per slot."""
    results: list        # the gate results, None where a slot has none
    ids: list[str]
    votes: list[bool]    # passed, on an active seed
    passed: list[bool]   # the gate result's own passed (False where there is none)
    stages: list[int]
    targets: list[int]   # the gate id, NO_GATE where there is no gate result
    problem: str | None  # what could not be read, or None


def _round_inputs(slots: list, gate_results, what: str) -> _RoundInputs:
    n = len(slots)
    problems: list[str] = []
    try:
        results = list(gate_results)
    except TypeError:
        problems.append(f"gate_results must be a sequence of {n} gate results (or None), "
                        f"got {type(gate_results).__name__}")
        results = []
    if len(results) != n and not problems:
        problems.append(f"got {n} slots but {len(results)} gate results")
    results = (results + [None] * n)[:n]
    ids = [_slot_id(s, f"slots[{i}]", problems) for i, s in enumerate(slots)]
    stages = [_slot_stage(s, f"slots[{i}]", problems) for i, s in enumerate(slots)]
    passed, votes, targets = [], [], []
    for i, (s, r) in enumerate(zip(slots, results)):
        if r is None:
            passed.append(False)
            votes.append(False)
            targets.append(NO_GATE)
            continue
        where = f"gate_results[{i}]"
        passed.append(_passed(r, where, problems))
        active = _field(s, "is_active", f"slots[{i}]", problems)
        votes.append(passed[-1] and active is not _MISSING and bool(active))
        targets.append(_gate(r, where, problems, "; pass None as the gate result of a slot without a gate"))
    problem = _problem_text(problems)
    return _RoundInputs(results, ids, votes, passed, stages, targets, None if problem is None else f"{what}: {problem}")


def _check_alone(inputs: _RoundInputs, n: int, *, policy, policies, names, digests, what: str) -> None:
    """Without peers nothing waits on this rank: bad input raises here, found by the same
    rules as with peers (``prepare``, which a GateSync runs on every call)."""
    if inputs.problem is not None:  # what prepare would send first (named already)
        raise GateInputError(inputs.problem)
    cpu = torch.device("cpu")
    p = prepare(inputs.votes, inputs.stages, inputs.targets, None, num_slots=n, device=cpu, default_site=0,
                call=what, policies=policies, digests=digests, default_policy=policy, names=names,
                # the adapters' gates carry the slot state (cached_gate_sync)
                slot_state=slot_state_defaults(n, policy, cpu) if policy in wire.POLICY_CODES and n else None)
    if p.problem is not None:
        raise GateInputError(p.problem)


def _round(slots, gate_results, *, policy, policies, names, digests, group, timeout, what):
    """The shared body of gate_round and sync_gate_decisions: (outcomes or None outside a
    multi-rank process group, the round's inputs)."""
    try:
        slots = list(slots)
    except TypeError:
        # Without a slot count there is no gate to send it on: the layout itself is wrong.
        raise GateInputError(f"{what}: slots must be a sequence of slots, got {type(slots).__name__}") from None
    inputs = _round_inputs(slots, gate_results, what)
    n = len(slots)
    if names is not None and not isinstance(names, (str, bytes)) and hasattr(names, "__iter__"):
        names = [str(x) for x in names]  # a wrong count or a non-sequence travels as bad input (prepare)
    parent = parent_group(group)
    if parent is None or not slots:
        _check_alone(inputs, n, policy=policy, policies=policies, names=names, digests=digests, what=what)
        return None, inputs
    gs = cached_gate_sync(n, policy=policy, group=parent, timeout=timeout)
    outcomes = _sync_slots(gs, inputs.ids, inputs.votes, inputs.stages, inputs.targets, policies=policies,
                           digests=digests, names=names, bad_input=inputs.problem)
    for passed, vote, outcome in zip(inputs.passed, inputs.votes, outcomes):
        if passed and not vote and outcome.note is None:
            outcome.note = "this rank voted no: the slot has no active seed here"
    return outcomes, inputs


def sync_gate_decisions(slots: Sequence, gate_results: Sequence, *, policy: str = "unanimous", group=None,
                        timeout=None, policies: Sequence[str | None] | None = None,
                        names: Sequence[str] | None = None, digests: Sequence[int | None] | None = None) -> list:
    """Every slot of a model in one sync (one collective per round).

    ``gate_results[i]`` is the local gate result for ``slots[i]``, or None
    where no gate was checked. Every slot takes part, so ranks whose slots
    hold different seeds get a divergence report instead of a deadlock: a slot
    without an active seed votes no, and a slot without a gate result sends
    the no-gate entry (``esper_gate.NO_GATE``), so a rank at a gate where
    another has none diverges. Returns the new gate results in order (None
    stays None: ``gate_round`` also tells such a rank the slot's outcome);
    outside a multi-rank process group, the given objects unchanged.
    ``policies``, ``names`` and ``digests`` are as in ``gate_round``.
    """
    outcomes, inputs = _round(slots, gate_results, policy=policy, policies=policies, names=names,
                              digests=digests, group=group, timeout=timeout, what="sync_gate_decisions")
    if outcomes is None:
        return inputs.results
    return [None if r is None else _resolved(r, o) for r, o in zip(inputs.results, outcomes)]


def gate_round(slots: Sequence, gate_results: Sequence, *, policy: str = "unanimous",
               policies: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
               digests: Sequence[int | None] | None = None, group=None, timeout=None) -> list[RoundOutcome]:
    """One gate round for every slot of a model: one sync, one collective, on every rank.

    Call it on every rank once per round (in Esper, once per model per epoch),
    with the same slots in the same order, whatever each rank's local state:

    * ``gate_results[i]`` is this rank's gate result for ``slots[i]``, or None
      where this rank checked no gate this round (the slot then sends the
      no-gate entry, ``esper_gate.NO_GATE``, distinct from G0).
    * ``policy``: the default policy; ``policies[i]`` (None: ``policy``) is
      slot i's, e.g. "unanimous" for G5 and "rank0" for G2, carried on the wire
      and checked across ranks like the stage.
    * ``names[i]``: slot i's name in notes and errors (default: its
      ``slot_id``); pass env-qualified names ("env3/r0c0") when several models
      share slot ids. The names also make the round's fingerprint.
    * ``digests[i]``: slot i's state digest (``esper_gate.state_digest`` of
      alpha step, controller mode, seed and blueprint ids, ...; None: 0);
      ranks whose digests differ diverge on the slot, and the note says which
      ranks hold which digest.

    Returns one ``RoundOutcome`` per slot, in order: every rank learns every
    slot's outcome, including slots where it had no gate. Apply a transition
    exactly where ``passed`` is True. Outside a multi-rank process group each
    gate result stands as it is (``passed`` is its own ``passed``).

    Bad input on a rank (a gate result missing or unreadable, a gate id of
    ``NO_GATE``, a stage by name, names, policies or digests of the wrong kind
    or count) is a GateInputError there and a GatePeerInputError on the other
    ranks, in this round; without peers, a GateInputError.
    """
    outcomes, inputs = _round(slots, gate_results, policy=policy, policies=policies, names=names,
                              digests=digests, group=group, timeout=timeout, what="gate_round")
    labels = [str(x) for x in names] if names is not None else inputs.ids
    if outcomes is None:
        return [RoundOutcome(labels[i], None if r is None else inputs.targets[i], inputs.passed[i],
                             False, None, r) for i, r in enumerate(inputs.results)]
    return [RoundOutcome(labels[i], o.gate if o.gate != NO_GATE else None, o.passed, o.diverged, o.note,
                         None if r is None else _resolved(r, o))
            for i, (r, o) in enumerate(zip(inputs.results, outcomes))]
