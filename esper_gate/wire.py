"""The wire format as Python sees it: the constants of ``csrc/wire/``
(limits.h, layout.h, pack.h, report.h) and the sizes the extension computes.

The report parser and the wrappers need the word indices, flags and limits,
so they are written here as constants. Sizes and offsets that depend on the
call (``layout``, ``buffer_words``, ``report_words``, ``ranks_offset``,
``slot_ranks_offset``, ``reason_counts_offset``) are not computed here: the op
``torch.ops.esper_gate.wire_sizes`` returns what ``wire::make_layout`` and
``csrc/wire/report.h`` compute for the kernels.

What ``tests/test_wire.py`` checks against the C++ side: every constant the
op ``torch.ops.esper_gate.wire_constants()`` exports is compared by name with
the one here (limits, policies, kernel reason codes, header fields with
offset and width, record and slot bits, fixed words, report layout words and
indices, flags, status bits, slot-entry shifts and mask), and every upper-case
constant here is either among them or listed there as Python-only (the
caller's reason codes, which must lie in REASON_CALLER_MIN..REASON_MAX, and
tables derived from the checked ones). The sizes served here are checked
against the independent arithmetic of ``tests/reference.py`` and the sizes
the real pack and decode ops return, up to MAX_WORLD ranks.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

MAX_SLOTS = 1024
MAX_WORLD = 65536  # the world header field is sized from it (17 bits)
MAX_EXACT_WORLD = 64
ID_BITS = 6
MAX_ID = (1 << ID_BITS) - 1
BITS_PER_WORD = 63
# The target a slot sends when it has no gate this call: it still takes part,
# every rank learns its decision (never passed) and whether the ranks diverge
# on it, and a rank at a gate where another has none diverges. Gate ids are
# 0..NO_GATE-1 (Esper's G0 is 0, a real gate).
NO_GATE = MAX_ID
# Each slot carries a state digest this wide (esper_gate.state_digest makes
# one), checked for equality across ranks like the stage.
DIGEST_BITS = 32
MAX_DIGEST = (1 << DIGEST_BITS) - 1

POLICIES = ("unanimous", "rank0", "majority", "any")
POLICY_CODES = {name: code for code, name in enumerate(POLICIES)}

# Bad-input reason codes (5 bits). 1..15 come from the kernel; 16..31 are
# declared by the caller through the `poison` argument.
REASON_NONE = 0
REASON_VOTE = 1
REASON_STAGE = 2
REASON_TARGET = 3
REASON_SITE = 4
REASON_POLICY = 5
REASON_DIGEST = 6
REASON_CALLER_MIN = 16  # codes from here up are declared by the caller, not found by the kernel
REASON_DTYPE = 16
REASON_SHAPE = 17
REASON_DEVICE = 18
REASON_INPUT = 19  # found by the caller in its own objects before it had ids to send (a field missing, a name)
REASON_MAX = 31  # the largest code the 5-bit field holds; pack refuses a larger poison
REASON_TEXT = {
    REASON_NONE: "no error",
    REASON_VOTE: "a vote that is neither 0 nor 1",
    REASON_STAGE: "a stage id outside 0..63",
    REASON_TARGET: "a target id outside 0..63",
    REASON_SITE: "a site fingerprint outside 0..2**32-1",
    REASON_POLICY: "a slot policy that is not one of " + ", ".join(POLICIES),
    REASON_DIGEST: "a state digest outside 0..2**32-1",
    REASON_DTYPE: "a tensor of the wrong dtype",
    REASON_SHAPE: "tensors of the wrong shape or length",
    REASON_DEVICE: "a tensor on the wrong device",
    REASON_INPUT: "input its caller refused before the op; that rank's GateInputError says what",
}

# Record header fields: (name, bit offset, bit width).
HEADER_FIELDS = (
    ("seq", 0, 32),
    ("site", 32, 32),
    ("policy", 64, 2),
    ("slots", 66, 11),
    ("world", 77, 17),
    ("poison", 94, 1),
    ("reason", 95, 5),
)
HEADER_FIELD_WIDTH = {name: width for name, _offset, width in HEADER_FIELDS}
HEADER_BITS = 100
# Per slot: the vote, then the stage id, then the target id (the slot's core),
# then, in a call that carries the slot state, the slot's policy and digest.
SLOT_VOTE_BIT = 0
SLOT_STAGE_BIT = 1
SLOT_TARGET_BIT = SLOT_STAGE_BIT + ID_BITS
SLOT_POLICY_BIT = SLOT_TARGET_BIT + ID_BITS
SLOT_CORE_BITS = SLOT_POLICY_BIT
SLOT_DIGEST_BIT = SLOT_POLICY_BIT + HEADER_FIELD_WIDTH["policy"]
SLOT_BITS = SLOT_DIGEST_BIT + DIGEST_BITS  # with the slot state
# Fixed words at the start of the buffer.
WORD_PRESENCE, WORD_RANK_SUM, WORD_POISON_RANK = 0, 1, 2
FIXED_WORDS = 3

# Report layout.
GLOBAL_WORDS = 48
SLOT_WORDS = 20
RANK_WORDS = 8
# REASON_COUNTS, the report's last section: word code - 1 holds how many ranks
# were poisoned for reason code 1..REASON_MAX, at every world size.
REPORT_REASON_WORDS = REASON_MAX
G_FLAGS, G_PRESENCE, G_POISON_COUNT, G_POISONED_RANK = 0, 1, 2, 3
G_WORLD, G_SLOTS, G_CAPACITY, G_DIVERGED, G_DECIDED, G_POLICY = 4, 5, 6, 7, 8, 9
G_FIELD_BASE, G_FIELD_STRIDE = 10, 5
# The words kept per header field at G_FIELD_BASE + G_FIELD_STRIDE * field.
G_FIELD_ROOT, G_FIELD_AND, G_FIELD_OR, G_FIELD_DIFFER_LB, G_FIELD_EQUAL = 0, 1, 2, 3, 4

FLAG_SEQ_MISMATCH = 1 << 0
FLAG_SITE_MISMATCH = 1 << 1
FLAG_POLICY_MISMATCH = 1 << 2
FLAG_SLOTS_MISMATCH = 1 << 3
FLAG_WORLD_MISMATCH = 1 << 4
FLAG_POISONED = 1 << 5
FLAG_CORRUPT = 1 << 6
FLAG_EXACT = 1 << 7
FLAG_HEADER_OK = 1 << 8
FLAG_SLOT_STATE = 1 << 9  # the call carried per-slot policies and digests

S_STATUS, S_VOTES, S_ROOT_VOTE, S_ROOT_STAGE, S_ROOT_TARGET = 0, 1, 2, 3, 4
S_STAGE_AND, S_STAGE_OR, S_TARGET_AND, S_TARGET_OR = 5, 6, 7, 8
S_STAGE_DIFFER, S_TARGET_DIFFER, S_KEY_DIFFER = 9, 10, 11  # key: stage, target, policy and digest
S_ROOT_POLICY, S_POLICY_AND, S_POLICY_OR, S_POLICY_DIFFER = 12, 13, 14, 15
S_ROOT_DIGEST, S_DIGEST_AND, S_DIGEST_OR, S_DIGEST_DIFFER = 16, 17, 18, 19

STATUS_DECIDED = 1 << 0
STATUS_DIVERGED = 1 << 1
STATUS_STAGE_DIFFERS = 1 << 2
STATUS_TARGET_DIFFERS = 1 << 3
STATUS_POLICY_PASSED = 1 << 4
STATUS_CORRUPT = 1 << 5
STATUS_POLICY_DIFFERS = 1 << 6
STATUS_DIGEST_DIFFERS = 1 << 7
STATUS_NO_GATE = 1 << 8  # every rank sent NO_GATE: nothing to decide

# Per-rank slot entry of the exact report (world <= MAX_EXACT_WORLD): one word
# per (slot, rank), digest << SLOT_ENTRY_DIGEST_SHIFT | policy << SLOT_ENTRY_POLICY_SHIFT
# | vote << SLOT_ENTRY_VOTE_SHIFT | stage << SLOT_ENTRY_STAGE_SHIFT | target.
SLOT_ENTRY_ID_MASK = MAX_ID
SLOT_ENTRY_STAGE_SHIFT = ID_BITS
SLOT_ENTRY_VOTE_SHIFT = 2 * ID_BITS
SLOT_ENTRY_POLICY_SHIFT = SLOT_ENTRY_VOTE_SHIFT + 1
SLOT_ENTRY_DIGEST_SHIFT = SLOT_ENTRY_POLICY_SHIFT + HEADER_FIELD_WIDTH["policy"]


def header_field_mask(name: str) -> int:
    """The mask a header field's value is cut to on the wire: its width in ones."""
    return (1 << HEADER_FIELD_WIDTH[name]) - 1


