"""The report's accessors, read from what the real kernels decode (simulated ranks)."""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from esper_gate import wire
from esper_gate.esper import VOCABULARY
from esper_gate.report import (MAX_TEXT_CHARS, MAX_TEXT_GROUPS, MAX_TEXT_SLOTS, NO_REASON_TEXT, DivergenceReport,
                               SlotDivergence, Vocabulary, bounded_text, parse_report, ranks_text)
from reference import RankInput
from simulate import decode_view, reduce_all, simulate


def test_slot_entry_helpers_read_what_the_decode_kernel_writes():
    inputs = [RankInput([1, 0], [5, 63], [7, 0]), RankInput([0, 1], [0, 2], [63, 3])]
    _decision, report, _ = simulate(inputs)
    base = wire.slot_ranks_offset(2, 2)
    for s in range(2):
        for r, inp in enumerate(inputs):
            entry = report[base + s * 2 + r]
            assert entry == wire.slot_entry(inp.votes[s], inp.stages[s], inp.targets[s])
            assert (wire.slot_entry_vote(entry), wire.slot_entry_stage(entry), wire.slot_entry_target(entry)) \
                == (inp.votes[s], inp.stages[s], inp.targets[s])


def test_every_slot_has_its_votes_and_holdings():
    # slot 0 agreed and vetoed by rank 1; slot 1 passed; slot 2 held differently by rank 2
    inputs = [RankInput([1, 1, 1], [3, 4, 3], [2, 3, 2]),
              RankInput([0, 1, 1], [3, 4, 3], [2, 3, 2]),
              RankInput([1, 1, 0], [3, 4, 8], [2, 3, 0])]
    decision, report, _ = simulate(inputs)
    rep = parse_report(report, ["r0c0", "r0c1", "r0c2"], vocabulary=VOCABULARY)
    assert decision == [False, True, False]
    assert [s.name for s in rep.slots] == ["r0c0", "r0c1", "r0c2"]
    vetoed, passed, diverged = rep.slots
    assert (vetoed.yes, vetoed.votes, vetoed.ranks_voting(False)) == (2, [True, False, True], [1])
    assert not vetoed.decided and not vetoed.diverged
    assert passed.decided and passed.yes == 3 and passed.stages == [4, 4, 4] and passed.targets == [3, 3, 3]
    assert diverged.diverged and not diverged.decided
    assert diverged.stages == [3, 3, 8] and diverged.targets == [2, 2, 0]
    [sd] = rep.diverged_slots
    assert sd.holdings_text() == "ranks 0-1 hold TRAINING -> G2; rank 2 holds PRUNED -> G0"
    assert sd.describe() == "slot r0c2 (#2): " + sd.holdings_text()


def test_a_slot_held_differently_is_not_decided_although_every_rank_voted_yes():
    # every vote passes the policy, so only the decided bit (not the policy bit) tells the truth
    _decision, report, _ = simulate([RankInput([1, 1], [3, 3], [2, 2]), RankInput([1, 1], [4, 3], [2, 2])])
    rep = parse_report(report)
    held_apart, agreed = rep.slots
    assert held_apart.status & wire.STATUS_POLICY_PASSED, "the votes alone would pass the slot"
    assert held_apart.diverged and not held_apart.decided
    assert agreed.decided and not agreed.diverged
    assert _decision == [False, True]


def test_above_64_ranks_a_lone_poisoned_rank_0_is_named():
    # above 64 ranks a single poisoned rank is told by its id alone, and 0 is an id like any other
    world = 70
    inputs = [RankInput([1], [3], [2]) for _ in range(world)]
    inputs[0] = RankInput([1], [64], [2])
    rep = parse_report(simulate(inputs, view=1)[1])
    assert not rep.exact and rep.poisoned_count == 1
    assert rep.poisoned_ranks == [0]
    assert "  bad input from rank 0: " in str(rep)


def test_above_64_ranks_the_and_and_or_of_a_slot_are_printed_as_bits_not_a_range():
    # stages 3 and 5: AND 1, OR 7; no rank holds 1 or 7, so "within 1..7" would mislead
    inputs = [RankInput([1], [3], [2]) for _ in range(69)] + [RankInput([1], [5], [2])]
    [sd] = parse_report(simulate(inputs)[1]).diverged_slots
    assert sd.stage_range == (1, 7)
    assert sd.holdings_text() == ("rank 0 holds stage 3 -> target 2; at least 1 rank(s) differ; "
                                  "stages share bits 0b001 and use no bits outside 0b111, "
                                  "targets share bits 0b10 and use no bits outside 0b10")
    assert "within" not in str(parse_report(simulate(inputs)[1]))


