"""wire.py's constants agree with the C++ ones, and the sizes the extension
serves (wire.layout, buffer_words, report_words, report offsets) agree with
the independent oracle in tests/reference.py and with what the ops return."""
import json
import pathlib

import pytest
import torch

import esper_gate
from esper_gate import wire
import reference
from reference import RankInput, expected
from simulate import decode_view, reduce_all

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"

# Constants of wire.py that the C++ side has no counterpart for: the caller's
# own reason codes (checked below to lie in the caller's range) and tables
# derived from checked constants (checked below against their source).
PYTHON_ONLY = {"REASON_DTYPE", "REASON_SHAPE", "REASON_DEVICE", "REASON_INPUT", "REASON_TEXT",
               "POLICY_CODES", "HEADER_FIELD_WIDTH", "MAX_DIGEST"}


def _cpp_constants() -> dict:
    return json.loads(torch.ops.esper_gate.wire_constants())


def test_every_constant_matches_cpp():
    cpp = _cpp_constants()
    for name, value in cpp.items():
        assert hasattr(wire, name), f"C++ exports {name} = {value!r}; esper_gate/wire.py has no {name}"
        mine = getattr(wire, name)
        if name == "HEADER_FIELDS":
            mine = [list(f) for f in mine]
        elif name == "POLICIES":
            mine = list(mine)
        assert mine == value, f"wire.{name} is {mine!r}, the C++ side has {value!r}"
    ours = {name for name in vars(wire) if name.isupper()}
    unchecked = ours - set(cpp) - PYTHON_ONLY
    assert not unchecked, f"constants in wire.py that no test compares with C++: {sorted(unchecked)}"
    assert PYTHON_ONLY <= ours, f"listed as Python-only but gone from wire.py: {sorted(PYTHON_ONLY - ours)}"


def test_python_only_constants_follow_the_checked_ones():
    cpp = _cpp_constants()
    for name in ("REASON_DTYPE", "REASON_SHAPE", "REASON_DEVICE", "REASON_INPUT"):
        code = getattr(wire, name)
        assert cpp["REASON_CALLER_MIN"] <= code <= cpp["REASON_MAX"], f"wire.{name} = {code} is no caller code"
    assert wire.HEADER_FIELD_WIDTH == {n: w for n, _o, w in cpp["HEADER_FIELDS"]}
    assert wire.POLICY_CODES == {n: code for code, n in enumerate(cpp["POLICIES"])}
    codes = [v for k, v in cpp.items() if k.startswith("REASON_") and k not in ("REASON_CALLER_MIN", "REASON_MAX")]
    assert set(wire.REASON_TEXT) >= set(codes), "every reason code needs a text"
    # The fields tile the header, and each mask is its width in ones.
    end = 0
    for name, offset, width in cpp["HEADER_FIELDS"]:
        assert offset == end, f"field {name} starts at {offset}, expected {end}"
        assert wire.header_field_mask(name) == (1 << width) - 1
        end += width
    assert end == cpp["HEADER_BITS"]
    # Every limit fits the field that carries it.
    widths = wire.HEADER_FIELD_WIDTH
    assert cpp["MAX_WORLD"] <= wire.header_field_mask("world") < 2 * cpp["MAX_WORLD"]
    assert cpp["MAX_SLOTS"] <= wire.header_field_mask("slots") < 2 * cpp["MAX_SLOTS"]
    assert 2 ** widths["reason"] == cpp["REASON_MAX"] + 1
    # The slot entry helpers pack and unpack with the exported shifts.
    e = wire.slot_entry(1, 45, 17)
    assert e == 1 << cpp["SLOT_ENTRY_VOTE_SHIFT"] | 45 << cpp["SLOT_ENTRY_STAGE_SHIFT"] | 17
    assert (wire.slot_entry_vote(e), wire.slot_entry_stage(e), wire.slot_entry_target(e)) == (1, 45, 17)
    e = wire.slot_entry(0, 3, wire.NO_GATE, 2, 0xFFFFFFFF)
    assert e == 0xFFFFFFFF << cpp["SLOT_ENTRY_DIGEST_SHIFT"] | 2 << cpp["SLOT_ENTRY_POLICY_SHIFT"] \
        | 3 << cpp["SLOT_ENTRY_STAGE_SHIFT"] | cpp["NO_GATE"]
    assert (wire.slot_entry_vote(e), wire.slot_entry_stage(e), wire.slot_entry_target(e),
            wire.slot_entry_policy(e), wire.slot_entry_digest(e)) == (0, 3, wire.NO_GATE, 2, 0xFFFFFFFF)
    assert 0 <= e < 2**63  # a non-negative int64
    # A slot's fields tile its record bits, the digest last.
    assert cpp["SLOT_POLICY_BIT"] == cpp["SLOT_TARGET_BIT"] + cpp["ID_BITS"]
    assert cpp["SLOT_DIGEST_BIT"] == cpp["SLOT_POLICY_BIT"] + widths["policy"]
    assert cpp["SLOT_BITS"] == cpp["SLOT_DIGEST_BIT"] + cpp["DIGEST_BITS"]
    assert wire.MAX_DIGEST == 2 ** cpp["DIGEST_BITS"] - 1
    assert cpp["NO_GATE"] == cpp["MAX_ID"]