def slot_entry(vote: int, stage: int, target: int, policy: int = 0, digest: int = 0) -> int:
    """One per-rank slot entry of the exact report, as the decode kernel writes it."""
    return ((vote & 1) << SLOT_ENTRY_VOTE_SHIFT) | ((stage & SLOT_ENTRY_ID_MASK) << SLOT_ENTRY_STAGE_SHIFT) \
        | (target & SLOT_ENTRY_ID_MASK) | ((policy & header_field_mask("policy")) << SLOT_ENTRY_POLICY_SHIFT) \
        | ((digest & MAX_DIGEST) << SLOT_ENTRY_DIGEST_SHIFT)


def slot_entry_vote(entry: int) -> int:
    return (entry >> SLOT_ENTRY_VOTE_SHIFT) & 1


def slot_entry_stage(entry: int) -> int:
    return (entry >> SLOT_ENTRY_STAGE_SHIFT) & SLOT_ENTRY_ID_MASK


def slot_entry_target(entry: int) -> int:
    return entry & SLOT_ENTRY_ID_MASK


def slot_entry_policy(entry: int) -> int:
    return (entry >> SLOT_ENTRY_POLICY_SHIFT) & header_field_mask("policy")


def slot_entry_digest(entry: int) -> int:
    return (entry >> SLOT_ENTRY_DIGEST_SHIFT) & MAX_DIGEST


