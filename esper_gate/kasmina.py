"""Drop-in gate sync for Esper's seed slots (``kasmina/slot.py``).

``sync_gate_decision(slot, gate_result)`` is the whole body of a
``SeedSlot._sync_gate_decision``; ``sync_gate_decisions(slots, gate_results)``
does every slot of a model in one round. Esper is not imported: a slot is
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
rank is a ``GateInputError`` there and a ``GatePeerInputError`` elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import os
from typing import Any, Sequence

import torch.distributed as dist

from . import wire
from .errors import GateDivergenceError, GateInputError
from .gate_sync import GateConsensus, GateSync, site_fingerprint
from .report import DivergenceReport, _ranks_text, gate_name, stage_name

__all__ = ["sync_gate_decision", "sync_gate_decisions", "cached_gate_sync", "clear_cache",
           "VETO_CHECK", "DIVERGENCE_CHECK", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

VETO_CHECK = "ddp_veto"
DIVERGENCE_CHECK = "ddp_divergence"
TIMEOUT_ENV = "ESPER_GATE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
DORMANT = 1  # Esper's stage id of an empty slot

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
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if not text:
            return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise GateInputError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
        return datetime.timedelta(seconds=seconds)
    if isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


def _distributed_group(group):
    """The group to agree over, or None when there is nobody to agree with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    parent = group if group is not None else dist.group.WORLD
    if dist.get_world_size(parent) == 1:
        return None
    return parent


def cached_gate_sync(num_slots: int, *, policy: str = "unanimous", group=None, timeout=None) -> GateSync:
    """The GateSync the adapters use for (group, num_slots, policy), built on first use.

    Building it is collective (a store rendezvous bounded by ``timeout``, then
    a dedicated process group), so every rank of the group must reach the
    first call; one that does not is named in a GateTimeoutError. ``timeout``
    (default: ``$ESPER_GATE_TIMEOUT`` seconds, else 60 s) is fixed when the
    GateSync is built. The caller must have checked that ``group`` spans more
    than one rank.
    """
    parent = group if group is not None else dist.group.WORLD
    key = (parent.group_name, num_slots, policy)
    hit = _cache.get(key)
    if hit is not None and hit[0] is parent:
        return hit[1]
    if hit is not None:  # a previous process group with the same name
        hit[1].close()
        del _cache[key]
    gs = GateSync(num_slots, policy=policy, group=parent, timeout=_resolve_timeout(timeout))
    _cache[key] = (parent, gs)
    return gs


# ---- reading a slot and a gate result -------------------------------------------

def _slot_stage(slot) -> int:
    state = getattr(slot, "state", None)
    stage = getattr(state, "stage", None) if state is not None else None
    return DORMANT if stage is None else int(stage)


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


def _resolved(gate_result, outcome: _SlotOutcome):
    changes: dict = {"passed": outcome.passed}
    if outcome.check is not None:
        changes["checks_failed"] = list(gate_result.checks_failed or []) + [outcome.check]
    if outcome.note is not None:
        changes["message"] = _joined(gate_result.message, outcome.note)
    return _with(gate_result, **changes)


# ---- the sync -------------------------------------------------------------------

def _report_words(consensus: GateConsensus) -> list[int]:
    # The per-rank votes of agreed slots are only in the raw report.
    return consensus.report_words()


def _holdings_text(sd) -> str:
    """'ranks 0-1 hold TRAINING -> G2; rank 2 holds BLENDING -> G3' for one diverged slot."""
    if not sd.exact:
        return sd.describe()
    return "; ".join(f"{_ranks_text(h.ranks)} {'holds' if len(h.ranks) == 1 else 'hold'} "
                     f"{stage_name(h.stage)} -> {gate_name(h.target)}" for h in sd.holdings)


def _call_mismatch_note(rep: DivergenceReport, my_site: int, my_seq: int, slot_ids: Sequence[str]) -> str:
    """Why ranks were at different calls, in terms of slots (and stages, where known)."""
    single = len(slot_ids) == 1
    where = f"slot {slot_ids[0]}" if single else f"this layout of {len(slot_ids)} slots"
    if not rep.rank_calls:  # more than 64 ranks: only summaries are exact
        detail = "; ".join(line.strip() for line in str(rep).splitlines()[1:-1])
    else:
        # every rank's (stage, target) still arrives when the calls differ
        held: dict[int, str] = {}
        if single and rep.diverged_slots and rep.diverged_slots[0].exact:
            for h in rep.diverged_slots[0].holdings:
                for r in h.ranks:
                    held[r] = f"{stage_name(h.stage)} -> {gate_name(h.target)}"
        groups: dict[tuple, list[int]] = {}
        for rc in rep.rank_calls:
            groups.setdefault((rc.site == my_site, rc.seq, rc.site, held.get(rc.rank)), []).append(rc.rank)
        parts = []
        for (same_site, seq, site, holding), ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
            what = where if same_site else "another slot or slot layout"
            state = f", holding {holding}" if holding else ""
            call = f"gate call {seq}" + ("" if same_site else f", site {site:#010x}")
            parts.append(f"{_ranks_text(ranks)} at {what}{state} ({call})")
        detail = "; ".join(parts)
    return f"{DIVERGENCE_CHECK}: ranks are at different gate calls: {detail}; no rank transitions {where}"


