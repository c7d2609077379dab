"""Op contracts (opcheck), bad-input errors and torch.compile, on one process."""
import pytest
import torch

import esper_gate
from esper_gate import wire
from reference import RankInput, expected


def _inputs(n=4, device="cpu"):
    votes = torch.tensor([True, False, True, True][:n] * (n // 4 or 1), device=device)[:n]
    stages = torch.full((n,), 3, dtype=torch.int64, device=device)
    targets = torch.full((n,), 2, dtype=torch.int64, device=device)
    return votes, stages, targets


# ---- opcheck ---------------------------------------------------------------

def test_opcheck_pack():
    votes, stages, targets = _inputs()
    torch.library.opcheck(torch.ops.esper_gate.pack.default,
                          (votes, stages, targets, 5, 1234, "majority", 1, 3))


def test_opcheck_decode():
    votes, stages, targets = _inputs()
    buf = sum(esper_gate.pack(votes, stages, targets, 5, 1234, "majority", r, 3) for r in range(3))
    torch.library.opcheck(torch.ops.esper_gate.decode.default, (buf, 4, 3, "majority"))


def test_opcheck_sync_one_rank(one_rank_group):
    votes, stages, targets = _inputs()
    torch.library.opcheck(torch.ops.esper_gate.sync.default,
                          (votes, stages, targets, 1, 99, "unanimous", one_rank_group.group_name))


def test_sync_one_rank_matches_reference(one_rank_group):
    votes, stages, targets = _inputs()
    decision, report = esper_gate.sync(votes, stages, targets, 7, 42, "unanimous", one_rank_group.group_name)
    exp_decision, exp_report = expected([RankInput(votes.tolist(), stages.tolist(), targets.tolist(), 7, 42)])
    assert decision.tolist() == exp_decision == [True, False, True, True]
    assert report.tolist() == exp_report


# ---- torch.compile ----------------------------------------------------------

def test_compile_fullgraph_sync(one_rank_group):
    name = one_rank_group.group_name

    def gate(votes, stages, targets):
        decision, report = torch.ops.esper_gate.sync(votes, stages, targets, 3, 17, "unanimous", name)
        return decision & (stages >= 0), report

    votes, stages, targets = _inputs()
    compiled = torch.compile(gate, fullgraph=True, backend="inductor")
    got = compiled(votes, stages, targets)
    want = gate(votes, stages, targets)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_compile_fullgraph_pack_decode():
    def round_trip(votes, stages, targets):
        buf = torch.ops.esper_gate.pack(votes, stages, targets, 1, 2, "any", 0, 2)
        buf = buf + torch.ops.esper_gate.pack(votes, stages, targets, 1, 2, "any", 1, 2)
        return torch.ops.esper_gate.decode(buf, votes.shape[0], 2, "any")

    votes, stages, targets = _inputs()
    got = torch.compile(round_trip, fullgraph=True)(votes, stages, targets)
    want = round_trip(votes, stages, targets)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---- bad input: clear errors that name the value ---------------------------

def _pack(votes, stages, targets, **kw):
    args = dict(seq=0, site=0, policy="unanimous", rank=0, world_size=2)
    args.update(kw)
    return esper_gate.pack(votes, stages, targets, args["seq"], args["site"], args["policy"],
                           args["rank"], args["world_size"], args.get("poison", 0))


@pytest.mark.parametrize("mutate, exc, message", [
    (lambda v, s, t: (v.float(), s, t), TypeError, "votes of dtype torch.bool or torch.int64, got Float"),
    (lambda v, s, t: (v, s.int(), t), TypeError, "stages of dtype torch.int64, got Int"),
    (lambda v, s, t: (v, s, t.double()), TypeError, "targets of dtype torch.int64, got Double"),
    (lambda v, s, t: (v.reshape(2, 2), s, t), ValueError, "votes to be a 1-D tensor, got 2-D"),
    (lambda v, s, t: (v, s[:3], t), ValueError, "equal length, got 4, 3 and 4"),
    (lambda v, s, t: (v[:0], s[:0], t[:0]), ValueError, "expected 1..1024 slots, got 0"),
    (lambda v, s, t: (v, torch.arange(8)[::2], t), ValueError,
     "stages to be contiguous"),
])
def test_malformed_tensors_raise_with_the_value(mutate, exc, message):
    votes, stages, targets = mutate(*_inputs())
    with pytest.raises(exc, match=message):
        _pack(votes, stages, targets)


def test_too_many_slots():
    n = wire.MAX_SLOTS + 1
    with pytest.raises(ValueError, match="expected 1..1024 slots, got 1025"):
        _pack(torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'consensus', expected one of 'unanimous'"):
        _pack(*_inputs(), policy="consensus")


@pytest.mark.parametrize("rank, world, message", [
    (0, 0, "world_size must be in 1..1024, got 0"),
    (0, 1025, "world_size must be in 1..1024, got 1025"),
    (2, 2, "rank must be in 0..1 for world_size 2, got 2"),
    (-1, 2, "rank must be in 0..1 for world_size 2, got -1"),
])
def test_bad_rank_or_world(rank, world, message):
    with pytest.raises(ValueError, match=message):
        _pack(*_inputs(), rank=rank, world_size=world)


def test_bad_poison_code():
    with pytest.raises(ValueError, match="poison must be a reason code in 0..31, got 40"):
        _pack(*_inputs(), poison=40)


def test_decode_wrong_buffer_size():
    with pytest.raises(ValueError, match=r"expected a reduced buffer of \d+ words for 4 slots and world_size 2, got 3"):
        esper_gate.decode(torch.zeros(3, dtype=torch.int64), 4, 2, "unanimous")


def test_unknown_group_name():
    with pytest.raises(ValueError, match="unknown process group name 'no-such-group'"):
        esper_gate.sync(*_inputs(), 0, 0, "unanimous", "no-such-group")


@pytest.mark.parametrize("field, value, reason", [
    ("stages", 64, wire.REASON_STAGE),
    ("stages", -1, wire.REASON_STAGE),
    ("targets", 99, wire.REASON_TARGET),
    ("votes", 2, wire.REASON_VOTE),
])
def test_bad_values_poison_instead_of_raising(field, value, reason):
    """A well-formed tensor with bad values still takes part, poisoned, so the
    other ranks fail in the same call instead of hanging."""
    good = dict(zip(("votes", "stages", "targets"), _inputs()))
    bad = dict(good)
    bad["votes"] = good["votes"].long()
    bad[field] = bad[field].clone()
    bad[field][2] = value
    bufs = [_pack(good["votes"], good["stages"], good["targets"], rank=0),
            _pack(bad["votes"], bad["stages"], bad["targets"], rank=1)]
    decision, report = esper_gate.decode(bufs[0] + bufs[1], 4, 2, "unanimous")
    assert not decision.any()
    assert report[wire.G_FLAGS] & wire.FLAG_POISONED
    assert report[wire.G_POISONED_RANK] == 1
    rank1 = report[wire.ranks_offset(4) + wire.RANK_WORDS:][:wire.RANK_WORDS].tolist()
    assert rank1[5:7] == [1, reason]  # poison, reason of rank 1


def test_bad_site_poisons():
    votes, stages, targets = _inputs()
    bufs = [_pack(votes, stages, targets, rank=0, site=5), _pack(votes, stages, targets, rank=1, site=2**33)]
    decision, report = esper_gate.decode(bufs[0] + bufs[1], 4, 2, "unanimous")
    assert not decision.any() and report[wire.G_POISONED_RANK] == 1