def test_above_64_ranks_header_mismatches_are_printed_as_bits_not_a_range():
    inputs = [RankInput([1], [3], [2], seq=6, site=0x30) for _ in range(69)] + [RankInput([1], [3], [2], seq=3,
                                                                                          site=0x11)]
    rep = parse_report(simulate(inputs)[1])
    assert rep.mismatch_lines() == [
        "call mismatch: rank 0 has 6, at least 1 rank(s) differ (values share bits 0b010 and use no bits "
        "outside 0b111)",
        "site/slot-layout fingerprint mismatch: rank 0 has 0x00000030, at least 1 rank(s) differ (values share "
        "bits 0x00000010 and use no bits outside 0x00000031)"]


@pytest.mark.parametrize("bad, reason", [
    (dict(votes=[7]), wire.REASON_VOTE), (dict(stages=[64]), wire.REASON_STAGE),
    (dict(targets=[99]), wire.REASON_TARGET), (dict(site=2**32), wire.REASON_SITE),
    (dict(poison=wire.REASON_SHAPE), wire.REASON_SHAPE), (dict(poison=wire.REASON_MAX), wire.REASON_MAX)])
def test_above_64_ranks_a_lone_poisoned_rank_arrives_with_its_reason(bad, reason):
    world, lone = 70, 66
    inputs = [RankInput([1], [3], [2], site=9) for _ in range(world)]
    inputs[lone] = dataclasses.replace(inputs[lone], **bad)
    rep = parse_report(simulate(inputs, view=1)[1])
    assert not rep.exact and rep.poisoned_ranks == [lone]
    text = wire.REASON_TEXT.get(reason, f"reason code {reason}")
    assert rep.poison_reasons == {lone: text}
    assert f"  bad input from rank {lone}: {text}" in str(rep).splitlines()


def _poisoned_world(world: int, three: bool) -> tuple[list, dict, str]:
    """Two ranks poisoned for different reasons (a bad stage, a bad vote), or three
    (rank 0 also declaring REASON_SHAPE); the reason counts and the text line
    every view must show."""
    inputs = [RankInput([1], [3], [2]) for _ in range(world)]
    inputs[3], inputs[world - 2] = RankInput([1], [64], [2]), RankInput([5], [3], [2])
    counts = {"a vote that is neither 0 nor 1": 1, "a stage id outside 0..63": 1}
    line = "  bad input from 2 rank(s): 1 with a vote that is neither 0 nor 1, 1 with a stage id outside 0..63"
    if three:
        inputs[0] = RankInput([1], [3], [2], poison=wire.REASON_SHAPE)
        counts["tensors of the wrong shape or length"] = 1
        line = ("  bad input from 3 rank(s): 1 with a vote that is neither 0 nor 1, 1 with a stage id outside "
                "0..63, 1 with tensors of the wrong shape or length")
    return inputs, counts, line


@pytest.mark.parametrize("three", [False, True], ids=["two", "three"])
@pytest.mark.parametrize("world", [70, 1024, pytest.param(wire.MAX_WORLD, marks=pytest.mark.slow)])
def test_above_64_ranks_every_view_counts_every_reason(world, three):
    """Several poisoned ranks past the lanes go unnamed, but every view, the
    poisoned ranks' own as well as their peers', learns each reason and how
    many ranks sent it."""
    inputs, counts, line = _poisoned_world(world, three)
    reduced = reduce_all(inputs)
    for view in (0, 1, 3, world - 2, world - 1):
        _decision, report = decode_view(reduced, inputs, view)
        rep = parse_report(report)
        assert not rep.exact and not rep.corrupt and rep.poisoned_count == sum(counts.values())
        assert rep.poisoned_ranks == [] and rep.poison_reasons == {}
        assert rep.reason_counts == counts, f"view of rank {view}"
        assert line in str(rep).splitlines(), str(rep)
        assert rep.to_dict()["reason_counts"] == counts


@pytest.mark.parametrize("world", [6, 64])
def test_up_to_64_ranks_the_reason_counts_agree_with_the_named_ranks(world):
    inputs, counts, _line = _poisoned_world(world, True)
    rep = parse_report(simulate(inputs, view=1)[1])
    assert rep.exact and rep.poisoned_ranks == [0, 3, world - 2] and rep.reason_counts == counts
    named: dict = {}
    for reason in rep.poison_reasons.values():
        named[reason] = named.get(reason, 0) + 1
    assert rep.reason_counts == named and sum(named.values()) == rep.poisoned_count


def test_the_reasons_counted_in_a_text_are_bounded():
    # seven reasons on eight ranks past the lanes: the three most common are given, the rest counted
    world = 70
    inputs = [RankInput([1], [3], [2]) for _ in range(world)]
    for r, code in enumerate((20, 21, 21, 22, 23, 24, 25, 26)):
        inputs[10 + r] = RankInput([1], [3], [2], poison=code)
    rep = parse_report(simulate(inputs, view=1)[1])
    assert len(rep.reason_counts) == 7 and rep.reason_counts["reason code 21"] == 2
    assert rep.reason_counts_text() == ("2 with reason code 21, 1 with reason code 20, 1 with reason code 22, "
                                        f"… and {7 - MAX_TEXT_GROUPS} more reason(s) on 4 rank(s)")
    assert len(rep.reason_counts_text(None).split(", ")) == 7