# S and W of the buffer-size tables in docs/wire-format.md, one without and
# one with the slot state.
TABLE_SLOTS = (1, 16, 64, 256, 1024)
TABLE_WORLDS = (2, 64, 65, 1024, 16384, 65536)
TABLE_HEADS = {False: "S \\ W, no slot state", True: "S \\ W, slot state"}


def _docs_buffer_table(slot_state: bool) -> dict:
    text = DOCS.read_text()
    head = f"| {TABLE_HEADS[slot_state]} | " + " | ".join(str(w) for w in TABLE_WORLDS) + " |"
    start = text.index(head)
    rows = {}
    for line in text[start:].splitlines()[2:2 + len(TABLE_SLOTS)]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[int(cells[0])] = [int(c.replace("**", "")) for c in cells[1:]]
    return rows


@pytest.mark.parametrize("slot_state", [False, True])
def test_buffer_size_table_in_docs_is_what_pack_returns(slot_state):
    table = _docs_buffer_table(slot_state)
    assert sorted(table) == sorted(TABLE_SLOTS)
    for s in TABLE_SLOTS:
        ones = torch.ones(s, dtype=torch.bool)
        ids = torch.zeros(s, dtype=torch.int64)
        # digests alone make a call carry the slot state
        digests = ids if slot_state else None
        for w, documented in zip(TABLE_WORLDS, table[s]):
            real = esper_gate.pack(ones, ids, ids, 0, 0, "unanimous", w - 1, w, digests=digests).numel()
            expected_words = wire.buffer_words(s, w, slot_state=slot_state)
            assert real == expected_words == documented, f"S={s}, W={w}: pack {real}, " \
                f"wire.buffer_words {expected_words}, docs {documented}"


def _scale_inputs(world: int, case: str) -> list:
    """Three slots: a majority tie (exactly half vote yes), one rank at another
    stage (a divergence), and a unanimous yes; or the same with one poisoned rank."""
    half = set(range(1, world, 2))  # odd ranks: world // 2 of them
    inputs = [RankInput([1 if r in half else 0, 1, 1], [3, 4, 5], [2, 2, 6], seq=7, site=99, policy="majority")
              for r in range(world)]
    if case == "diverged":
        inputs[world - 1].stages[1] = 9
    else:
        inputs[world // 3].stages[2] = 64  # out of range: REASON_STAGE
    return inputs


@pytest.mark.parametrize("case", ["diverged", "poisoned"])
@pytest.mark.parametrize("world", [1025, 4096, pytest.param(wire.MAX_WORLD, marks=pytest.mark.slow)])
def test_scale_simulation_matches_reference(world, case):
    """Past the lanes (W > 64) up to the limit: every simulated rank packs with
    the real op, the buffers are summed as the all_reduce would, and decode
    must report what the reference says from the inputs' meaning."""
    inputs = _scale_inputs(world, case)
    reduced = reduce_all(inputs)
    assert reduced.numel() == wire.buffer_words(3, world)
    for view in (0, world - 1):
        decision, report = decode_view(reduced, inputs, view)
        assert (decision, report) == expected(inputs, view=view), f"W={world}, {case}, view of rank {view}"
    flags = report[wire.G_FLAGS]
    assert not flags & wire.FLAG_EXACT and report[wire.G_WORLD] == world
    if case == "diverged":
        # a tie fails majority on even W; on odd W the half is a minority
        assert decision == [False, False, True]
        assert report[wire.G_DIVERGED] == 1 and flags & wire.FLAG_HEADER_OK
    else:
        assert decision == [False, False, False]
        assert flags & wire.FLAG_POISONED and report[wire.G_POISONED_RANK] == world // 3


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64, 65, 1024, 1025, 65536])
@pytest.mark.parametrize("slots", [1, 2, 3, 16, 100, 1024])
def test_buffer_and_report_sizes_match_cpp(slots, world):
    ones = torch.ones(slots, dtype=torch.bool)
    ids = torch.zeros(slots, dtype=torch.int64)
    sizes = {}
    # policies, digests or both make a call carry the slot state
    for extra in ({}, {"policies": ids}, {"digests": ids}, {"policies": ids, "digests": ids}):
        slot_state = bool(extra)
        buf = esper_gate.pack(ones, ids, ids, 0, 0, "unanimous", world - 1, world, **extra)
        words = reference.buffer_words(slots, world, slot_state)
        assert buf.dtype == torch.int64 and buf.shape == (words,)
        L = wire.layout(slots, world, slot_state)
        assert wire.buffer_words(slots, world, slot_state) == L.total_words == words
        assert L.slot_state == slot_state and L.slot_bits == (wire.SLOT_BITS if slot_state else wire.SLOT_CORE_BITS)
        decision, report = esper_gate.decode(buf * world, slots, world, "unanimous")
        assert decision.shape == (slots,) and decision.dtype == torch.bool
        assert report.shape == (reference.report_words(slots, world),)
        # decode picks the layout by the buffer's size, and says which it read
        assert bool(report[wire.G_FLAGS] & wire.FLAG_SLOT_STATE) == slot_state
        sizes[slot_state] = words
    assert sizes[False] < sizes[True]
    assert wire.report_words(slots, world) == reference.report_words(slots, world)
    assert wire.capacity_for(slots) == wire.layout(slots, world).capacity == reference.capacity_for(slots)


