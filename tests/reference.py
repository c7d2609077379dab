"""A pure-Python reference for what one esper_gate sync must return.

It takes every rank's inputs and computes the expected decisions and report
from their meaning (who holds which stage, who voted what), with no bit
packing, so the property tests can hold the C++/CUDA kernels to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from esper_gate import wire


def capacity_for(num_slots: int) -> int:
    """Slot capacity of the buffer: the next power of two >= num_slots."""
    c = 1
    while c < num_slots:
        c <<= 1
    return c


def buffer_words(num_slots: int, world: int, slot_state: bool = False) -> int:
    """Words of the packed buffer, from docs/wire-format.md's arithmetic:
    three fixed words, then COUNTS (one bit_length(W)-bit counter per record
    bit), ROOT (the record), up to MAX_EXACT_WORLD ranks LANES (every rank's
    record, back to back), and REASONS (one counter as wide as COUNTS' per
    reason code 1..REASON_MAX). A slot is 13 record bits (vote, stage,
    target), or 47 with the slot state (its policy and digest too)."""
    slot_bits = 47 if slot_state else 13
    record_bits = wire.HEADER_BITS + slot_bits * capacity_for(num_slots)
    counters_per_word = wire.BITS_PER_WORD // world.bit_length()
    words = wire.FIXED_WORDS + -(-record_bits // counters_per_word) + -(-record_bits // wire.BITS_PER_WORD)
    if world <= wire.MAX_EXACT_WORLD:
        words += -(-world * record_bits // wire.BITS_PER_WORD)
    return words + -(-wire.REASON_MAX // counters_per_word)


def report_words(num_slots: int, world: int) -> int:
    """Words of the report: what expected() builds, counted."""
    words = wire.GLOBAL_WORDS + wire.SLOT_WORDS * num_slots
    if world <= wire.MAX_EXACT_WORLD:
        words += wire.RANK_WORDS * world + num_slots * world
    return words + wire.REASON_MAX  # how many ranks sent each reason code 1..REASON_MAX


@dataclass
class RankInput:
    """One rank's arguments to ``sync``. Values may be out of range (poison)."""

    votes: Sequence[int]
    stages: Sequence[int]
    targets: Sequence[int]
    seq: int = 0
    site: int = 0
    policy: str = "unanimous"
    poison: int = 0
    world: int | None = None  # the world size this rank passes (default: the real one)
    # Per slot: a policy (a name, or a code, which may be out of range) and a
    # state digest; None sends none (the call's policy in every slot, digest 0).
    policies: Sequence | None = None
    digests: Sequence[int] | None = None

    def slot_policy(self, s: int) -> int:
        p = self.policy if self.policies is None else self.policies[s]
        return wire.POLICY_CODES[p] if isinstance(p, str) else int(p)

    def slot_digest(self, s: int) -> int:
        return 0 if self.digests is None else int(self.digests[s])


def carries_slot_state(inputs: Sequence[RankInput]) -> bool:
    """Whether a call carries the slot state: some rank sends per-slot policies or
    digests. The ranks of a call agree on it (a GateSync fixes it at construction),
    so the others send their defaults then: the call's policy, digest 0."""
    return any(inp.policies is not None or inp.digests is not None for inp in inputs)


@dataclass
class _Record:
    header: dict
    slots: list = field(default_factory=list)  # (vote, stage, target, policy, digest) per capacity slot