def test_reason_counts_that_do_not_add_up_leave_no_reason_and_a_corrupt_report():
    # the REASONS section cleared: poison bits say 2 ranks, the counts say none
    world = 70
    inputs, _counts, _line = _poisoned_world(world, False)
    reduced = reduce_all(inputs)
    L = wire.layout(1, world)
    reduced[L.reasons_offset:L.reasons_offset + L.reasons_words] = 0
    rep = parse_report(decode_view(reduced, inputs, 1)[1])
    assert rep.corrupt and rep.poisoned_count == 2 and rep.reason_counts == {}
    assert f"  bad input from 2 rank(s) ({NO_REASON_TEXT})" in str(rep).splitlines()


def test_above_64_ranks_only_the_counts_arrive():
    world = 65
    inputs = [RankInput([r != 3], [3], [2]) for r in range(world)]
    _decision, report, _ = simulate(inputs)
    [slot] = parse_report(report).slots
    assert slot.yes == world - 1 and slot.votes == [] and slot.ranks_voting(False) == []


def test_the_text_names_ids_in_the_callers_vocabulary():
    inputs = [RankInput([1], [3], [2]), RankInput([1], [4], [2])]
    _decision, report, _ = simulate(inputs)
    kitchen = Vocabulary(stages={3: "warm", 4: "hot"}, targets={2: "boil"})
    rep = parse_report(report, ["pot"], vocabulary=kitchen)
    [sd] = rep.diverged_slots
    assert sd.holdings_text() == "rank 0 holds warm -> boil; rank 1 holds hot -> boil"
    assert "  slot pot (#0): rank 0 holds warm -> boil; rank 1 holds hot -> boil" in str(rep).splitlines()
    # ids the caller did not name print as ids
    plain = parse_report(report, ["pot"], vocabulary=Vocabulary(stages={3: "warm"}))
    assert plain.diverged_slots[0].holdings_text() == \
        "rank 0 holds warm -> target 2; rank 1 holds stage 4 -> target 2"


def test_without_a_vocabulary_the_text_prints_ids():
    _decision, report, _ = simulate([RankInput([1], [3], [2]), RankInput([1], [4], [2])])
    [sd] = parse_report(report).diverged_slots
    assert sd.holdings_text() == "rank 0 holds stage 3 -> target 2; rank 1 holds stage 4 -> target 2"


# Modules that know ids only: Esper's names reach them from their caller.
GENERIC_MODULES = ("report", "wire", "ops", "gate_sync", "consensus", "errors")


PACKAGE = Path(wire.__file__).parent