@pytest.mark.parametrize("world", [1, 3, wire.MAX_EXACT_WORLD])
def test_report_offsets_are_where_the_reference_puts_each_rank(world):
    """RANKS and SLOT_RANKS start where the oracle's report has each rank's
    header and slot entries (distinct per rank, so an offset off by one word
    or one rank shows)."""
    slots = 3
    inputs = [RankInput([r % 2, 1, 0], [r % 64, 5, 6], [7, (r + 1) % 64, 8], seq=9, site=11)
              for r in range(world)]
    _, rep = expected(inputs)
    assert len(rep) == wire.report_words(slots, world)
    ranks, slot_ranks = wire.ranks_offset(slots), wire.slot_ranks_offset(slots, world)
    assert slot_ranks == ranks + wire.RANK_WORDS * world
    assert wire.reason_counts_offset(slots, world) == len(rep) - wire.REPORT_REASON_WORDS
    names = [name for name, _offset, _width in wire.HEADER_FIELDS]
    seq_at, world_at = names.index("seq"), names.index("world")
    for r, inp in enumerate(inputs):
        row = rep[ranks + wire.RANK_WORDS * r:][:wire.RANK_WORDS]
        assert row[seq_at] == 9 and row[world_at] == world
        for s in range(slots):
            assert rep[slot_ranks + s * world + r] == wire.slot_entry(inp.votes[s], inp.stages[s], inp.targets[s])


def test_buffer_size_depends_only_on_capacity_world_and_slot_state():
    # 9..16 slots share a capacity, so ranks that disagree on the slot count
    # still exchange equal-sized buffers and are told so by the header.
    for slot_state in (False, True):
        sizes = {wire.buffer_words(s, 4, slot_state) for s in range(9, 17)}
        assert len(sizes) == 1
        assert wire.buffer_words(8, 4, slot_state) < wire.buffer_words(9, 4, slot_state)


def test_the_slot_state_always_changes_the_size():
    """decode tells the two layouts apart by the buffer's size, so they differ at every
    capacity and at every counter width, with lanes and without (csrc/wire/layout.h
    checks the counter words at compile time; this checks the totals)."""
    worlds = sorted({w for w in range(1, 66)} | {2**k + d for k in range(7, 17) for d in (-1, 0)})
    for capacity in (2**k for k in range(11)):
        for world in worlds:
            assert wire.buffer_words(capacity, world, False) < wire.buffer_words(capacity, world, True), \
                (capacity, world)


def test_lanes_only_up_to_64_ranks():
    assert wire.layout(16, 64).lanes_words > 0 and wire.layout(16, 64).exact
    assert wire.layout(16, 65).lanes_words == 0 and not wire.layout(16, 65).exact


def test_layout_sections_follow_one_another():
    for slots, world, slot_state in [(1, 1, False), (1, 1, True), (16, 64, False), (16, 64, True),
                                     (100, 65, True), (1024, wire.MAX_WORLD, False)]:
        L = wire.layout(slots, world, slot_state)
        assert L.counts_offset == wire.FIXED_WORDS
        assert L.root_offset == L.counts_offset + L.counts_words
        assert L.lanes_offset == L.root_offset + L.root_words
        assert L.reasons_offset == L.lanes_offset + L.lanes_words
        assert L.reasons_words == -(-wire.REASON_MAX // L.counters_per_word)
        assert L.total_words == L.reasons_offset + L.reasons_words
        assert L.record_bits == wire.HEADER_BITS + L.slot_bits * L.capacity


def test_sizes_refuse_what_the_kernels_refuse():
    with pytest.raises(ValueError, match="esper_gate.wire_sizes: world_size must be in 1..65536, got 0"):
        wire.buffer_words(4, 0)
    with pytest.raises(ValueError, match="esper_gate.wire_sizes: expected 1..1024 slots, got 1025"):
        wire.report_words(1025, 2)


def test_reason_max_matches_cpp():
    # The fake kernels refuse a poison above wire.REASON_MAX; so must the kernel.
    ones = torch.ones(2, dtype=torch.bool)
    ids = torch.zeros(2, dtype=torch.int64)
    esper_gate.pack(ones, ids, ids, 0, 0, "any", 0, 1, wire.REASON_MAX)
    with pytest.raises(ValueError, match=f"poison must be a reason code in 0..{wire.REASON_MAX}, "
                                         f"got {wire.REASON_MAX + 1}"):
        esper_gate.pack(ones, ids, ids, 0, 0, "any", 0, 1, wire.REASON_MAX + 1)
    assert wire.REASON_MAX == 2 ** dict((n, w) for n, _o, w in wire.HEADER_FIELDS)["reason"] - 1
