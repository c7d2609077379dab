"""DivergenceReport: the decoded report of one sync, as data and as text."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from . import wire


@dataclass(frozen=True)
class Vocabulary:
    """The names a report prints for stage and target ids, given by its caller.

    The wire format knows ids only; what they mean belongs to the caller. An
    id without a name prints as "stage 3" or "target 4".
    """
    stages: Mapping[int, str] = field(default_factory=dict)
    targets: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self):
        # copies, so a caller's later edits cannot change reports already made
        object.__setattr__(self, "stages", {int(k): str(v) for k, v in self.stages.items()})
        object.__setattr__(self, "targets", {int(k): str(v) for k, v in self.targets.items()})

    def stage(self, stage: int) -> str:
        return self.stages.get(stage, f"stage {stage}")

    def target(self, target: int) -> str:
        """The caller's name for a target id; ``wire.NO_GATE`` is "no gate" unless the caller names it."""
        if target == wire.NO_GATE and target not in self.targets:
            return NO_GATE_TEXT
        return self.targets.get(target, f"target {target}")

    def holding(self, stage: int, target: int) -> str:
        """'stage 3 -> target 2', or the caller's names for them: a (stage, target) pair in a report."""
        return f"{self.stage(stage)} -> {self.target(target)}"

    def to_dict(self) -> dict:
        return {"stages": dict(self.stages), "targets": dict(self.targets)}


DEFAULT_VOCABULARY = Vocabulary()
# What a report prints for the target of a slot with no gate: "EMBARGOED -> no gate".
NO_GATE_TEXT = "no gate"

# Every report counts the poisoned ranks per reason (reason_counts), at any
# world size; above 64 ranks it names a poisoned rank only when it is alone.
# This text stands in for reasons that did not arrive, which only a buffer
# that honest ranks cannot have sent (also marked corrupt) leaves.
NO_REASON_TEXT = "reason not received"

# Report text (str(report), describe(), holdings_text(), mismatch_lines() and
# the error messages built from them) goes to logs and exceptions, read by
# people; to_dict() is the data and keeps everything. Unbounded, 64 ranks x
# 1,024 slots all diverged printed 2.4 MB. So the text names the first few of
# each list and counts the rest, and a whole text is cut at MAX_TEXT_CHARS
# whatever the caller's names: at any world size and slot count a report's
# text, and an error message made from it, stays under 8 KB of ASCII.
MAX_TEXT_SLOTS = 8      # diverged slots str(report) describes
MAX_TEXT_GROUPS = 3     # groups of ranks named per slot, per header field, and bad-input reasons
MAX_TEXT_CHARS = 8000   # the cap on a whole text


def ranks_text(ranks: Sequence[int]) -> str:
    """'rank 3', 'ranks 0-2,5' or 'no rank': a set of ranks as the error messages name them."""
    ranks = sorted(ranks)
    if not ranks:
        return "no rank"
    parts, start, prev = [], ranks[0], ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def reason_text(code: int) -> str:
    """'a stage id outside 0..63', or 'reason code 20' for a code with no text: one reason as reports name it."""
    return wire.REASON_TEXT.get(code, f"reason code {code}")


def bits_text(noun: str, all_and: int, any_or: int, hex_width: int = 0) -> str:
    """'stages share bits 0b001 and use no bits outside 0b111': what above 64 ranks
    the AND and OR of every rank's value say. They are not a range: stages 3 and 5
    give AND 1 and OR 7. ``hex_width``: print in hex with this many digits."""
    if hex_width:
        a, o = f"{all_and:#0{hex_width + 2}x}", f"{any_or:#0{hex_width + 2}x}"
    else:
        width = max(any_or.bit_length(), all_and.bit_length(), 1)
        a, o = f"{all_and:#0{width + 2}b}", f"{any_or:#0{width + 2}b}"
    return f"{noun} share bits {a} and use no bits outside {o}"