def _record(inp: RankInput, world: int, capacity: int, slot_state: bool) -> _Record:
    n = len(inp.votes)
    reason = inp.poison
    if reason == 0 and not (0 <= inp.site <= wire.header_field_mask("site")):
        reason = wire.REASON_SITE
    if reason == 0:
        for k, (v, s, t) in enumerate(zip(inp.votes, inp.stages, inp.targets)):
            if int(v) not in (0, 1):
                reason = wire.REASON_VOTE
            elif not 0 <= s <= wire.MAX_ID:
                reason = wire.REASON_STAGE
            elif not 0 <= t <= wire.MAX_ID:
                reason = wire.REASON_TARGET
            elif not 0 <= inp.slot_policy(k) < len(wire.POLICIES):
                reason = wire.REASON_POLICY
            elif not 0 <= inp.slot_digest(k) <= wire.MAX_DIGEST:
                reason = wire.REASON_DIGEST
            if reason:
                break
    fields = {
        "seq": inp.seq,
        "site": inp.site,
        "policy": wire.POLICY_CODES[inp.policy],
        "slots": n,
        "world": inp.world if inp.world is not None else world,
        "poison": 1 if reason else 0,
        "reason": reason,
    }
    header = {name: value & wire.header_field_mask(name) for name, value in fields.items()}
    ids = wire.SLOT_ENTRY_ID_MASK
    slots = [(int(inp.votes[s]) & 1, inp.stages[s] & ids, inp.targets[s] & ids,
              inp.slot_policy(s) & wire.header_field_mask("policy"), inp.slot_digest(s) & wire.MAX_DIGEST)
             if s < n else (0, 0, 0, 0, 0) for s in range(capacity)]
    if not slot_state:
        # Without the slot state the wire has no policy or digest per slot: every
        # slot, padding included, has the rank's call policy and digest 0.
        slots = [(v, st, t, header["policy"], 0) for v, st, t, _p, _d in slots]
    return _Record(header, slots)


def _summary(values: list[int], width: int) -> dict:
    """AND, OR, rank 0's value and the bitwise lower bound of ranks differing from it."""
    root = values[0]
    all_and, any_or = (1 << width) - 1, 0
    for v in values:
        all_and &= v
        any_or |= v
    differ_lb = 0
    for b in range(width):
        rb = (root >> b) & 1
        differ_lb = max(differ_lb, sum(1 for v in values if (v >> b) & 1 != rb))
    return {"root": root, "and": all_and, "or": any_or, "differ_lb": differ_lb,
            "equal": all(v == root for v in values)}


def _passes(policy: str | int, votes: list[int], world: int) -> bool:
    if isinstance(policy, int):
        policy = wire.POLICIES[policy]
    yes = sum(votes)
    if policy == "unanimous":
        return yes == world
    if policy == "rank0":
        return votes[0] == 1
    if policy == "majority":
        return 2 * yes > world
    return yes >= 1


