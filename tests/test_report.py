"""The report's accessors, read from what the real kernels decode (simulated ranks)."""
from __future__ import annotations

from esper_gate import wire
from esper_gate.report import parse_report, ranks_text
from reference import RankInput
from simulate import simulate


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
    rep = parse_report(report, ["r0c0", "r0c1", "r0c2"])
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


def test_above_64_ranks_only_the_counts_arrive():
    world = 65
    inputs = [RankInput([r != 3], [3], [2]) for r in range(world)]
    _decision, report, _ = simulate(inputs)
    [slot] = parse_report(report).slots
    assert slot.yes == world - 1 and slot.votes == [] and slot.ranks_voting(False) == []


def test_ranks_text():
    assert ranks_text([]) == "no rank"
    assert ranks_text([4]) == "rank 4"
    assert ranks_text([5, 0, 1, 2, 7, 8]) == "ranks 0-2,5,7-8"