def bounded_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (at a line end when one is near),
    ending with how many characters were left out."""
    if len(text) <= limit:
        return text
    room = limit - 80  # for the note, whose count has at most 20 digits
    cut = text.rfind("\n", room // 2, room)
    cut = cut if cut > 0 else room
    return f"{text[:cut]}\n… and {len(text) - cut} more characters (the report's to_dict() has it all)"


def _more(shown: int, total: int, what: str, ranks: int) -> list[str]:
    """['… and 5 more holding(s) on 12 rank(s)'] for what a text leaves out, or []."""
    return [f"… and {total - shown} more {what} on {ranks} rank(s)"] if total > shown else []


@dataclass
class SlotVotes:
    """How the ranks voted in one slot and what they held there, for every slot.

    ``yes`` is exact at every world size; the per-rank lists are filled in
    exact mode only (world <= 64) and are empty above it.
    """
    slot: int
    name: str
    status: int                      # wire.STATUS_* bits
    yes: int                         # ranks that voted pass
    votes: list[bool]                # per rank
    stages: list[int]                # per rank
    targets: list[int]               # per rank (wire.NO_GATE: no gate there)
    policies: list[str] = field(default_factory=list)  # per rank: the slot's policy there
    digests: list[int] = field(default_factory=list)   # per rank: the slot's state digest there
    target: int = 0                  # rank 0's target (everyone's unless the targets differ)
    policy: str = "unanimous"        # rank 0's policy for the slot, the one that decides it
    digest: int = 0                  # rank 0's digest

    @property
    def decided(self) -> bool:
        """Passed on every rank: the ranks agreed on the slot and the policy passed it."""
        return bool(self.status & wire.STATUS_DECIDED)

    @property
    def diverged(self) -> bool:
        """Not agreed, so never transitioned (the calls differ, or the slot's state does)."""
        return bool(self.status & wire.STATUS_DIVERGED)

    @property
    def no_gate(self) -> bool:
        """No rank had a gate in this slot (every rank sent wire.NO_GATE): nothing to pass."""
        return bool(self.status & wire.STATUS_NO_GATE)

    def ranks_voting(self, passed: bool) -> list[int]:
        """The ranks that voted ``passed`` (exact mode; empty above 64 ranks)."""
        return [k for k, v in enumerate(self.votes) if v == passed]


@dataclass
class Holding:
    """Ranks that hold the same (stage, target) in one slot."""
    stage: int
    target: int
    ranks: list[int]
    votes_passed: list[int] = field(default_factory=list)
    policy: str | None = None        # the slot's policy on these ranks
    digest: int | None = None        # the slot's state digest on these ranks


@dataclass
class SlotDivergence:
    slot: int
    name: str
    exact: bool
    stage_differs: bool
    target_differs: bool
    holdings: list[Holding]          # exact (world <= 64); empty otherwise
    rank0_stage: int
    rank0_target: int
    ranks_differing: int             # exact when `exact`, else a lower bound
    stage_range: tuple[int, int]     # (AND, OR) of every rank's stage: bits all share, bits any uses
    target_range: tuple[int, int]
    vocabulary: Vocabulary = field(default_factory=lambda: DEFAULT_VOCABULARY, repr=False, compare=False)
    policy_differs: bool = False
    digest_differs: bool = False
    rank0_policy: str = "unanimous"
    rank0_digest: int = 0
    policy_range: tuple[int, int] = (0, 0)  # (AND, OR) of the policy codes
    digest_range: tuple[int, int] = (0, 0)  # (AND, OR) of the digests

    def _state(self, stage: int, target: int, policy: str | None, digest: int | None) -> str:
        """'BLENDING -> G3', with the policy and digest where the ranks differ on them."""
        text = self.vocabulary.holding(stage, target)
        if self.policy_differs and policy is not None:
            text += f" under {policy}"
        if self.digest_differs and digest is not None:
            text += f" with digest {digest:#010x}"
        return text

    def describe(self, limit: int | None = MAX_TEXT_GROUPS) -> str:
        """'slot r0c1 (#1): ' and what the ranks hold there (see ``holdings_text``)."""
        return f"slot {self.name} (#{self.slot}): {self.holdings_text(limit)}"

    def holdings_text(self, limit: int | None = MAX_TEXT_GROUPS) -> str:
        """'ranks 0-1 hold stage 3 -> target 2; rank 2 holds stage 4 -> target 3' (in the
        vocabulary's names), or above 64 ranks, rank 0's state and the bits everyone's
        share and use (``bits_text``). The ``limit`` largest groups of ranks are named
        and the rest counted ("… and 5 more holding(s) on 9 rank(s)"); None names all."""
        if self.exact:
            shown = self.holdings if limit is None else self.holdings[:limit]
            rest = self.holdings[len(shown):]
            return "; ".join([f"{ranks_text(h.ranks)} {'holds' if len(h.ranks) == 1 else 'hold'} "
                              f"{self._state(h.stage, h.target, h.policy, h.digest)}" for h in shown]
                             + _more(len(shown), len(self.holdings), "holding(s)",
                                     sum(len(h.ranks) for h in rest)))
        extra = ""
        if self.policy_differs:
            extra += ", " + bits_text("policy codes", *self.policy_range)
        if self.digest_differs:
            extra += ", " + bits_text("digests", *self.digest_range, hex_width=8)
        return (f"rank 0 holds {self._state(self.rank0_stage, self.rank0_target, self.rank0_policy, self.rank0_digest)}; "
                f"at least {self.ranks_differing} rank(s) differ; {bits_text('stages', *self.stage_range)}, "
                f"{bits_text('targets', *self.target_range)}{extra}")


@dataclass
class RankCall:
    """What one rank sent in the header (exact mode only)."""
    rank: int
    seq: int
    site: int
    policy: str
    num_slots: int
    world: int
    poisoned: bool
    reason: int


@dataclass
class DivergenceReport:
    call: int                       # this rank's call number (seq)
    world: int
    num_slots: int
    exact: bool
    header_ok: bool
    mismatches: list[str]           # of "seq", "site", "policy", "slots", "world"
    poisoned_ranks: list[int]
    poison_reasons: dict[int, str]
    poisoned_count: int
    corrupt: bool
    rank_calls: list[RankCall]
    field_summaries: dict[str, dict]
    diverged_slots: list[SlotDivergence]
    decided_count: int
    diverged_count: int
    slots: list[SlotVotes] = field(default_factory=list)  # every slot, in order
    # reason text -> poisoned ranks with that reason, at every world size (the
    # ranks themselves are named in poison_reasons up to 64 ranks, or when alone)
    reason_counts: dict[str, int] = field(default_factory=dict)
    vocabulary: Vocabulary = field(default_factory=lambda: DEFAULT_VOCABULARY, repr=False, compare=False)
    # the call carried per-slot policies and digests; without, each slot's policy
    # is its rank's call policy and no digest was compared
    slot_state: bool = False

    @property
    def ok(self) -> bool:
        """True when every rank was at the same call and every slot agreed."""
        return self.header_ok and not self.corrupt and self.diverged_count == 0

    def to_dict(self) -> dict:
        """Every field as plain data (JSON-able); the vocabulary once, at the top."""
        out = asdict(self)
        for sd in out["diverged_slots"]:
            del sd["vocabulary"]
        out["vocabulary"] = self.vocabulary.to_dict()
        return out

    def poison_groups(self) -> list[tuple[str, list[int]]]:
        """The named poisoned ranks grouped by reason: [(reason text, ranks)], by first rank."""
        groups: dict[str, list[int]] = {}
        for r in self.poisoned_ranks:
            groups.setdefault(self.poison_reasons.get(r, "unknown reason"), []).append(r)
        return list(groups.items())

    def reason_counts_text(self, limit: int | None = MAX_TEXT_GROUPS) -> str:
        """'2 with a stage id outside 0..63, 1 with reason code 20': the poisoned ranks
        counted per reason, most ranks first; the first ``limit`` reasons are given and
        the rest counted ("… and 3 more reason(s) on 4 rank(s)"); None gives all."""
        items = sorted(self.reason_counts.items(), key=lambda kv: -kv[1])
        shown = items if limit is None else items[:limit]
        return ", ".join([f"{n} with {reason}" for reason, n in shown]
                         + _more(len(shown), len(items), "reason(s)", sum(n for _r, n in items[len(shown):])))

    def mismatch_lines(self, limit: int | None = MAX_TEXT_GROUPS) -> list[str]:
        """One line per header field the ranks disagree on ("call mismatch: ranks 0-1
        at call 5; rank 2 at call 4"); empty when every rank was at the same call.
        A line names the first ``limit`` values and counts the rest; None names all."""
        lines = []
        attr = {"seq": "call", "site": "site/slot-layout fingerprint", "policy": "policy",
                "slots": "slot count", "world": "world size"}
        for name in self.mismatches:
            if self.rank_calls:
                groups: dict = {}
                for rc in self.rank_calls:
                    value = {"seq": rc.seq, "site": f"{rc.site:#010x}", "policy": rc.policy,
                             "slots": rc.num_slots, "world": rc.world}[name]
                    groups.setdefault(value, []).append(rc.rank)
                items = list(groups.items())
                shown = items if limit is None else items[:limit]
                detail = "; ".join([f"{ranks_text(r)} at {attr[name]} {v}" for v, r in shown]
                                   + _more(len(shown), len(items), "value(s)",
                                           sum(len(r) for _v, r in items[len(shown):])))
            else:
                s = self.field_summaries[name]
                hex_width = 8 if name == "site" else 0
                root = f"{s['root']:#010x}" if hex_width else s["root"]
                detail = (f"rank 0 has {root}, at least {s['differ_lb']} rank(s) differ "
                          f"({bits_text('values', s['and'], s['or'], hex_width)})")
            lines.append(f"{attr[name]} mismatch: {detail}")
        return lines

    def __str__(self) -> str:
        """What the ranks disagree on, bounded: the first MAX_TEXT_SLOTS diverged
        slots and MAX_TEXT_GROUPS groups of ranks in each list, with counts of
        the rest, and at most MAX_TEXT_CHARS characters in all."""
        return bounded_text(self._text())

    def _text(self) -> str:
        if self.ok:
            return (f"esper_gate call {self.call}: all {self.world} ranks agree on {self.num_slots} "
                    f"slot(s); {self.decided_count} passed")
        lines = [f"esper_gate call {self.call} on {self.world} ranks: not in agreement"]
        lines += ["  " + ln for ln in self.mismatch_lines()]
        if self.poisoned_count:
            if self.poisoned_ranks:
                groups = self.poison_groups()
                lines += [f"  bad input from {ranks_text(ranks)}: {reason}"
                          for reason, ranks in groups[:MAX_TEXT_GROUPS]]
                lines += ["  " + ln for ln in _more(min(len(groups), MAX_TEXT_GROUPS), len(groups), "reason(s)",
                                                    sum(len(r) for _w, r in groups[MAX_TEXT_GROUPS:]))]
            elif self.reason_counts:
                lines.append(f"  bad input from {self.poisoned_count} rank(s): {self.reason_counts_text()}")
            else:
                lines.append(f"  bad input from {self.poisoned_count} rank(s) ({NO_REASON_TEXT})")
        if self.corrupt:
            lines.append("  the reduced buffer is inconsistent (a rank sent a corrupt or foreign buffer)")
        lines += ["  " + sd.describe() for sd in self.diverged_slots[:MAX_TEXT_SLOTS]]
        if len(self.diverged_slots) > MAX_TEXT_SLOTS:
            lines.append(f"  … and {len(self.diverged_slots) - MAX_TEXT_SLOTS} more diverged slot(s) "
                         f"(the report's diverged_slots has them all)")
        if self.header_ok and not self.corrupt:
            lines.append(f"  {self.diverged_count} slot(s) diverged and were not transitioned; "
                         f"{self.decided_count} passed")
        else:
            lines.append("  no slot was transitioned")
        return "\n".join(lines)


def _policy_name(code: int) -> str:
    return wire.POLICIES[code] if 0 <= code < len(wire.POLICIES) else str(code)


def parse_report(report: Sequence[int], slot_names: Sequence[str] | None = None,
                 call: int | None = None, vocabulary: Vocabulary | None = None) -> DivergenceReport:
    """Build a DivergenceReport from the report tensor's values (a list of ints).

    Poisoned ranks: up to 64 ranks every one is named with its reason
    (``poison_reasons``); above 64 only a lone one is. ``reason_counts`` counts
    them per reason at every world size.
    ``vocabulary`` names the stage and target ids in the report's text.
    """
    vocabulary = vocabulary if vocabulary is not None else DEFAULT_VOCABULARY
    r = [int(x) for x in report]
    g = r[:wire.GLOBAL_WORDS]
    world, num_slots = g[wire.G_WORLD], g[wire.G_SLOTS]
    flags = g[wire.G_FLAGS]
    exact = bool(flags & wire.FLAG_EXACT)
    names = list(slot_names) if slot_names is not None else [str(i) for i in range(num_slots)]
    mismatches = [name for name, flag in (("seq", wire.FLAG_SEQ_MISMATCH), ("site", wire.FLAG_SITE_MISMATCH),
                                          ("policy", wire.FLAG_POLICY_MISMATCH),
                                          ("slots", wire.FLAG_SLOTS_MISMATCH),
                                          ("world", wire.FLAG_WORLD_MISMATCH)) if flags & flag]
    summaries = {}
    for f, (name, _o, _w) in enumerate(wire.HEADER_FIELDS):
        base = wire.G_FIELD_BASE + wire.G_FIELD_STRIDE * f
        root, a, o, lb, eq = g[base:base + 5]
        summaries[name] = {"root": root, "and": a, "or": o, "differ_lb": lb, "equal": bool(eq)}

    rank_calls: list[RankCall] = []
    poisoned_ranks: list[int] = []
    reasons: dict[int, str] = {}
    if exact:
        off = wire.ranks_offset(num_slots)
        for k in range(world):
            seq, site, pol, slots, wld, poison, reason, _ = r[off + k * wire.RANK_WORDS: off + (k + 1) * wire.RANK_WORDS]
            pname = wire.POLICIES[pol] if 0 <= pol < len(wire.POLICIES) else str(pol)
            rank_calls.append(RankCall(k, seq, site, pname, slots, wld, bool(poison), reason))
            if poison:
                poisoned_ranks.append(k)
                reasons[k] = reason_text(reason)
    elif g[wire.G_POISONED_RANK] >= 0:
        # Only a poisoned rank sends a nonzero reason, so with one poisoned rank
        # the OR of the reason field is its code, exactly.
        lone, reason = g[wire.G_POISONED_RANK], summaries["reason"]["or"]
        poisoned_ranks = [lone]
        reasons[lone] = reason_text(reason) if reason else NO_REASON_TEXT
    rc_off = wire.reason_counts_offset(num_slots, world)
    reason_counts = {reason_text(code): r[rc_off + code - 1] for code in range(1, wire.REPORT_REASON_WORDS + 1)
                     if r[rc_off + code - 1] > 0}

    slots: list[SlotVotes] = []
    diverged = []
    sr_off = wire.slot_ranks_offset(num_slots, world)
    for s in range(num_slots):
        w = r[wire.GLOBAL_WORDS + s * wire.SLOT_WORDS: wire.GLOBAL_WORDS + (s + 1) * wire.SLOT_WORDS]
        status = w[wire.S_STATUS]
        name = names[s] if s < len(names) else str(s)
        entries = r[sr_off + s * world: sr_off + (s + 1) * world] if exact else []
        sv = SlotVotes(slot=s, name=name, status=status, yes=w[wire.S_VOTES],
                       votes=[bool(wire.slot_entry_vote(e)) for e in entries],
                       stages=[wire.slot_entry_stage(e) for e in entries],
                       targets=[wire.slot_entry_target(e) for e in entries],
                       policies=[_policy_name(wire.slot_entry_policy(e)) for e in entries],
                       digests=[wire.slot_entry_digest(e) for e in entries],
                       target=w[wire.S_ROOT_TARGET], policy=_policy_name(w[wire.S_ROOT_POLICY]),
                       digest=w[wire.S_ROOT_DIGEST])
        slots.append(sv)
        if not status & (wire.STATUS_STAGE_DIFFERS | wire.STATUS_TARGET_DIFFERS | wire.STATUS_POLICY_DIFFERS
                         | wire.STATUS_DIGEST_DIFFERS):
            continue
        groups: dict = {}
        for k, key in enumerate(zip(sv.stages, sv.targets, sv.policies, sv.digests)):
            h = groups.setdefault(key, Holding(key[0], key[1], [], policy=key[2], digest=key[3]))
            h.ranks.append(k)
            if sv.votes[k]:
                h.votes_passed.append(k)
        holdings = sorted(groups.values(), key=lambda h: (-len(h.ranks), h.ranks[0]))
        diverged.append(SlotDivergence(
            slot=s, name=name, exact=exact,
            stage_differs=bool(status & wire.STATUS_STAGE_DIFFERS),
            target_differs=bool(status & wire.STATUS_TARGET_DIFFERS), holdings=holdings,
            rank0_stage=w[wire.S_ROOT_STAGE], rank0_target=w[wire.S_ROOT_TARGET],
            ranks_differing=w[wire.S_KEY_DIFFER], stage_range=(w[wire.S_STAGE_AND], w[wire.S_STAGE_OR]),
            target_range=(w[wire.S_TARGET_AND], w[wire.S_TARGET_OR]), vocabulary=vocabulary,
            policy_differs=bool(status & wire.STATUS_POLICY_DIFFERS),
            digest_differs=bool(status & wire.STATUS_DIGEST_DIFFERS),
            rank0_policy=_policy_name(w[wire.S_ROOT_POLICY]), rank0_digest=w[wire.S_ROOT_DIGEST],
            policy_range=(w[wire.S_POLICY_AND], w[wire.S_POLICY_OR]),
            digest_range=(w[wire.S_DIGEST_AND], w[wire.S_DIGEST_OR])))

    return DivergenceReport(
        call=call if call is not None else summaries["seq"]["root"], world=world, num_slots=num_slots,
        exact=exact, header_ok=bool(flags & wire.FLAG_HEADER_OK), mismatches=mismatches,
        poisoned_ranks=poisoned_ranks, poison_reasons=reasons, poisoned_count=g[wire.G_POISON_COUNT],
        corrupt=bool(flags & wire.FLAG_CORRUPT), rank_calls=rank_calls, field_summaries=summaries,
        diverged_slots=diverged, decided_count=g[wire.G_DECIDED], diverged_count=g[wire.G_DIVERGED],
        slots=slots, reason_counts=reason_counts, vocabulary=vocabulary,
        slot_state=bool(flags & wire.FLAG_SLOT_STATE))