def _slot_divergence_note(sd, slot_id: str) -> str:
    return (f"{DIVERGENCE_CHECK}: ranks do not hold the same state in slot {slot_id}: {_holdings_text(sd)}; "
            f"nothing is adopted from another rank and no rank transitions this slot")


def _vote_note(words: list[int], index: int, num_slots: int, world: int, vote: bool, passed: bool,
               policy: str) -> str:
    slot_words = words[wire.GLOBAL_WORDS + wire.SLOT_WORDS * index:][:wire.SLOT_WORDS]
    yes_count = slot_words[wire.S_VOTES]
    if world <= wire.MAX_EXACT_WORLD:
        base = wire.slot_ranks_offset(num_slots, world) + index * world
        no_ranks = [k for k in range(world) if not (words[base + k] >> 12) & 1]
        who = f"{_ranks_text(no_ranks)} voted no"
    else:
        who = f"{world - yes_count} of {world} ranks voted no"
    if vote and not passed:
        return f"{VETO_CHECK}: {who} ({yes_count} of {world} passed, {policy} policy); no rank transitions this slot"
    return f"passed by {policy} consensus although this rank's gate failed: {who} ({yes_count} of {world} passed)"


def _sync_slots(gs: GateSync, slot_ids: list[str], votes: list[bool], stages: list[int],
                targets: list[int]) -> list[_SlotOutcome]:
    n = len(slot_ids)
    site = site_fingerprint(n, slot_ids)
    my_seq = gs.calls + 1
    try:
        consensus = gs(votes, stages, targets, site=site)
        consensus.raise_if_diverged()
    except GateDivergenceError as e:
        rep = e.report
        if rep is None or rep.corrupt:
            raise
        if not rep.header_ok:
            note = _call_mismatch_note(rep, site, my_seq, slot_ids)
            return [_SlotOutcome(False, DIVERGENCE_CHECK, note) for _ in range(n)]
        # some slots diverged: the others were decided normally

    rep = consensus.report()
    decisions = consensus.host_decisions()
    diverged = {sd.slot: sd for sd in rep.diverged_slots}
    flags = consensus.diverged.tolist()
    words: list[int] | None = None
    outcomes = []
    for i in range(n):
        if i in diverged or flags[i]:
            sd = diverged.get(i)
            note = (_slot_divergence_note(sd, slot_ids[i]) if sd is not None else
                    f"{DIVERGENCE_CHECK}: slot {slot_ids[i]} diverged; no rank transitions it")
            outcomes.append(_SlotOutcome(False, DIVERGENCE_CHECK, note))
            continue
        passed = bool(decisions[i])
        if passed == votes[i]:
            outcomes.append(_SlotOutcome(passed))
            continue
        if words is None:
            words = _report_words(consensus)
        note = _vote_note(words, i, n, gs.world_size, votes[i], passed, gs.policy)
        outcomes.append(_SlotOutcome(passed, VETO_CHECK if votes[i] else None, note))
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
    """
    parent = _distributed_group(group)
    if parent is None:
        return gate_result
    gs = cached_gate_sync(1, policy=policy, group=parent, timeout=timeout)
    [outcome] = _sync_slots(gs, [str(slot.slot_id)], [bool(gate_result.passed)], [_slot_stage(slot)],
                            [int(gate_result.gate)])
    return _resolved(gate_result, outcome)


def sync_gate_decisions(slots: Sequence, gate_results: Sequence, *, policy: str = "unanimous", group=None,
                        timeout=None) -> list:
    """Every slot of a model in one sync (one collective per round).

    ``gate_results[i]`` is the local gate result for ``slots[i]``, or None
    where no gate was checked. Every slot takes part, so ranks whose slots
    hold different seeds get a divergence report instead of a deadlock: a slot
    without an active seed, or without a gate result, votes no (target: its
    result's gate, else 0). Returns the new gate results in order (None stays
    None); outside a multi-rank process group, the given objects unchanged.
    """
    slots, gate_results = list(slots), list(gate_results)
    if len(slots) != len(gate_results):
        raise GateInputError(f"sync_gate_decisions got {len(slots)} slots but {len(gate_results)} gate results")
    parent = _distributed_group(group)
    if parent is None or not slots:
        return gate_results
    gs = cached_gate_sync(len(slots), policy=policy, group=parent, timeout=timeout)
    votes = [bool(r is not None and s.is_active and r.passed) for s, r in zip(slots, gate_results)]
    targets = [int(r.gate) if r is not None else 0 for r in gate_results]
    stages = [_slot_stage(s) for s in slots]
    outcomes = _sync_slots(gs, [str(s.slot_id) for s in slots], votes, stages, targets)
    for result, vote, outcome in zip(gate_results, votes, outcomes):
        if result is not None and result.passed and not vote and outcome.note is None:
            outcome.note = "this rank voted no: the slot has no active seed here"
    return [None if r is None else _resolved(r, o) for r, o in zip(gate_results, outcomes)]