def expected(inputs: Sequence[RankInput], *, view: int = 0) -> tuple[list[bool], list[int]]:
    """Expected ``(decision, report)`` as rank ``view`` decodes them.

    The local view matters only for the slot count, the policy and the world
    size that rank checks the others against.
    """
    world = len(inputs)
    me = inputs[view]
    num_slots = len(me.votes)
    policy = me.policy
    capacity = capacity_for(num_slots)
    slot_state = carries_slot_state(inputs)
    records = [_record(inp, world, capacity, slot_state) for inp in inputs]
    exact = world <= wire.MAX_EXACT_WORLD

    g = [0] * wire.GLOBAL_WORDS
    flags = 0
    all_equal = True
    mismatch_flag = {"seq": wire.FLAG_SEQ_MISMATCH, "site": wire.FLAG_SITE_MISMATCH,
                     "policy": wire.FLAG_POLICY_MISMATCH, "slots": wire.FLAG_SLOTS_MISMATCH,
                     "world": wire.FLAG_WORLD_MISMATCH}
    summaries = {}
    for f, (name, _off, width) in enumerate(wire.HEADER_FIELDS):
        s = _summary([r.header[name] for r in records], width)
        summaries[name] = s
        base = wire.G_FIELD_BASE + wire.G_FIELD_STRIDE * f
        g[base:base + 5] = [s["root"], s["and"], s["or"], s["differ_lb"], int(s["equal"])]
        if name in mismatch_flag and not s["equal"]:
            flags |= mismatch_flag[name]
            all_equal = False
    if summaries["slots"]["equal"] and summaries["slots"]["root"] != num_slots:
        flags |= wire.FLAG_SLOTS_MISMATCH
        all_equal = False
    if summaries["policy"]["equal"] and summaries["policy"]["root"] != wire.POLICY_CODES[policy]:
        flags |= wire.FLAG_POLICY_MISMATCH
        all_equal = False
    if summaries["world"]["equal"] and summaries["world"]["root"] != world & wire.header_field_mask("world"):
        flags |= wire.FLAG_WORLD_MISMATCH
        all_equal = False
    poisoned_ranks = [r for r, rec in enumerate(records) if rec.header["poison"]]
    if poisoned_ranks:
        flags |= wire.FLAG_POISONED
    if exact:
        flags |= wire.FLAG_EXACT
    if slot_state:
        flags |= wire.FLAG_SLOT_STATE
    header_ok = not poisoned_ranks and all_equal
    if header_ok:
        flags |= wire.FLAG_HEADER_OK

    slot_words = []
    slot_ranks = []
    decisions = []
    for s in range(num_slots):
        votes = [rec.slots[s][0] for rec in records]
        stages = [rec.slots[s][1] for rec in records]
        targets = [rec.slots[s][2] for rec in records]
        policies = [rec.slots[s][3] for rec in records]
        digests = [rec.slots[s][4] for rec in records]
        st, tg = _summary(stages, wire.ID_BITS), _summary(targets, wire.ID_BITS)
        po, dg = _summary(policies, wire.HEADER_FIELD_WIDTH["policy"]), _summary(digests, wire.DIGEST_BITS)
        states = list(zip(stages, targets, policies, digests))
        if exact:
            stage_differ = sum(1 for v in stages if v != stages[0])
            target_differ = sum(1 for v in targets if v != targets[0])
            policy_differ = sum(1 for v in policies if v != policies[0])
            digest_differ = sum(1 for v in digests if v != digests[0])
            key_differ = sum(1 for k in states if k != states[0])
        else:
            stage_differ, target_differ = st["differ_lb"], tg["differ_lb"]
            policy_differ, digest_differ = po["differ_lb"], dg["differ_lb"]
            key_differ = max(stage_differ, target_differ, policy_differ, digest_differ)
        # The slot's own policy decides; ranks that differ on it diverge.
        passed = _passes(policies[0], votes, world)
        same_state = all(k == states[0] for k in states)
        no_gate = all(t == wire.NO_GATE for t in targets)
        status = 0
        if not st["equal"]:
            status |= wire.STATUS_STAGE_DIFFERS
        if not tg["equal"]:
            status |= wire.STATUS_TARGET_DIFFERS
        if not po["equal"]:
            status |= wire.STATUS_POLICY_DIFFERS
        if not dg["equal"]:
            status |= wire.STATUS_DIGEST_DIFFERS
        if no_gate:
            status |= wire.STATUS_NO_GATE
        if passed:
            status |= wire.STATUS_POLICY_PASSED
        if not (header_ok and same_state):
            status |= wire.STATUS_DIVERGED
        decided = header_ok and same_state and passed and not no_gate
        if decided:
            status |= wire.STATUS_DECIDED
        decisions.append(decided)
        slot_words += [status, sum(votes), votes[0], stages[0], targets[0], st["and"], st["or"],
                       tg["and"], tg["or"], stage_differ, target_differ, key_differ,
                       policies[0], po["and"], po["or"], policy_differ, digests[0], dg["and"], dg["or"], digest_differ]
        slot_ranks += [wire.slot_entry(v, a, b, p, d) for v, a, b, p, d in zip(votes, stages, targets, policies, digests)]

    g[wire.G_FLAGS] = flags
    g[wire.G_PRESENCE] = world
    g[wire.G_POISON_COUNT] = len(poisoned_ranks)
    g[wire.G_POISONED_RANK] = poisoned_ranks[0] if len(poisoned_ranks) == 1 else -1
    g[wire.G_WORLD] = world
    g[wire.G_SLOTS] = num_slots
    g[wire.G_CAPACITY] = capacity
    g[wire.G_DIVERGED] = sum(1 for k in range(num_slots) if slot_words[k * wire.SLOT_WORDS] & wire.STATUS_DIVERGED)
    g[wire.G_DECIDED] = sum(decisions)
    g[wire.G_POLICY] = wire.POLICY_CODES[policy]

    report = g + slot_words
    if exact:
        for rec in records:
            h = rec.header
            report += [h["seq"], h["site"], h["policy"], h["slots"], h["world"], h["poison"], h["reason"], 0]
        report += slot_ranks
    report += [sum(1 for rec in records if rec.header["reason"] == code) for code in range(1, wire.REASON_MAX + 1)]
    return decisions, report