def _imported_names(module: str) -> set[str]:
    """Every module esper_gate/<module>.py imports, also inside functions."""
    names = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            # these modules sit at the top of the package: "from .x" is esper_gate.x
            base = ("esper_gate." if node.level else "") + (node.module or "")
            base = base.rstrip(".")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_generic_layer_never_imports_esper_names():
    for name in GENERIC_MODULES:
        esper = {m for m in _imported_names(name)
                 if m.split(".")[:2] in (["esper_gate", "esper"], ["esper_gate", "kasmina"])}
        assert not esper, f"esper_gate/{name}.py imports {esper}: Esper's names belong to its caller"
    # nor through anything it imports, at import time
    code = ("import sys; import " + ", ".join(f"esper_gate.{m}" for m in GENERIC_MODULES)
            + "; print(sorted(m for m in sys.modules if m in ('esper_gate.esper', 'esper_gate.kasmina')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_mismatch_lines_name_the_ranks_at_each_call():
    agree = [RankInput([1], [3], [2], seq=5), RankInput([1], [3], [2], seq=5)]
    late = agree + [RankInput([1], [3], [2], seq=4)]
    rep = parse_report(simulate(late)[1])
    assert rep.mismatch_lines() == ["call mismatch: ranks 0-1 at call 5; rank 2 at call 4"]
    assert "  call mismatch: ranks 0-1 at call 5; rank 2 at call 4" in str(rep).splitlines()
    assert parse_report(simulate(agree)[1]).mismatch_lines() == []


def test_to_dict_holds_every_field_and_is_json_able():
    inputs = [RankInput([1, 1], [3, 3], [2, 2]), RankInput([1, 0], [3, 4], [2, 2])]
    rep = parse_report(simulate(inputs)[1], ["a", "b"], vocabulary=Vocabulary({3: "warm"}, {2: "boil"}))
    out = json.loads(json.dumps(rep.to_dict()))
    assert set(out) == {f.name for f in dataclasses.fields(DivergenceReport)}
    [sd] = out["diverged_slots"]
    # the vocabulary appears once, at the top, not in every diverged slot
    assert set(sd) == {f.name for f in dataclasses.fields(SlotDivergence)} - {"vocabulary"}
    assert out["vocabulary"] == {"stages": {"3": "warm"}, "targets": {"2": "boil"}}
    assert sd["holdings"] == [{"stage": 3, "target": 2, "ranks": [0], "votes_passed": [0], "policy": "unanimous",
                               "digest": 0},
                              {"stage": 4, "target": 2, "ranks": [1], "votes_passed": [], "policy": "unanimous",
                               "digest": 0}]


def all_diverged(world: int, slots: int, **kw) -> list[RankInput]:
    """Every rank at a different stage and target in every slot: the longest report there is."""
    return [RankInput([1] * slots, [(r + s) % 64 for s in range(slots)], [r % 64] * slots, **kw)
            for r in range(world)]


def _assert_bounded_and_complete(rep: DivergenceReport, world: int, slots: int):
    text = str(rep)
    assert len(text.encode()) < MAX_TEXT_CHARS <= 8192, len(text.encode())
    assert f"  … and {slots - MAX_TEXT_SLOTS} more diverged slot(s)" in text
    assert text.count("  slot ") == MAX_TEXT_SLOTS
    assert text.endswith(f"{slots} slot(s) diverged and were not transitioned; 0 passed")
    # the data keeps everything
    out = rep.to_dict()
    assert len(out["diverged_slots"]) == slots == rep.diverged_count
    if rep.exact:
        assert all(len(sd["holdings"]) == world for sd in out["diverged_slots"])
    return text


def test_a_report_of_64_ranks_all_diverged_in_1024_slots_is_bounded_text_and_complete_data():
    world, slots = 64, 1024
    rep = parse_report(simulate(all_diverged(world, slots))[1], [f"r{s // 8}c{s % 8}" for s in range(slots)])
    text = _assert_bounded_and_complete(rep, world, slots)
    left = world - MAX_TEXT_GROUPS
    assert (f"  slot r0c0 (#0): rank 0 holds stage 0 -> target 0; rank 1 holds stage 1 -> target 1; "
            f"rank 2 holds stage 2 -> target 2; … and {left} more holding(s) on {left} rank(s)") in text.splitlines()
    # asked for, every holding is named
    assert rep.diverged_slots[0].holdings_text(None).count(" holds ") == world


def test_a_report_above_64_ranks_all_diverged_in_1024_slots_is_bounded_text_and_complete_data():
    _assert_bounded_and_complete(parse_report(simulate(all_diverged(70, 1024))[1]), 70, 1024)


@pytest.mark.slow
def test_a_report_of_65536_ranks_all_diverged_in_1024_slots_is_bounded_text():
    _assert_bounded_and_complete(parse_report(simulate(all_diverged(wire.MAX_WORLD, 1024))[1]),
                                 wire.MAX_WORLD, 1024)


def test_header_mismatches_name_the_first_values_and_count_the_rest():
    world = 64
    rep = parse_report(simulate([RankInput([1], [3], [2], seq=5, site=r) for r in range(world)])[1])
    [line] = rep.mismatch_lines()
    left = world - MAX_TEXT_GROUPS
    assert line == ("site/slot-layout fingerprint mismatch: rank 0 at site/slot-layout fingerprint 0x00000000; "
                    "rank 1 at site/slot-layout fingerprint 0x00000001; rank 2 at site/slot-layout fingerprint "
                    f"0x00000002; … and {left} more value(s) on {left} rank(s)")
    assert len(rep.mismatch_lines(None)[0].split("; ")) == world


def test_bad_input_is_grouped_by_reason_and_the_reasons_bounded():
    # ranks 0-3 send bad stages, ranks 4-9 each declare another reason of their own
    inputs = [RankInput([1], [64 if r < 4 else 3], [2], poison=0 if r < 4 else 16 + r) for r in range(10)]
    rep = parse_report(simulate(inputs)[1])
    assert rep.poison_groups()[0] == ("a stage id outside 0..63", [0, 1, 2, 3])
    lines = str(rep).splitlines()
    assert "  bad input from ranks 0-3: a stage id outside 0..63" in lines
    assert "  bad input from rank 4: reason code 20" in lines
    assert "  bad input from rank 9: reason code 25" not in lines
    assert f"  … and {7 - MAX_TEXT_GROUPS} more reason(s) on {7 - MAX_TEXT_GROUPS} rank(s)" in lines


def test_a_text_is_cut_at_the_bound_whatever_the_callers_names_and_says_how_much_is_left_out():
    long_names = Vocabulary(stages={s: "S" * 3000 for s in range(64)})
    rep = parse_report(simulate(all_diverged(4, 16))[1], vocabulary=long_names)
    text = str(rep)
    assert len(text) <= MAX_TEXT_CHARS
    whole = len(rep._text())
    kept = text.rsplit("\n", 1)[0]
    assert text.endswith(f"… and {whole - len(kept)} more characters (the report's to_dict() has it all)")
    assert bounded_text("short") == "short"


def test_ranks_text():
    assert ranks_text([]) == "no rank"
    assert ranks_text([4]) == "rank 4"
    assert ranks_text([5, 0, 1, 2, 7, 8]) == "ranks 0-2,5,7-8"


# ---- no gate, slot policies and state digests ---------------------------------------------

def test_no_gate_prints_as_no_gate_next_to_g0():
    """A slot where the last rank has no gate is diverged on every rank, and the
    text tells its "no gate" from the others' G0 (id 0)."""
    inputs = [RankInput([1, 0], [9, 9], [0, wire.NO_GATE]), RankInput([0, 0], [9, 9], [wire.NO_GATE, wire.NO_GATE])]
    for view in (0, 1):
        decision, report = decode_view(reduce_all(inputs), inputs, view)
        rep = parse_report(report, ["env0/r0c0", "env0/r0c1"], vocabulary=VOCABULARY)
        assert decision == [False, False]
        [sd] = rep.diverged_slots
        assert sd.describe() == "slot env0/r0c0 (#0): rank 0 holds EMBARGOED -> G0; rank 1 holds EMBARGOED -> no gate"
        assert rep.slots[1].no_gate and not rep.slots[1].diverged and not rep.slots[0].no_gate
    assert Vocabulary().holding(3, wire.NO_GATE) == "stage 3 -> no gate"
    assert Vocabulary(targets={wire.NO_GATE: "idle"}).target(wire.NO_GATE) == "idle", "a caller's name wins"


def test_slot_policy_and_digest_differences_are_named_with_the_ranks():
    inputs = [RankInput([1, 1], [4, 6], [3, 5], policies=["any", "unanimous"], digests=[0xAB, 7]) for _ in range(3)]
    inputs[2].policies = ["rank0", "unanimous"]
    inputs[1].digests = [0xAB, 8]
    rep = parse_report(simulate(inputs)[1], ["a", "b"], vocabulary=VOCABULARY)
    policy, digest = rep.diverged_slots
    assert policy.policy_differs and not policy.digest_differs and policy.rank0_policy == "any"
    assert policy.holdings_text() == "ranks 0-1 hold BLENDING -> G3 under any; rank 2 holds BLENDING -> G3 under rank0"
    assert digest.digest_differs and not digest.policy_differs and digest.rank0_digest == 7
    assert digest.holdings_text() == ("ranks 0,2 hold HOLDING -> G5 with digest 0x00000007; "
                                      "rank 1 holds HOLDING -> G5 with digest 0x00000008")
    assert [sv.policies for sv in rep.slots] == [["any", "any", "rank0"], ["unanimous"] * 3]
    assert [sv.digests for sv in rep.slots] == [[0xAB] * 3, [7, 8, 7]]
    assert "slot a (#0)" in str(rep) and "slot b (#1)" in str(rep)


def test_gate_sync_takes_names_policies_and_digests_per_call():
    """A world of one runs the same prepare, pack and decode as a real call."""
    import torch

    from esper_gate import GateInputError, GateSync, state_digest

    gs = GateSync(3, policy="unanimous")
    res = gs([1, 0, 1], [3, 3, 3], [2, 2, wire.NO_GATE], names=["env1/r0c0", "env1/r0c1", "env1/r0c2"],
             policies=[None, "any", "rank0"], digests=[state_digest(1), None, 5])
    rep = res.report()
    assert [sv.name for sv in rep.slots] == ["env1/r0c0", "env1/r0c1", "env1/r0c2"]
    assert [sv.policy for sv in rep.slots] == ["unanimous", "any", "rank0"]
    assert [sv.digest for sv in rep.slots] == [state_digest(1), 0, 5]
    assert res.host_decisions() == [True, False, False], "no gate in slot 2: never passed"
    assert rep.slots[2].no_gate
    # the same policies as tensors-free defaults: the fast path sends none
    assert gs([1, 1, 1], [3, 3, 3], [2, 2, 2], policies=[None] * 3).report().slots[0].policy == "unanimous"
    digests = torch.tensor([1, 2, 3])
    assert gs([1, 1, 1], [3, 3, 3], [2, 2, 2], digests=digests).report().slots[2].digest == 3
    for kw, message in [
        (dict(policies=["any", "consensus", None]), r"policies\[1\] is 'consensus', expected one of"),
        (dict(policies="any"), "policies must be a sequence of 3 policy names"),
        (dict(digests=[1, 2**32, 3]), r"digests\[1\] is 4294967296, expected an int in 0..2\*\*32-1"),
        (dict(digests=[1, -1, 3]), r"digests\[1\] is -1"),
        (dict(digests=[1.5, 2, 3]), "digests must be ints"),
        (dict(digests=torch.tensor([1.0, 2.0, 3.0])), "digests must be an integer dtype, got torch.float32"),
        (dict(policies=["any"]), "policies must have 3 entries, got 1"),
    ]:
        with pytest.raises(GateInputError, match=message):
            gs([1, 1, 1], [3, 3, 3], [2, 2, 2], **kw)
    for names, got in ((["a", "b"], "2 names"), ("abc", "the string 'abc'")):
        with pytest.raises(GateInputError, match=f"names must be a sequence of 3 slot names, got {got}"):
            gs([1, 1, 1], [3, 3, 3], [2, 2, 2], names=names)
    # a digest tensor with a value out of range reaches the kernel, which names it
    with pytest.raises(GateInputError, match="a state digest outside 0..2\\*\\*32-1"):
        gs([1, 1, 1], [3, 3, 3], [2, 2, 2], digests=torch.tensor([1, 2**33, 3]))


def test_state_digest_is_stable_and_type_exact():
    import hashlib

    from esper_gate import GateInputError, state_digest

    # pinned: the same in every process and Python version (BLAKE2b-32 of the documented encoding)
    text = '[["i","3"],["s","blend"],["f","0x1.0000000000000p-1"],["b",null]]'
    want = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
    assert state_digest(3, "blend", 0.5, None) == want
    values = [state_digest(1), state_digest(1.0), state_digest(True), state_digest("1"), state_digest((1,)),
              state_digest(1, 2), state_digest((1, 2)), state_digest(-0.0), state_digest(0.0)]
    assert len(set(values)) == len(values)
    assert all(0 <= v <= wire.MAX_DIGEST for v in values)
    from esper_gate.esper import SeedStage
    assert state_digest(SeedStage.BLENDING) == state_digest(4)
    with pytest.raises(GateInputError, match="state_digest takes ints, floats, strs"):
        state_digest(object())


def test_state_digest_encodes_bytes_tuples_and_int_or_float_likes_as_documented():
    import enum
    import hashlib

    import numpy as np

    from esper_gate import GateInputError, state_digest

    class Level(enum.IntEnum):
        G2 = 2

    class Index:  # anything with __index__ is an int
        def __index__(self):
            return 7

    text = ('[["y","01ff"],["t",[["i","1"],["s","a"],["t",[["b",null],["b",true]]]]],["i","2"],["i","5"],'
            '["f","0x1.0000000000000p-1"],["i","7"]]')
    want = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
    assert state_digest(b"\x01\xff", (1, "a", (None, True)), Level.G2, np.int64(5), np.float32(0.5), Index()) == want
    assert state_digest(Index()) == state_digest(7)

    class Opaque:
        def item(self):   # not numpy's: no value of the state
            return 1

        def __repr__(self):
            return "Opaque()"

    with pytest.raises(GateInputError) as info:
        state_digest(3, Opaque())
    assert str(info.value) == ("state_digest takes ints, floats, strs, bytes, bools, None and tuples of them, "
                               "got Opaque Opaque()")


# ---- every field a report parses, and every line its text can have ---------------------------

def test_policy_and_slot_count_mismatches_name_the_ranks_and_what_each_sent():
    inputs = [RankInput([1, 1, 1], [3, 3, 3], [2, 2, 2], seq=5, site=9) for _ in range(3)]
    inputs[1].policy = "any"
    inputs[2] = RankInput([1, 1, 1, 1], [3, 3, 3, 3], [2, 2, 2, 2], seq=5, site=9)
    rep = parse_report(simulate(inputs, view=0)[1])
    assert rep.mismatches == ["policy", "slots"] and not rep.header_ok and not rep.corrupt
    assert [(rc.rank, rc.seq, rc.site, rc.policy, rc.num_slots, rc.world, rc.poisoned, rc.reason)
            for rc in rep.rank_calls] == [(0, 5, 9, "unanimous", 3, 3, False, 0), (1, 5, 9, "any", 3, 3, False, 0),
                                          (2, 5, 9, "unanimous", 4, 3, False, 0)]
    assert {k: v["equal"] for k, v in rep.field_summaries.items()} == {
        "seq": True, "site": True, "policy": False, "slots": False, "world": True, "poison": True, "reason": True}
    holding = "ranks 0,2 hold stage 3 -> target 2 under unanimous; rank 1 holds stage 3 -> target 2 under any"
    assert str(rep) == "\n".join([
        "esper_gate call 5 on 3 ranks: not in agreement",
        "  policy mismatch: ranks 0,2 at policy unanimous; rank 1 at policy any",
        "  slot count mismatch: ranks 0-1 at slot count 3; rank 2 at slot count 4",
        f"  slot 0 (#0): {holding}", f"  slot 1 (#1): {holding}", f"  slot 2 (#2): {holding}",
        "  no slot was transitioned"])


def test_above_64_ranks_policy_slot_count_and_world_mismatches_are_told_from_the_summaries():
    inputs = [RankInput([1, 1, 1], [3, 3, 3], [2, 2, 2], seq=5, site=9) for _ in range(70)]
    inputs[1].policy = "any"
    inputs[2].world = 71
    inputs[3] = RankInput([1, 1, 1, 1], [3, 3, 3, 3], [2, 2, 2, 2], seq=5, site=9)
    rep = parse_report(simulate(inputs, view=0)[1])
    assert rep.mismatch_lines() == [
        "policy mismatch: rank 0 has 0, at least 1 rank(s) differ (values share bits 0b00 and use no bits outside "
        "0b11)",
        "slot count mismatch: rank 0 has 3, at least 1 rank(s) differ (values share bits 0b000 and use no bits "
        "outside 0b111)",
        "world size mismatch: rank 0 has 70, at least 1 rank(s) differ (values share bits 0b1000110 and use no bits "
        "outside 0b1000111)"]
    assert rep.rank_calls == [] and [s.votes for s in rep.slots] == [[], [], []], "only summaries above 64"
    assert [(s.slot, s.name, s.target) for s in rep.slots] == [(0, "0", 2), (1, "1", 2), (2, "2", 2)]


def test_above_64_ranks_a_slot_whose_policy_or_digest_differs_is_told_in_bits_with_rank_0s_state():
    inputs = [RankInput([1, 1], [3, 3], [2, 2], seq=5, site=9, policies=["any", "any"], digests=[7, 7])
              for _ in range(70)]
    inputs[3].policies = ["rank0", "any"]
    inputs[4].digests = [15, 7]
    rep = parse_report(simulate(inputs, view=0)[1])
    [sd] = rep.diverged_slots
    assert (sd.policy_range, sd.digest_range, sd.rank0_policy, sd.rank0_digest) == ((1, 3), (7, 15), "any", 7)
    assert sd.holdings_text() == (
        "rank 0 holds stage 3 -> target 2 under any with digest 0x00000007; at least 1 rank(s) differ; stages share "
        "bits 0b11 and use no bits outside 0b11, targets share bits 0b10 and use no bits outside 0b10, policy codes "
        "share bits 0b01 and use no bits outside 0b11, digests share bits 0x00000007 and use no bits outside "
        "0x0000000f")
    assert str(rep) == ("esper_gate call 5 on 70 ranks: not in agreement\n  " + sd.describe() +
                        "\n  1 slot(s) diverged and were not transitioned; 1 passed")


def test_words_no_honest_ranks_send_still_parse():
    """A foreign or hand-made report: policy codes out of range print as numbers, names run
    short, and a lone poisoned rank's reason that did not arrive says so."""
    inputs = [RankInput([1, 1], [3, 3], [2, 2], seq=5, site=9) for _ in range(70)]
    inputs[7].stages = [3, 64]
    words = simulate(inputs, view=0)[1]
    words[wire.GLOBAL_WORDS + wire.S_ROOT_POLICY] = len(wire.POLICIES)
    reason_or = wire.G_FIELD_BASE + wire.G_FIELD_STRIDE * [f[0] for f in wire.HEADER_FIELDS].index("reason") + 2
    words[reason_or] = 0
    rep = parse_report(words, ["only"])
    assert [s.name for s in rep.slots] == ["only", "1"] and rep.slots[0].policy == "4"
    assert rep.poisoned_ranks == [7] and rep.poison_reasons == {7: NO_REASON_TEXT}
    assert dataclasses.replace(rep, poison_reasons={}).poison_groups() == [("unknown reason", [7])]
    three = [RankInput([1], [3], [2], seq=5, site=9) for _ in range(3)]
    words = simulate(three, view=0)[1]
    words[wire.ranks_offset(1) + wire.RANK_WORDS + 2] = len(wire.POLICIES)   # rank 1's header: policy code 4
    assert [rc.policy for rc in parse_report(words).rank_calls] == ["unanimous", "4", "unanimous"]
    # a world mismatch with rank calls: no two world sizes up to 64 share a buffer, so only by hand
    words = simulate(three, view=0)[1]
    words[wire.ranks_offset(1) + wire.RANK_WORDS + 4] = 4
    words[wire.G_FLAGS] = (words[wire.G_FLAGS] | wire.FLAG_WORLD_MISMATCH) & ~wire.FLAG_HEADER_OK
    assert parse_report(words).mismatch_lines() == ["world size mismatch: ranks 0,2 at world size 3; rank 1 at "
                                                    "world size 4"]


def test_every_reason_code_is_counted_up_to_the_largest():
    inputs = [RankInput([1], [3], [2], seq=1, site=9) for _ in range(70)]
    inputs[1].poison = wire.REASON_MAX
    inputs[2].poison = wire.REASON_MAX - 1
    rep = parse_report(simulate(inputs, view=0)[1])
    assert rep.reason_counts == {f"reason code {wire.REASON_MAX}": 1, f"reason code {wire.REASON_MAX - 1}": 1}


def test_a_limit_of_none_names_everything_and_a_limit_names_that_many():
    world = 6
    inputs = [RankInput([1], [r % 4], [2], seq=r % 4 + 1, site=9) for r in range(world)]
    rep = parse_report(simulate(inputs, view=0)[1])
    assert rep.mismatch_lines(limit=None)[0] == (
        "call mismatch: ranks 0,4 at call 1; ranks 1,5 at call 2; rank 2 at call 3; rank 3 at call 4")
    assert rep.mismatch_lines(limit=1)[0] == "call mismatch: ranks 0,4 at call 1; … and 3 more value(s) on 4 rank(s)"
    inputs = [RankInput([1], [r % 4], [2], seq=1, site=9) for r in range(world)]
    [sd] = parse_report(simulate(inputs, view=0)[1]).diverged_slots
    assert sd.holdings_text(None) == ("ranks 0,4 hold stage 0 -> target 2; ranks 1,5 hold stage 1 -> target 2; "
                                      "rank 2 holds stage 2 -> target 2; rank 3 holds stage 3 -> target 2")
    assert sd.describe(1) == "slot 0 (#0): ranks 0,4 hold stage 0 -> target 2; … and 3 more holding(s) on 4 rank(s)"
    inputs = [RankInput([1], [3], [2], seq=1, site=9, poison=20 + r) for r in range(4)] + \
        [RankInput([1], [3], [2], seq=1, site=9) for _ in range(66)]
    rep = parse_report(simulate(inputs, view=5)[1])
    assert rep.reason_counts_text(None) == ("1 with reason code 20, 1 with reason code 21, 1 with reason code 22, "
                                            "1 with reason code 23")
    assert rep.reason_counts_text(2) == ("1 with reason code 20, 1 with reason code 21, … and 2 more reason(s) on "
                                         "2 rank(s)")


def test_the_text_of_a_report_with_bad_input_a_corrupt_buffer_and_eight_diverged_slots():
    inputs = [RankInput([1], [3], [2], seq=1, site=9) for _ in range(3)]
    inputs[1].stages = [64]
    rep = parse_report(simulate(inputs, view=0)[1])
    assert str(rep) == ("esper_gate call 1 on 3 ranks: not in agreement\n  bad input from rank 1: a stage id outside "
                        "0..63\n  slot 0 (#0): ranks 0,2 hold stage 3 -> target 2; rank 1 holds stage 0 -> target 2\n"
                        "  no slot was transitioned")
    inputs = [RankInput([1], [3], [2], seq=1, site=9) for _ in range(3)]
    words = simulate(inputs, view=0)[1]
    words[wire.G_FLAGS] = (words[wire.G_FLAGS] | wire.FLAG_CORRUPT) & ~wire.FLAG_HEADER_OK
    assert str(parse_report(words)) == (
        "esper_gate call 1 on 3 ranks: not in agreement\n  the reduced buffer is inconsistent (a rank sent a corrupt "
        "or foreign buffer)\n  no slot was transitioned")
    n = MAX_TEXT_SLOTS
    inputs = [RankInput([1] * n, [3] * n, [2] * n, seq=1, site=9), RankInput([1] * n, [4] * n, [2] * n, seq=1, site=9)]
    text = str(parse_report(simulate(inputs, view=0)[1]))
    assert "more diverged slot" not in text and text.endswith(f"\n  {n} slot(s) diverged and were not transitioned; "
                                                              f"0 passed")


def test_bits_are_padded_to_the_wider_of_the_two_values():
    from esper_gate.report import bits_text

    assert bits_text("x", 0, 0) == "x share bits 0b0 and use no bits outside 0b0"
    assert bits_text("x", 0b100, 0b1) == "x share bits 0b100 and use no bits outside 0b001"
    assert bits_text("x", 0b1, 0b100) == "x share bits 0b001 and use no bits outside 0b100"


def test_a_text_is_cut_at_the_last_line_end_in_the_second_half_of_its_room():
    assert bounded_text("x" * 100, 100) == "x" * 100
    note = "\n… and {} more characters (the report's to_dict() has it all)"
    assert bounded_text("x" * 200, 100) == "x" * 20 + note.format(180)
    # room = 20: a line end at 12 and at 15 (the last in 10..19) -> cut at 15; one at 5 only -> at 20
    text = "x" * 12 + "\n" + "x" * 2 + "\n" + "x" * 185
    assert bounded_text(text, 100) == text[:15] + note.format(len(text) - 15)
    text = "x" * 5 + "\n" + "x" * 194
    assert bounded_text(text, 100) == text[:20] + note.format(len(text) - 20)
    text = "x" * 8 + "\n" + "x" * 191   # before the room's second half (10): not a cut
    assert bounded_text(text, 100) == text[:20] + note.format(len(text) - 20)


def test_a_vocabulary_keeps_its_own_copy_of_the_names_as_ints_and_strings():
    stages, targets = {"3": 4}, {"2": 7}
    voc = Vocabulary(stages, targets)
    stages[5] = "late"
    assert voc.stages == {3: "4"} and voc.targets == {2: "7"} and voc.stage(5) == "stage 5"
    assert voc.to_dict() == {"stages": {3: "4"}, "targets": {2: "7"}}