# ---- sizes and offsets, from the extension -----------------------------------
#
# The buffer layout and the report's size and offsets are computed by the C++
# that the kernels use (wire::make_layout, wire::report_words and the report
# offsets), through the op esper_gate::wire_sizes; nothing here recomputes
# them. The values depend only on (num_slots, world, slot_state) and are read
# on host paths (report parsing, buffer allocation), hence the cache.
#
# slot_state: whether the call carries per-slot policies and digests, as pack
# and sync do exactly when they are given either (a GateSync built with
# slot_state=True, the default, always gives both). The report's size does
# not depend on it.

@dataclass(frozen=True)
class Layout:
    """The packed buffer of one call, as ``wire::Layout`` (csrc/wire/layout.h)."""

    capacity: int
    world: int
    slot_state: bool
    slot_bits: int
    record_bits: int
    counter_width: int
    counters_per_word: int
    counts_offset: int
    counts_words: int
    root_offset: int
    root_words: int
    lanes_offset: int
    lanes_words: int
    reasons_offset: int
    reasons_words: int
    total_words: int
    exact: bool


@functools.lru_cache(maxsize=4096)
def _sizes(num_slots: int, world: int, slot_state: bool = False) -> dict:
    import torch

    return json.loads(torch.ops.esper_gate.wire_sizes(num_slots, world, slot_state))


def layout(num_slots: int, world: int, slot_state: bool = False) -> Layout:
    """The packed-buffer layout for ``num_slots`` slots and ``world`` ranks, without or with the slot state."""
    fields = {f.name: _sizes(num_slots, world, bool(slot_state))[f.name] for f in dataclasses.fields(Layout)}
    fields["exact"] = bool(fields["exact"])
    fields["slot_state"] = bool(fields["slot_state"])
    return Layout(**fields)


def capacity_for(num_slots: int) -> int:
    """Slot capacity of the buffer: the next power of two >= num_slots."""
    return _sizes(num_slots, 1)["capacity"]


def buffer_words(num_slots: int, world: int, slot_state: bool = False) -> int:
    """Number of int64 elements the one all_reduce carries (a call with per-slot policies or
    digests carries the slot state: ``slot_state=True``)."""
    return _sizes(num_slots, world, bool(slot_state))["total_words"]


def report_words(num_slots: int, world: int) -> int:
    """Number of int64 elements of the report decode returns."""
    return _sizes(num_slots, world)["report_words"]


def ranks_offset(num_slots: int) -> int:
    """Where the RANKS section of the report starts (present only when exact)."""
    return _sizes(num_slots, 1)["ranks_offset"]


def slot_ranks_offset(num_slots: int, world: int) -> int:
    """Where the SLOT_RANKS section of the report starts (present only when exact)."""
    return _sizes(num_slots, world)["slot_ranks_offset"]


def reason_counts_offset(num_slots: int, world: int) -> int:
    """Where the REASON_COUNTS section of the report starts (present at every world size)."""
    return _sizes(num_slots, world)["reason_counts_offset"]
