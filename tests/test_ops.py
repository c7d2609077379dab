"""Op contracts (opcheck), bad-input errors and torch.compile, on one process."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import esper_gate
from esper_gate import wire
from reference import RankInput, buffer_words, expected


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


def test_opcheck_pack_with_slot_policies_and_digests():
    votes, stages, targets = _inputs()
    policies = torch.tensor([0, 1, 2, 3], dtype=torch.int64)
    digests = torch.tensor([0, 1, 2**32 - 1, 12345], dtype=torch.int64)
    torch.library.opcheck(torch.ops.esper_gate.pack.default,
                          (votes, stages, targets, 5, 1234, "majority", 1, 3, 0, policies, digests))


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


# ---- bad input: the same error from the real kernel, the fake and meta ------
#
# One table of malformed calls runs three ways: on CPU tensors (the C++
# checks in csrc/esper_gate.h), under FakeTensorMode (what torch.compile
# traces with) and on meta tensors (the Meta dispatch key). pack and decode
# reach the same C++ checks through their Meta kernels, and sync's Python
# fake calls those, so the table proves there is one source of the checks:
# each call is refused with the same exception type and message in every
# mode. A fake that accepted what the kernel refuses would trace a broken
# graph, and a meta call that slipped through would return memory nobody
# filled.

MODES = ("real", "fake", "meta")


def _other_device(device):
    # A tensor on another device than the rest. Only meta is at hand without a
    # GPU; a CPU call with one meta tensor dispatches to the Meta kernel, which
    # is exactly the call that once returned uninitialized memory.
    return "cpu" if device == "meta" else "meta"


def _pack_args(device, group_name, edit=None, policy="unanimous", rank=0, world=2, poison=0, n=4, extra=None):
    votes, stages, targets = _inputs(n, device) if n else (
        torch.ones(0, dtype=torch.bool, device=device), torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device))
    if edit is not None:
        votes, stages, targets = edit(votes, stages, targets, device)
    policies, digests = extra(device) if extra is not None else (None, None)
    return (votes, stages, targets, 5, 1234, policy, rank, world, poison, policies, digests)


def _sync_args(device, group_name, **kw):
    votes, stages, targets, seq, site, policy, _rank, _world, poison, policies, digests = \
        _pack_args(device, group_name, **kw)
    return (votes, stages, targets, seq, site, policy, group_name, poison, policies, digests)


def _decode_args(device, group_name, reduced=None, slots=4, world=2, policy="unanimous"):
    if reduced is None:
        reduced = torch.zeros(buffer_words(4, 2), dtype=torch.int64, device=device)
    elif callable(reduced):
        reduced = reduced(device)
    return (reduced, slots, world, policy)


_SLOTS_1025 = lambda v, s, t, d: (torch.ones(1025, dtype=torch.bool, device=d),  # noqa: E731
                                  torch.zeros(1025, dtype=torch.int64, device=d),
                                  torch.zeros(1025, dtype=torch.int64, device=d))

# (id, args builder, exception, message). Every structural check of pack is
# listed; sync runs the same checks before it looks for its group.
_TENSOR_CASES = [
    ("votes 2-D", dict(edit=lambda v, s, t, d: (v.reshape(2, 2), s, t)), ValueError,
     r"expected votes to be a 1-D tensor, got 2-D \(shape \[2, 2\]\)"),
    ("stages 0-D", dict(edit=lambda v, s, t, d: (v, s[0], t)), ValueError,
     r"expected stages to be a 1-D tensor, got 0-D \(shape \[\]\)"),
    ("targets 2-D", dict(edit=lambda v, s, t, d: (v, s, t.reshape(4, 1))), ValueError,
     r"expected targets to be a 1-D tensor, got 2-D \(shape \[4, 1\]\)"),
    ("stages not contiguous", dict(edit=lambda v, s, t, d: (v, torch.arange(8, device=d)[::2], t)),
     ValueError, r"expected stages to be contiguous, got strides \[2\]"),
    ("votes not contiguous", dict(edit=lambda v, s, t, d: (torch.ones(8, dtype=torch.bool, device=d)[::2], s, t)),
     ValueError, r"expected votes to be contiguous, got strides \[2\]"),
    ("votes float", dict(edit=lambda v, s, t, d: (v.float(), s, t)), TypeError,
     "expected votes of dtype torch.bool or torch.int64, got Float"),
    ("stages int32", dict(edit=lambda v, s, t, d: (v, s.int(), t)), TypeError,
     "expected stages of dtype torch.int64, got Int"),
    ("targets float64", dict(edit=lambda v, s, t, d: (v, s, t.double())), TypeError,
     "expected targets of dtype torch.int64, got Double"),
    ("unequal lengths", dict(edit=lambda v, s, t, d: (v, s[:3].contiguous(), t)), ValueError,
     "expected votes, stages and targets of equal length, got 4, 3 and 4"),
    ("0 slots", dict(n=0), ValueError, "expected 1..1024 slots, got 0"),
    ("1025 slots", dict(edit=_SLOTS_1025), ValueError, "expected 1..1024 slots, got 1025"),
    ("mixed devices", dict(edit=lambda v, s, t, d: (v, torch.zeros_like(s, device=_other_device(d)), t)), ValueError,
     "expected votes, stages and targets on one device, got "),
    ("unknown policy", dict(policy="consensus"), ValueError,
     "unknown policy 'consensus', expected one of 'unanimous', 'rank0', 'majority', 'any'"),
    ("poison 32", dict(poison=32), ValueError, "poison must be a reason code in 0..31, got 32"),
    ("poison -1", dict(poison=-1), ValueError, "poison must be a reason code in 0..31, got -1"),
    ("policies 2-D", dict(extra=lambda d: (torch.zeros(2, 2, dtype=torch.int64, device=d), None)), ValueError,
     r"expected policies to be a 1-D tensor, got 2-D \(shape \[2, 2\]\)"),
    ("policies int32", dict(extra=lambda d: (torch.zeros(4, dtype=torch.int32, device=d), None)), TypeError,
     "expected policies of dtype torch.int64, got Int"),
    ("digests of another length", dict(extra=lambda d: (None, torch.zeros(3, dtype=torch.int64, device=d))),
     ValueError, "expected digests of the votes' length 4, got 3"),
    ("digests not contiguous", dict(extra=lambda d: (None, torch.zeros(8, dtype=torch.int64, device=d)[::2])),
     ValueError, r"expected digests to be contiguous, got strides \[2\]"),
    ("digests on another device",
     dict(extra=lambda d: (None, torch.zeros(4, dtype=torch.int64, device=_other_device(d)))), ValueError,
     "expected digests on the votes' device "),
]

_RANK_CASES = [
    ("world 0", dict(world=0), ValueError, f"world_size must be in 1..{wire.MAX_WORLD}, got 0"),
    (f"world {wire.MAX_WORLD + 1}", dict(world=wire.MAX_WORLD + 1), ValueError,
     f"world_size must be in 1..{wire.MAX_WORLD}, got {wire.MAX_WORLD + 1}"),
    ("rank 2 of 2", dict(rank=2), ValueError, r"rank must be in 0..1 for world_size 2, got 2"),
    ("rank -1", dict(rank=-1), ValueError, r"rank must be in 0..1 for world_size 2, got -1"),
]

_DECODE_CASES = [
    ("reduced 2-D", dict(reduced=lambda d: torch.zeros(2, 3, dtype=torch.int64, device=d)), ValueError,
     r"expected reduced to be a 1-D tensor, got 2-D \(shape \[2, 3\]\)"),
    ("reduced not contiguous",
     dict(reduced=lambda d: torch.zeros(2 * buffer_words(4, 2), dtype=torch.int64, device=d)[::2]),
     ValueError, r"expected reduced to be contiguous, got strides \[2\]"),
    ("reduced int32", dict(reduced=lambda d: torch.zeros(buffer_words(4, 2), dtype=torch.int32, device=d)),
     TypeError, "expected reduced of dtype torch.int64, got Int"),
    ("wrong buffer length", dict(reduced=lambda d: torch.zeros(3, dtype=torch.int64, device=d)), ValueError,
     rf"expected a reduced buffer of {buffer_words(4, 2)} words \(no per-slot policies or digests\) or "
     rf"{buffer_words(4, 2, slot_state=True)} words \(with them\) for 4 slots and world_size 2, got 3"),
    ("buffer for another world", dict(world=3), ValueError,
     rf"expected a reduced buffer of {buffer_words(4, 3)} words \(no per-slot policies or digests\) or "
     rf"{buffer_words(4, 3, slot_state=True)} words \(with them\) for 4 slots and world_size 3, "
     rf"got {buffer_words(4, 2)}"),
    ("unknown policy", dict(policy="rank1"), ValueError, "unknown policy 'rank1', expected one of"),
    ("world 0", dict(world=0), ValueError, f"world_size must be in 1..{wire.MAX_WORLD}, got 0"),
    (f"world {wire.MAX_WORLD + 1}", dict(world=wire.MAX_WORLD + 1), ValueError,
     f"world_size must be in 1..{wire.MAX_WORLD}, got {wire.MAX_WORLD + 1}"),
    ("0 slots", dict(slots=0), ValueError, "expected 1..1024 slots, got 0"),
    ("1025 slots", dict(slots=1025), ValueError, "expected 1..1024 slots, got 1025"),
]

BAD_CALLS = (
    [pytest.param("pack", _pack_args, kw, exc, "esper_gate.pack: " + msg, id=f"pack {name}")
     for name, kw, exc, msg in _TENSOR_CASES + _RANK_CASES]
    + [pytest.param("sync", _sync_args, kw, exc, "esper_gate.sync: " + msg, id=f"sync {name}")
       for name, kw, exc, msg in _TENSOR_CASES]
    + [pytest.param("decode", _decode_args, kw, exc, "esper_gate.decode: " + msg, id=f"decode {name}")
       for name, kw, exc, msg in _DECODE_CASES])


def _call(mode, op, build, kw, group_name):
    fn = getattr(torch.ops.esper_gate, op).default
    if mode == "fake":
        with FakeTensorMode():
            return fn(*build("cpu", group_name, **kw))
    return fn(*build("meta" if mode == "meta" else "cpu", group_name, **kw))


def _group_for(op, request):
    return request.getfixturevalue("one_rank_group").group_name if op == "sync" else "unused"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, build, kw, exc, message", BAD_CALLS)
def test_bad_call_raises_alike_in_every_mode(mode, op, build, kw, exc, message, request):
    with pytest.raises(exc, match=message):
        _call(mode, op, build, kw, _group_for(op, request))


@pytest.mark.parametrize("op, build, kw, exc, message", BAD_CALLS)
def test_fake_and_real_messages_are_identical(op, build, kw, exc, message, request):
    """Word for word, not only the part the table names (device names aside)."""
    group_name = _group_for(op, request)
    got = {}
    for mode in ("real", "fake"):
        with pytest.raises(exc) as info:
            _call(mode, op, build, kw, group_name)
        got[mode] = str(info.value)
    assert got["fake"] == got["real"]


def test_sync_on_meta_tensors_outside_tracing_raises(one_rank_group):
    """A real call with meta tensors cannot compute a collective result, and
    its peers are waiting for one: it must not return empty 'decisions'."""
    votes, stages, targets = _inputs(device="meta")
    with pytest.raises(ValueError, match="esper_gate.sync: got votes, stages and targets on meta outside tracing"):
        esper_gate.sync(votes, stages, targets, 1, 2, "unanimous", one_rank_group.group_name)


def test_sync_under_fake_tensor_mode_gives_shapes(one_rank_group):
    with FakeTensorMode():
        votes, stages, targets = _inputs()
        decision, report = esper_gate.sync(votes, stages, targets, 1, 2, "unanimous", one_rank_group.group_name)
    assert decision.shape == (4,) and decision.dtype == torch.bool
    assert report.shape == (wire.report_words(4, 1),) and report.dtype == torch.int64


def test_pack_and_decode_fakes_are_the_cpp_meta_kernels():
    """The checks and sizes of pack and decode under FakeTensorMode and meta
    are the C++ ones: a Meta kernel is registered from C++, and no Python
    fake exists that could differ from it. sync keeps a Python fake (it needs
    the group's world size), which calls those Meta kernels."""
    from torch._library.simple_registry import singleton
    for op in ("pack", "decode"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"esper_gate::{op}", "Meta")
        meta = [line for line in torch._C._dispatch_dump(f"esper_gate::{op}").splitlines()
                if line.startswith("Meta:")]
        assert len(meta) == 1 and "csrc/ops.cpp" in meta[0], meta
        assert singleton.find(f"esper_gate::{op}").fake_impl.kernel is None
    assert singleton.find("esper_gate::sync").fake_impl.kernel is not None
    # sync has one kernel for every device, and no Python copy of its group lookup.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("esper_gate::sync", "CompositeExplicitAutograd")
    for key in ("CPU", "CUDA"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("esper_gate::sync", key)
    assert not hasattr(esper_gate.ops, "_resolve_group")


def test_pack_and_decode_on_meta_propagate_shapes():
    """Meta's usual meaning holds for the ops that involve no other rank."""
    votes, stages, targets = _inputs(device="meta")
    buf = esper_gate.pack(votes, stages, targets, 1, 2, "any", 2, 3)
    assert buf.device.type == "meta" and buf.shape == (buffer_words(4, 3),)
    decision, report = esper_gate.decode(buf, 4, 3, "any")
    assert decision.device.type == "meta" and decision.shape == (4,)
    assert report.shape == (wire.report_words(4, 3),)
    # digests make the call carry the slot state: the larger buffer, the same report
    buf = esper_gate.pack(votes, stages, targets, 1, 2, "any", 2, 3, digests=stages)
    assert buf.device.type == "meta" and buf.shape == (buffer_words(4, 3, slot_state=True),)
    decision, report = esper_gate.decode(buf, 4, 3, "any")
    assert decision.shape == (4,) and report.shape == (wire.report_words(4, 3),)


def _pack(votes, stages, targets, **kw):
    args = dict(seq=0, site=0, policy="unanimous", rank=0, world_size=2, poison=0)
    args.update(kw)
    return esper_gate.pack(votes, stages, targets, args["seq"], args["site"], args["policy"],
                           args["rank"], args["world_size"], args["poison"])


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


@pytest.mark.parametrize("field, value, reason", [
    ("policies", 4, wire.REASON_POLICY),
    ("policies", -1, wire.REASON_POLICY),
    ("digests", 2**32, wire.REASON_DIGEST),
    ("digests", -1, wire.REASON_DIGEST),
])
def test_bad_slot_policies_and_digests_poison_instead_of_raising(field, value, reason):
    votes, stages, targets = _inputs()
    extra = {"policies": torch.zeros(4, dtype=torch.int64), "digests": torch.zeros(4, dtype=torch.int64)}
    bad = {k: v.clone() for k, v in extra.items()}
    bad[field][1] = value
    bufs = [esper_gate.pack(votes, stages, targets, 0, 0, "unanimous", 0, 2, 0, **extra),
            esper_gate.pack(votes, stages, targets, 0, 0, "unanimous", 1, 2, 0, **bad)]
    decision, report = esper_gate.decode(bufs[0] + bufs[1], 4, 2, "unanimous")
    assert not decision.any() and report[wire.G_POISONED_RANK] == 1
    rank1 = report[wire.ranks_offset(4) + wire.RANK_WORDS:][:wire.RANK_WORDS].tolist()
    assert rank1[5:7] == [1, reason]


def test_bad_site_poisons():
    votes, stages, targets = _inputs()
    bufs = [_pack(votes, stages, targets, rank=0, site=5), _pack(votes, stages, targets, rank=1, site=2**33)]
    decision, report = esper_gate.decode(bufs[0] + bufs[1], 4, 2, "unanimous")
    assert not decision.any() and report[wire.G_POISONED_RANK] == 1
