"""Real multi-process runs of torch.ops.esper_gate.sync over gloo.

One 3-rank world runs every scenario; other world sizes are checked against
the reference in-process (test_properties.py, test_wire.py), with the same
kernels."""
import pytest

from esper_gate import wire
from esper_gate._spawn import spawn_ranks, values
from reference import RankInput, expected

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

S = 6
POLICIES = ("unanimous", "rank0", "majority", "any")


def scenario_inputs(name: str, world: int) -> list[RankInput]:
    """Every rank's inputs for a named scenario (built identically on all ranks)."""
    stages = [1, 2, 3, 4, 6, 3]
    targets = [0, 1, 2, 3, 5, 2]
    policy = name.split(":")[1] if name.startswith("policy:") else "unanimous"
    inputs = []
    for r in range(world):
        votes = [1, 1, 1, 1, 1, 0]
        if name.startswith("policy:"):
            votes = [1, int(r % 2 == 0), int(r == 0), int(r != 0), 0, 1]
        inputs.append(RankInput(votes, list(stages), list(targets), seq=10, site=0xC0FFEE, policy=policy))
    last = inputs[-1]
    if name == "stage":
        last.stages[2] = 4
    elif name == "target":
        last.targets[3] = 5
    elif name == "seq":
        last.seq = 11
    elif name == "site":
        last.site = 0xBAD
    return inputs


SCENARIOS = ["agree", "stage", "target", "seq", "site"] + [f"policy:{p}" for p in POLICIES]


def rank_main(rank, world, scenarios):
    import torch
    import torch.distributed as dist
    from torch.profiler import profile

    import esper_gate

    group = dist.group.WORLD
    out = {}
    with profile() as prof:
        for name in scenarios:
            inp = scenario_inputs(name, world)[rank]
            decision, report = esper_gate.sync(
                torch.tensor(inp.votes, dtype=torch.bool), torch.tensor(inp.stages),
                torch.tensor(inp.targets), inp.seq, inp.site, inp.policy, group.group_name)
            out[name] = (decision.tolist(), report.tolist())
    names = [e.name for e in prof.events()]
    collectives = [n for n in names if n.startswith("gloo:")]
    return out, collectives


def test_sync_scenarios_on_real_ranks():
    world = 3
    results = values(spawn_ranks(rank_main, world, SCENARIOS, timeout=150))
    for rank, (out, collectives) in enumerate(results):
        # exactly one collective per sync call, and it is the all_reduce
        assert collectives == ["gloo:all_reduce"] * len(SCENARIOS), collectives
        for name in SCENARIOS:
            want = expected(scenario_inputs(name, world), view=rank)
            assert out[name] == (want[0], want[1]), (rank, name)
            # every rank gets the same decision
            assert out[name][0] == results[0][0][name][0]

    out = results[0][0]
    decision, report = out["agree"]
    assert decision == [True, True, True, True, True, False]

    # a diverged stage: only that slot is blocked, and the report names the rank
    decision, report = out["stage"]
    assert decision == [True, True, False, True, True, False]
    slot = report[wire.GLOBAL_WORDS + 2 * wire.SLOT_WORDS:][:wire.SLOT_WORDS]
    assert slot[wire.S_STATUS] & wire.STATUS_DIVERGED and slot[wire.S_STATUS] & wire.STATUS_STAGE_DIFFERS
    assert slot[wire.S_STAGE_DIFFER] == 1
    per_rank = report[wire.slot_ranks_offset(S, world) + 2 * world:][:world]
    assert [wire.slot_entry_stage(e) for e in per_rank] == [3] * (world - 1) + [4]

    decision, report = out["target"]
    assert decision == [True, True, True, False, True, False]
    per_rank = report[wire.slot_ranks_offset(S, world) + 3 * world:][:world]
    assert [wire.slot_entry_target(e) for e in per_rank] == [3] * (world - 1) + [5]

    for name, flag in (("seq", wire.FLAG_SEQ_MISMATCH), ("site", wire.FLAG_SITE_MISMATCH)):
        decision, report = out[name]
        assert decision == [False] * S
        assert report[wire.G_FLAGS] & flag
        ranks = report[wire.ranks_offset(S):][:wire.RANK_WORDS * world]
        seqs = ranks[0::wire.RANK_WORDS]
        sites = ranks[1::wire.RANK_WORDS]
        if name == "seq":
            assert seqs == [10] * (world - 1) + [11]
        else:
            assert sites == [0xC0FFEE] * (world - 1) + [0xBAD]
