"""GateSync's parts in one process, in milliseconds: input preparation, the
failure latch, the diagnosis, the watcher, the rendezvous and the result.

What only real ranks show (a collective, a process that dies) lives in
test_gate_sync.py; everything here is pure logic driven by dicts, threads and
fake clocks.
"""
import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

import esper_gate
from esper_gate import wire
from esper_gate._diagnosis import DEAD_RANK_GRACE_S, SETTLE_S, Diagnosis
from esper_gate._group import Rendezvous
from esper_gate._inputs import (MAX_TIMEOUT_S, as_timedelta, prepare, site_fingerprint, slot_state_defaults,
                                timeout_text)
from esper_gate._latch import FailureLatch
from esper_gate._watcher import WATCH_POLL_S, Call, Watcher, read_heartbeats
from esper_gate.consensus import GateConsensus, GateView
from esper_gate.report import MAX_TEXT_CHARS, MAX_TEXT_GROUPS, MAX_TEXT_SLOTS, parse_report
from reference import RankInput
from simulate import simulate

N = 4
CPU = torch.device("cpu")


def _prepare(votes, stages, targets, site=None, device=CPU, num_slots=N):
    return prepare(votes, stages, targets, site, num_slots=num_slots, device=device, default_site=77,
                   call="esper_gate call 3 on rank 1")


# ---- input preparation ---------------------------------------------------------

GOOD = ([1, 1, 1, 1], [3, 3, 3, 3], [4, 4, 4, 4])
# (which argument, its bad value, the reason code, words of the message)
BAD_INPUTS = [
    ("votes", [1, 1, 1], wire.REASON_SHAPE, "votes must have shape [4], got [3]"),
    ("stages", torch.ones(2, 2, dtype=torch.int64), wire.REASON_SHAPE, "stages must have shape [4], got [2, 2]"),
    ("votes", torch.tensor([0.5, 1.0, 1.0, 1.0]), wire.REASON_DTYPE, "integer dtype, got torch.float32"),
    ("stages", torch.ones(4, dtype=torch.bool), wire.REASON_DTYPE,
     "stages must be an integer dtype, got torch.bool"),
    ("targets", torch.ones(4, dtype=torch.bool), wire.REASON_DTYPE,
     "targets must be an integer dtype, got torch.bool"),
    ("stages", torch.tensor([3, 3, 3, 3], device="meta"), wire.REASON_DEVICE, "stages is on meta, expected cpu"),
    ("stages", [3.9, 3, 3, 3], wire.REASON_DTYPE, "stages must be a tensor or a sequence of ints"),
    ("votes", [0.5, 1, 1, 1], wire.REASON_DTYPE, "votes must be a tensor or a sequence of ints"),
    ("votes", 7, wire.REASON_DTYPE, "votes must be a tensor or a sequence of ints, got int"),
]


# ids from the messages: a tensor's repr can change within a process (print options), and
# mutmut names the tests it reruns by id
@pytest.mark.parametrize("which, value, code, words", BAD_INPUTS, ids=[words for *_, words in BAD_INPUTS])
def test_bad_input_becomes_a_poison_code_and_a_message(which, value, code, words):
    args = dict(zip(("votes", "stages", "targets"), GOOD))
    args[which] = value
    p = _prepare(**args)
    assert p.poison == code
    assert p.problem.startswith("esper_gate call 3 on rank 1: ") and words in p.problem
    # stand-ins the op takes, so the rank still joins the collective
    assert p.votes.dtype == torch.bool and p.stages.dtype == torch.int64 and p.site == 0
    assert all(t.shape == (N,) and t.device == CPU for t in (p.votes, p.stages, p.targets))


def test_every_tensor_on_the_wrong_device_is_bad_input():
    meta = [torch.ones(N, dtype=torch.int64, device="meta") for _ in range(3)]
    p = _prepare(*meta)
    assert p.poison == wire.REASON_DEVICE and "votes is on meta, expected cpu" in p.problem


@pytest.mark.parametrize("site, shown", [(2**63, "9223372036854775808"), (-1, "-1"), (2**32, "4294967296"),
                                         (1.5, "1.5")])
def test_a_site_outside_32_bits_is_bad_input_and_shown_as_given(site, shown):
    p = _prepare(*GOOD, site=site)
    assert p.poison == wire.REASON_SITE
    assert f"site must be an int in 0..2**32-1, got {shown}" in p.problem


def test_values_out_of_range_go_to_the_kernel_which_names_them():
    p = _prepare([1, 2**70, 1, 1], [3, -(2**80), 99, 3], [4, 4, 4, 4])
    assert p.problem is None and p.poison == 0
    assert p.votes.tolist() == [1, wire.MAX_ID + 1, 1, 1] and p.stages.tolist() == [3, -1, 64, 3]


def test_tensors_the_op_takes_pass_through_untouched():
    v, s, t = torch.ones(N, dtype=torch.bool), torch.full((N,), 3), torch.full((N,), 4)
    p = _prepare(v, s, t)
    assert p.votes is v and p.stages is s and p.targets is t and p.site == 77 and p.problem is None
    p = _prepare([True, 0, 1, 1], torch.full((N,), 3, dtype=torch.int32), (4, 4, 4, 4), site=5)
    assert p.votes.tolist() == [1, 0, 1, 1] and p.stages.dtype == torch.int64 and p.site == 5


def test_numpy_arrays_and_scalars_are_read_like_lists():
    np = pytest.importorskip("numpy")
    p = _prepare(np.array([True, False, True, True]), np.array([3, 3, 4, 3], dtype=np.int32),
                 np.array([4, 4, 4, 4], dtype=np.uint8))
    assert p.problem is None and p.poison == 0
    assert p.votes.tolist() == [1, 0, 1, 1] and p.stages.tolist() == [3, 3, 4, 3] and p.targets.tolist() == [4] * N
    # numpy's bool has no __index__, unlike Python's
    p = _prepare([np.bool_(True), np.bool_(False), np.int64(1), 1], [np.int64(3)] * N, GOOD[2])
    assert p.problem is None and p.votes.tolist() == [1, 0, 1, 1] and p.stages.tolist() == [3] * N
    # ... but its floats are no ints, even whole ones
    p = _prepare([np.float64(1.0), 1, 1, 1], *GOOD[1:])
    assert p.poison == wire.REASON_DTYPE and "votes must be a tensor or a sequence of ints, got list" in p.problem


@pytest.mark.parametrize("which, make, code, words", [
    ("stages", lambda np: np.ones(N, dtype=bool), wire.REASON_DTYPE, "stages must be an integer dtype, got numpy bool"),
    ("votes", lambda np: np.ones(N), wire.REASON_DTYPE, "votes must be bool or an integer dtype, got numpy float64"),
    ("votes", lambda np: np.ones((2, 2), dtype=bool), wire.REASON_SHAPE, "votes must have shape [4], got [2, 2]"),
    ("targets", lambda np: np.int64(4), wire.REASON_SHAPE, "targets must have shape [4], got []")],
    ids=["bool-stages", "float-votes", "2d", "scalar"])
def test_numpy_arrays_are_checked_as_tensors_are(which, make, code, words):
    np = pytest.importorskip("numpy")
    args = dict(zip(("votes", "stages", "targets"), GOOD))
    args[which] = make(np)
    p = _prepare(**args)
    assert p.poison == code and words in p.problem, p.problem


def test_a_gate_with_the_slot_state_sends_it_in_every_call_and_one_without_never():
    """Every call of a gate packs one buffer size: a gate with the slot state sends its
    defaults where a call gives no policies or digests (bad input included); a gate
    without it refuses them as bad input rather than send a larger buffer."""
    codes, zeros = slot_state_defaults(N, "majority", CPU)
    assert codes.tolist() == [wire.POLICY_CODES["majority"]] * N and zeros.tolist() == [0] * N

    def prep(slot_state, **kw):
        args = dict(zip(("votes", "stages", "targets"), GOOD))
        args.update(kw)
        return prepare(args.pop("votes"), args.pop("stages"), args.pop("targets"), None, num_slots=N, device=CPU,
                       default_site=77, call="c", default_policy="majority", slot_state=slot_state, **args)

    with_state = (codes, zeros)
    p = prep(with_state)  # the fast path
    assert p.policies is codes and p.digests is zeros and p.problem is None
    p = prep(with_state, policies=[None, "any", None, None])
    assert p.policies.tolist() == [2, 3, 2, 2] and p.digests is zeros
    p = prep(with_state, digests=[1, None, 3, 4], policies=["majority"] * N)
    assert p.policies is codes and p.digests.tolist() == [1, 0, 3, 4]
    p = prep(with_state, stages=[3, 3, 3])  # bad input still sends the slot state
    assert p.problem is not None and p.policies is codes and p.digests is zeros

    p = prep(None)
    assert p.policies is None and p.digests is None and p.problem is None
    p = prep(None, policies=["majority", None, "majority", None])  # the gate's own: nothing to send
    assert p.problem is None and p.policies is None
    p = prep(None, policies=["any", None, None, None])
    assert p.poison == wire.REASON_POLICY and "slot_state=False" in p.problem and p.policies is None
    p = prep(None, digests=[0, 0, 0, 0])
    assert p.poison == wire.REASON_DIGEST and "slot_state=False" in p.problem and p.digests is None


def test_the_slot_state_is_part_of_the_layout_fingerprint():
    from esper_gate import GateSync

    assert GateSync(3).site == site_fingerprint(3, None)
    assert GateSync(3, slot_state=False).site != GateSync(3).site
    with pytest.raises(esper_gate.GateInputError, match="slot_state must be True or False, got 1"):
        GateSync(3, slot_state=1)


def test_a_digest_of_2_32_minus_1_is_taken_and_one_more_is_bad_input():
    top = 2**32 - 1
    assert wire.MAX_DIGEST == top
    state = slot_state_defaults(N, "unanimous", CPU)   # a gate that carries digests
    p = prepare(*GOOD, None, num_slots=N, device=CPU, default_site=77, call="c", digests=[top, 0, None, 5],
                slot_state=state)
    assert p.problem is None and p.poison == 0 and p.digests.tolist() == [top, 0, 0, 5]
    # the kernels carry it too: every rank sends it, nobody is poisoned, and it is rank 0's digest
    decision, report, _ = simulate([RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9, digests=[top] * N)
                                    for _ in range(3)])
    rep = parse_report(report)
    assert rep.ok and rep.poisoned_count == 0 and decision == [True] * N
    assert [s.digest for s in rep.slots] == [top] * N and rep.slots[0].digests == [top] * 3
    p = prepare(*GOOD, None, num_slots=N, device=CPU, default_site=77, call="c", digests=[top + 1, 0, 0, 0],
                slot_state=state)
    assert p.poison == wire.REASON_DIGEST and "digests[0] is 4294967296, expected an int in 0..2**32-1" in p.problem


def test_tensors_the_fast_path_would_take_are_checked_like_any_other_input():
    """All three arguments tensors (the fast path's case), one of them not as the op takes it."""
    v, s, t = torch.ones(N, dtype=torch.bool), torch.full((N,), 3), torch.full((N,), 4)
    cases = [
        ((v.float(), s, t), wire.REASON_DTYPE, "votes must be bool or an integer dtype, got torch.float32"),
        ((v, s.float(), t), wire.REASON_DTYPE, "stages must be an integer dtype, got torch.float32"),
        ((torch.ones(N + 1, dtype=torch.bool), s, t), wire.REASON_SHAPE, "votes must have shape [4], got [5]"),
        ((v, torch.full((N, 2), 3), t), wire.REASON_SHAPE, "stages must have shape [4], got [4, 2]"),
        ((v, s, torch.full((N + 1,), 4)), wire.REASON_SHAPE, "targets must have shape [4], got [5]"),
        ((v.to("meta"), s, t), wire.REASON_DEVICE, "votes is on meta, expected cpu"),
        ((v, s.to("meta"), t), wire.REASON_DEVICE, "stages is on meta, expected cpu"),
        ((v, s, t.to("meta")), wire.REASON_DEVICE, "targets is on meta, expected cpu"),
    ]
    for args, code, text in cases:
        p = _prepare(*args)
        assert (p.poison, p.problem) == (code, f"esper_gate call 3 on rank 1: {text}"), text
    # taken, converted where the op needs int64
    p = _prepare(v.long(), s.int(), t.int())
    assert p.problem is None and (p.votes.dtype, p.stages.dtype, p.targets.dtype) == (torch.int64,) * 3
    p = _prepare(v, s, t.int())
    assert p.problem is None and p.stages is s and p.targets.dtype == torch.int64
    p = _prepare(v, [3, 3, 3, 3], t)   # bool votes on the path that copies lists
    assert p.problem is None and p.votes is v and p.stages.tolist() == [3] * N
    p = _prepare([1, 0, 1, 1], s, t)
    assert p.problem is None and p.votes.tolist() == [1, 0, 1, 1] and p.stages is s
    p = _prepare(v, s, [4, 4, 4, 4])
    assert p.problem is None and p.targets.tolist() == [4] * N


def test_tensors_the_op_takes_skip_every_check_in_python(monkeypatch):
    """The hot path: no copy and no per-argument check, whatever the (valid) site."""
    from esper_gate import _inputs

    def no_check(*args):
        raise AssertionError("the fast path checked an argument in Python")

    monkeypatch.setattr(_inputs, "_coerce", no_check)
    v, s, t = torch.ones(N, dtype=torch.bool), torch.full((N,), 3), torch.full((N,), 4)
    for site in (0, 77, 2**32 - 1, None):
        p = _prepare(v, s, t, site=site)
        assert p.problem is None and p.votes is v and p.stages is s and p.targets is t
        assert p.site == (77 if site is None else site)
    assert _prepare(v.long(), s, t).problem is None


def test_ids_beyond_int64_reach_the_kernel_as_out_of_range_ids():
    p = _prepare([1, 1, 1, 1], [2**70, 3, 3, -(2**70)], [4, 4, 4, 4])
    assert p.problem is None and p.stages.tolist() == [wire.MAX_ID + 1, 3, 3, -1]
    p = _prepare([2**70, 1, 1, 1], [3] * N, [4] * N)
    assert p.problem is None and p.votes.tolist() == [wire.MAX_ID + 1, 1, 1, 1]


def test_a_sequence_that_is_not_a_list_is_read_like_one():
    import array

    p = _prepare(array.array("q", [1, 0, 1, 1]), (3, 3, 3, 3), range(4, 8))
    assert p.problem is None and p.votes.tolist() == [1, 0, 1, 1] and p.targets.tolist() == [4, 5, 6, 7]


def test_a_site_of_0_or_2_32_minus_1_or_a_numpy_int_is_a_site():
    import numpy as np

    for site in (0, 2**32 - 1, np.int64(5), np.uint32(2**32 - 1)):
        p = _prepare(*GOOD, site=site)
        assert p.problem is None and p.site == int(site) and type(p.site) is int
        p = _prepare(*(torch.tensor(x) for x in GOOD), site=site)
        assert p.problem is None and p.site == int(site)


def test_names_make_the_calls_fingerprint_unless_a_site_is_given():
    p = prepare(*GOOD, None, num_slots=N, device=CPU, default_site=77, call="c", names=["a", "b", "c", "d"])
    assert p.problem is None and p.site == site_fingerprint(N, ["a", "b", "c", "d"]) != 77
    p = prepare(*GOOD, 9, num_slots=N, device=CPU, default_site=77, call="c", names=["a", "b", "c", "d"])
    assert p.site == 9
    # the fingerprint is the documented one: crc32 of the JSON [tag, count, names]
    assert site_fingerprint(2, ["a", "b"]) == 734542726 and site_fingerprint(3, None) == 3927444472
    assert site_fingerprint(1, ["r0c0"], tag="t") == 4239888785
    # names a rank cannot use, with all-tensor inputs too: bad input, and every problem is said
    args = [torch.tensor(x) for x in GOOD]
    p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", names=["a"])
    assert (p.poison, p.problem) == (wire.REASON_SHAPE, "c: names must be a sequence of 4 slot names, got 1 names")
    p = prepare([1, 1, 1], *GOOD[1:], None, num_slots=N, device=CPU, default_site=77, call="c", names="abcd")
    assert p.problem == ("c: names must be a sequence of 4 slot names, got the string 'abcd'; votes must have "
                         "shape [4], got [3]")


def test_per_slot_policies_and_digests_travel_as_codes_or_not_at_all():
    args = [torch.tensor(x) for x in GOOD]
    codes = wire.POLICY_CODES
    state = {pol: slot_state_defaults(N, pol, CPU) for pol in codes}   # a gate that carries them
    p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", policies=[None, "any", None, None],
                slot_state=state["unanimous"])
    assert p.problem is None and p.policies.tolist() == [codes["unanimous"], codes["any"]] + [codes["unanimous"]] * 2
    p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", policies=["any"] * 4,
                default_policy="rank0", slot_state=state["rank0"])
    assert p.policies.tolist() == [codes["any"]] * 4
    for same in ([None] * 4, ["majority", None, "majority", None]):
        p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", policies=same,
                    default_policy="majority")
        assert p.problem is None and p.policies is None, "the gate's own policy everywhere, no slot state: none"
    p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", digests=[1, None, 2**32 - 1, 0],
                slot_state=state["unanimous"])
    assert p.problem is None and p.digests.tolist() == [1, 0, 2**32 - 1, 0]
    p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c",
                digests=torch.tensor([1, 2, 3, 4], dtype=torch.int32), slot_state=state["unanimous"])
    assert p.problem is None and p.digests.dtype == torch.int64 and p.digests.tolist() == [1, 2, 3, 4]
    bad = [
        (dict(policies=5), wire.REASON_POLICY, "policies must be a sequence of policy names, got int"),
        (dict(policies=[None, "most", None, None]), wire.REASON_POLICY,
         "policies[1] is 'most', expected one of unanimous, rank0, majority, any or None"),
        (dict(digests=torch.zeros(N, dtype=torch.int64, device="meta")), wire.REASON_DEVICE,
         "digests is on meta, expected cpu"),
        (dict(digests=torch.zeros(N, 2, dtype=torch.int64)), wire.REASON_SHAPE,
         "digests must have shape [4], got [4, 2]"),
        (dict(digests=torch.zeros(N)), wire.REASON_DTYPE, "digests must be an integer dtype, got torch.float32"),
        (dict(digests=torch.zeros(N, dtype=torch.bool)), wire.REASON_DTYPE,
         "digests must be an integer dtype, got torch.bool"),
        (dict(digests=[1, 2]), wire.REASON_SHAPE, "digests must have 4 entries, got 2"),
        (dict(digests=[1.5, 2, 3, 4]), wire.REASON_DIGEST, "digests must be ints in 0..2**32-1 "
         "(esper_gate.state_digest makes one) or None, got list ('float' object cannot be interpreted as an integer)"),
    ]
    for kw, code, text in bad:
        p = prepare(*args, None, num_slots=N, device=CPU, default_site=77, call="c", slot_state=state["unanimous"],
                    **kw)
        assert (p.poison, p.problem) == (code, f"c: {text}"), kw


def test_gate_settings_are_checked_and_slot_names_default_to_the_slot_numbers():
    from esper_gate._inputs import bad_values_text, check_names, check_settings

    assert check_settings(2, "any", None) == ["0", "1"]
    assert check_settings(1, "unanimous", ["r0c0"]) == ["r0c0"]
    assert len(check_settings(wire.MAX_SLOTS, "majority", None)) == wire.MAX_SLOTS
    for n in (0, wire.MAX_SLOTS + 1, True, 2.0):
        with pytest.raises(esper_gate.GateInputError) as info:
            check_settings(n, "any", None)
        assert str(info.value) == f"num_slots must be an int in 1..{wire.MAX_SLOTS}, got {n!r}"
    with pytest.raises(esper_gate.GateInputError) as info:
        check_settings(2, "most", None)
    assert str(info.value) == "unknown policy 'most', expected one of unanimous, rank0, majority, any"
    with pytest.raises(esper_gate.GateInputError) as info:
        check_settings(2, "any", ["a"])
    assert str(info.value) == "slot_names has 1 names for num_slots=2"
    with pytest.raises(esper_gate.GateInputError) as info:
        check_settings(2, "any", "ab")
    assert str(info.value) == "slot_names must be a sequence of 2 names, got the string 'ab'"
    assert check_settings(2, "any", (1, 2)) == ["1", "2"]
    with pytest.raises(esper_gate.GateInputError) as info:
        check_names("ab", 2)
    assert str(info.value) == "names must be a sequence of 2 names, got the string 'ab'"
    assert bad_values_text("esper_gate call 2 on rank 1", None) == (
        "esper_gate call 2 on rank 1: bad input: unknown reason (votes must be 0/1, stage and target ids 0..63)")


def test_the_layout_fingerprint_tells_apart_names_that_a_separator_would_join_alike():
    layouts = [["a\x1fb", "c"], ["a", "b\x1fc"], ["a|b", "c"], ["a", "b|c"], ['a", "b', "c"], ["a", 'b", "c']]
    assert len({site_fingerprint(2, names) for names in layouts}) == len(layouts)
    assert site_fingerprint(2, ["a", "b"], tag="x|2") != site_fingerprint(2, ["a", "b"], tag="x")
    assert site_fingerprint(2, ["r0c0", "r0c1"]) == site_fingerprint(2, ("r0c0", "r0c1"))
    assert 0 <= site_fingerprint(2, None) <= 0xFFFFFFFF


# Too long for the backends (a hang at construction, or gloo's "Invalid timeout"), or no length at all.
BAD_TIMEOUTS = [9e9, 1e11, datetime.timedelta(days=10**5), 1e13, datetime.timedelta.max, float("inf"),
                float("nan"), 10**400, MAX_TIMEOUT_S + 1, datetime.timedelta(seconds=MAX_TIMEOUT_S, microseconds=1),
                0, -1, float("-inf"), datetime.timedelta(0), -datetime.timedelta(seconds=1)]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_a_timeout_beyond_a_week_or_not_positive_is_bad_input_naming_it_and_the_maximum(timeout):
    with pytest.raises(esper_gate.GateInputError) as info:
        as_timedelta(timeout)
    assert str(info.value) == (f"timeout must be more than 0 s and at most MAX_TIMEOUT_S = {MAX_TIMEOUT_S} s "
                               f"(one week), got {timeout!r}")


def test_a_gate_refuses_an_infinite_timeout_before_building_anything():
    with pytest.raises(esper_gate.GateInputError, match="at most MAX_TIMEOUT_S = 604800 s"):
        esper_gate.GateSync(N, timeout=float("inf"))


@pytest.mark.parametrize("timeout, expected", [
    (MAX_TIMEOUT_S, datetime.timedelta(weeks=1)), (datetime.timedelta(weeks=1), datetime.timedelta(weeks=1)),
    (3, datetime.timedelta(seconds=3)), (0.5, datetime.timedelta(milliseconds=500)),
    (1e-9, datetime.timedelta(microseconds=1))], ids=repr)
def test_a_timeout_up_to_a_week_is_taken_and_a_tiny_one_stays_positive(timeout, expected):
    assert as_timedelta(timeout) == expected


@pytest.mark.parametrize("timeout", ["3", None, True, [3]], ids=repr)
def test_a_timeout_that_is_no_duration_is_bad_input(timeout):
    with pytest.raises(esper_gate.GateInputError, match="timeout must be a positive datetime.timedelta or number"):
        as_timedelta(timeout)


@pytest.mark.parametrize("timeout, text", [
    (datetime.timedelta(seconds=3), "3 s"), (0.5, "0.5 s"), (as_timedelta(1e-9), "1e-06 s"), (1e-9, "1e-09 s"),
    (datetime.timedelta(minutes=1), "60 s"), (2 / 3, "0.667 s"), (999.4, "999 s"),
    (datetime.timedelta(weeks=1), "604800 s"), (1000, "1000 s"), (1000.4, "1000 s"), (999.6, "1e+03 s")], ids=repr)
def test_a_timeout_prints_in_seconds_with_three_significant_digits(timeout, text):
    assert timeout_text(timeout) == text


# ---- the failure latch -------------------------------------------------------------

def test_the_first_failure_wins_and_is_delivered_once():
    latch = FailureLatch()
    latch.check_usable()
    first, second = esper_gate.GateTimeoutError("first"), esper_gate.GateError("second")
    assert latch.record(3, first) is first and latch.record(2, second) is first
    assert latch.seq == 3 and not latch.failed_at(2) and latch.failed_at(3) and latch.failed_at(4)
    latch.raise_for(2)  # an earlier call's results stay readable
    with pytest.raises(esper_gate.GateTimeoutError, match="first"):
        latch.raise_for(3)
    with pytest.raises(esper_gate.GateError, match="unusable after call 3 failed.*first"):
        latch.check_usable()


def test_a_failure_nobody_read_is_raised_by_the_next_call():
    latch = FailureLatch()
    latch.record(5, esper_gate.GateTimeoutError("found by the watcher"))
    with pytest.raises(esper_gate.GateTimeoutError, match="found by the watcher"):
        latch.check_usable()
    with pytest.raises(esper_gate.GateError, match="unusable"):
        latch.check_usable()


def test_before_its_first_delivery_the_latch_calls_its_hook_once_whatever_the_hook_does():
    calls = []

    def hook(seq, error):
        calls.append((seq, str(error)))
        raise RuntimeError("the store's host could not wait")   # a courtesy: the failure is raised regardless

    latch = FailureLatch(before_delivery=hook)
    latch.raise_for(4)
    assert calls == [] and not latch.wait(0.01), "nothing latched: no hook, no wait"
    latch.record(4, esper_gate.GateError("rank 2 did not arrive"))
    assert latch.wait(0.01)
    with pytest.raises(esper_gate.GateError, match="rank 2 did not arrive"):
        latch.raise_for(5)
    assert str(latch.deliver()) == "rank 2 did not arrive"
    with pytest.raises(esper_gate.GateError, match="unusable after call 4 failed"):
        latch.check_usable()
    assert calls == [(4, "rank 2 did not arrive")]


def test_a_latch_waits_for_a_failure_until_one_is_recorded():
    latch = FailureLatch()
    t0 = time.monotonic()
    assert latch.wait(0.2) is False and 0.15 < time.monotonic() - t0 < 5
    threading.Timer(0.1, lambda: latch.record(3, esper_gate.GateError("late"))).start()
    assert latch.wait(10) is True and latch.seq == 3


# ---- the diagnosis ---------------------------------------------------------------

class _Beats:
    """Heartbeats that change as the diagnosis sleeps: ``script[i]`` is what the i-th read returns."""

    def __init__(self, *script):
        self.script, self.reads, self.slept = list(script), 0, []

    def read(self, world):
        beats = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        if isinstance(beats, Exception):
            raise beats
        assert len(beats) == world
        return dict(beats)

    def sleep(self, s):
        self.slept.append(s)


def _diagnosis(beats, rank=0, world=3, store_host=0):
    return Diagnosis(beats.read, rank, world, store_host, datetime.timedelta(seconds=3), sleep=beats.sleep)


def test_a_rank_that_never_entered_the_call_is_named_with_its_last_completed_call():
    beats = _Beats({0: (5, 4, 9), 1: (5, 4, 9), 2: (4, 4, 9)})
    err = _diagnosis(beats).diagnose(5, TimeoutError("stuck"), completed_here=4)
    assert isinstance(err, esper_gate.GateTimeoutError)
    assert err.missing_ranks == [2] and err.last_completed[2] == 4 and err.call == 5
    assert "rank 2 did not arrive (waited up to 3 s)" in str(err) and "TimeoutError: stuck" in str(err)
    assert beats.slept == [SETTLE_S]


def test_a_rank_whose_heartbeat_lands_during_the_settle_is_not_named():
    beats = _Beats({0: (5, 4, 9), 1: (4, 4, 3), 2: (5, 4, 9)}, {0: (5, 4, 10), 1: (5, 4, 4), 2: (5, 4, 10)},
                   {0: (5, 4, 11), 1: (5, 4, 5), 2: (5, 4, 11)})
    err = _diagnosis(beats).diagnose(5, RuntimeError("gloo"), completed_here=4)
    assert type(err) is esper_gate.GateError and "failed in the collective: RuntimeError: gloo" in str(err)
    assert beats.slept == [SETTLE_S, DEAD_RANK_GRACE_S]


def test_a_rank_that_entered_and_then_stopped_beating_is_named():
    beats = _Beats({0: (5, 4, 9), 1: (5, 4, 7), 2: (5, 4, 9)}, {0: (5, 4, 12), 1: (5, 4, 7), 2: (5, 4, 12)})
    err = _diagnosis(beats).diagnose(5, TimeoutError("stuck"), completed_here=4)
    assert isinstance(err, esper_gate.GateTimeoutError) and err.missing_ranks == [1]


def test_a_store_that_stopped_answering_names_its_host():
    beats = _Beats(ConnectionError("Connection reset by peer"))
    err = _diagnosis(beats, rank=2, store_host=0).diagnose(7, TimeoutError("stuck"), completed_here=6)
    assert err.missing_ranks == [0] and "it hosts the job's store" in str(err)
    err = _diagnosis(_Beats(ConnectionError("x")), store_host=None).diagnose(7, TimeoutError("t"), 6)
    assert err.missing_ranks == [] and "global rank 0 (outside this group)" in str(err)


def test_a_missing_rank_is_waiting_in_another_gate_only_while_its_call_there_has_not_completed():
    # rank 1 completed its call 3 in gate #0, rank 2 is still in its call 4 of gate #2
    where = {1: (0, 3, True), 2: (2, 4, False)}
    beats = _Beats({0: (5, 4, 9), 1: (4, 4, 9), 2: (4, 4, 9)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep,
                          read_whereabouts=lambda ranks: {r: where[r] for r in ranks}, gate_index=1)
    err = diagnosis.diagnose(5, TimeoutError("stuck"), completed_here=4)
    assert err.missing_ranks == [1, 2]
    assert "rank 1 did not arrive" in str(err) and "rank 1 is waiting" not in str(err)
    assert "rank 2 is waiting in gate #2 of this group (its call 4 there)" in str(err)


def _fields(err):
    return type(err).__name__, str(err), err.missing_ranks, err.last_completed, err.call


def test_short_is_the_type_and_first_line_of_an_error_in_at_most_300_characters():
    from esper_gate._diagnosis import short

    assert short(RuntimeError("gloo timeout\n  at frame 1\n  at frame 2")) == "RuntimeError: gloo timeout"
    assert short(ValueError("")) == "ValueError: " and short(ValueError("  \n ")) == "ValueError: "
    assert short(RuntimeError("x" * 1000)) == ("RuntimeError: " + "x" * 1000)[:300]


def test_every_diagnosis_names_its_ranks_their_last_calls_and_the_call_in_its_error():
    """The error's text and fields for each kind of diagnosis: they are what every rank raises."""
    # an op that failed before its collective: this rank is the one missing
    err = _diagnosis(_Beats({0: (5, 4, 9)}), rank=1).diagnose(5, ValueError("bad group"), completed_here=4)
    assert _fields(err) == ("GateTimeoutError", "esper_gate call 5: rank 1 did not arrive at the collective: its op "
                            "failed before it (ValueError: bad group). No rank applied a transition for this call.",
                            [1], {1: 4}, 5)
    # ranks absent from the call, one that never beat and one behind; their last calls ("none": never)
    beats = _Beats({0: (1, 0, 9), 1: None, 2: (0, 0, 9)})
    err = _diagnosis(beats).diagnose(1, TimeoutError("stuck"), completed_here=0)
    assert _fields(err) == ("GateTimeoutError", "esper_gate call 1: ranks 1-2 did not arrive (waited up to 3 s). "
                            "Last call completed: rank 1: 0, rank 2: 0. No rank applied a transition for this call. "
                            "Collective error: TimeoutError: stuck", [1, 2], {0: 0, 1: 0, 2: 0}, 1)
    # a peer's heartbeat can be ahead of this rank's watcher: its own last call counts
    err = _diagnosis(_Beats({0: (5, 4, 9), 1: (5, 4, 9), 2: (4, 3, 9)})).diagnose(5, TimeoutError("t"), 2)
    assert err.last_completed == {0: 4, 1: 4, 2: 3} and "Last call completed: rank 2: 3." in str(err)
    err = _diagnosis(_Beats({0: (0, -1, 9), 1: None, 2: (0, -1, 9)})).diagnose(0, TimeoutError("t"), -1)
    assert _fields(err) == ("GateTimeoutError", "GateSync construction: rank 1 did not arrive (waited up to 3 s). "
                            "Last call completed: rank 1: none. No rank applied a transition for this call. "
                            "Collective error: TimeoutError: t", [1], {0: -1, 1: -1, 2: -1}, 0)
    # absent, then done with the call within the settling time: it came after the deadline
    beats = _Beats({0: (5, 4, 9), 1: (5, 4, 9), 2: (4, 4, 2)}, {0: (5, 4, 10), 1: (5, 4, 10), 2: (5, 5, 3)})
    err = _diagnosis(beats).diagnose(5, TimeoutError("stuck"), completed_here=4)
    assert _fields(err) == ("GateTimeoutError", "esper_gate call 5: rank 2 arrived too late: after this rank had "
                            "waited 3 s. No rank applied a transition for this call. Collective error: TimeoutError: "
                            "stuck", [2], {0: 4, 1: 4, 2: 5}, 5)
    assert beats.slept == [SETTLE_S]
    # the store's host is gone: it is named, with no last call known
    err = _diagnosis(_Beats(ConnectionError("reset")), rank=2, store_host=1).diagnose(7, TimeoutError("t"), 6)
    assert _fields(err) == ("GateTimeoutError", "esper_gate call 7: rank 1 did not arrive: it hosts the job's store, "
                            "which stopped answering (ConnectionError: reset), so that process has most likely died. "
                            "No rank applied a transition for this call. Collective error: TimeoutError: t",
                            [1], {1: None}, 7)
    err = _diagnosis(_Beats(ConnectionError("reset")), store_host=None).diagnose(7, TimeoutError("t"), 6)
    assert _fields(err)[1:] == ("esper_gate call 7: global rank 0 (outside this group) did not arrive: it hosts the "
                                "job's store, which stopped answering (ConnectionError: reset), so that process has "
                                "most likely died. No rank applied a transition for this call. Collective error: "
                                "TimeoutError: t", [], {}, 7)


def test_a_missing_rank_is_named_before_a_late_one():
    # rank 1 never came; rank 2 says it has just entered (late): the absent rank is the cause
    beats = _Beats({0: (5, 4, 9, 3600), 1: (4, 4, 9, -1), 2: (5, 4, 9, 0)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep, clock=lambda: 103.6)
    err = diagnosis.diagnose(5, RuntimeError("gloo timeout"), completed_here=4, started=100.0)
    assert err.missing_ranks == [1] and "rank 1 did not arrive" in str(err)


def test_lateness_counts_only_peers_in_this_call_that_report_a_wait_and_more_than_the_slack(monkeypatch):
    from esper_gate import _diagnosis

    monkeypatch.setattr(_diagnosis, "LATE_SLACK_S", 0.25)  # exact in binary, like the waits below

    def late(beats, waited_s=3.75):
        d = Diagnosis(None, 0, len(beats), 0, datetime.timedelta(seconds=3))
        return d._late(beats, 5, waited_s)

    # 3.75 s waited, 3 s timeout: a peer that waited 0.5 s entered 0.25 s after the deadline, not more
    assert late({0: (5, 4, 9, 3750), 1: (5, 4, 9, 500)}) == {}
    assert late({0: (5, 4, 9, 3750), 1: (5, 4, 9, 499)}) == {1: pytest.approx(0.251)}
    assert late({0: (5, 4, 9, 3750), 1: (5, 4, 9, 0)}) == {1: 0.75}
    assert late({0: (5, 4, 9, 3750), 1: (5, 4, 9, 0)}, waited_s=None) == {}
    # not this call's wait: this rank itself (a stale beat), a peer already past the call, a completed
    # call (-1), and a heartbeat from before waits were reported (three fields)
    assert late({0: (5, 4, 9, 0), 1: (6, 5, 9, 0), 2: (5, 5, 9, -1), 3: (5, 4, 9)}) == {}


def test_a_rank_waiting_in_another_gate_of_the_group_is_named_as_such():
    """Gates built in different orders on different ranks: the missing rank waits in another gate."""
    where = {1: (2, 7, False), 2: (0, 4, False), 3: None, 4: (1, 1, False), 5: (3, 2, False), 6: (4, 9, False)}
    beats = _Beats({r: (5, 4, 9) if r == 0 else (4, 4, 9) for r in range(7)})
    asked = []

    def read_where(ranks):
        asked.append(list(ranks))
        return {r: where[r] for r in ranks}

    d = Diagnosis(beats.read, 0, 7, 0, datetime.timedelta(seconds=3), sleep=beats.sleep, read_whereabouts=read_where)
    err = d.diagnose(5, TimeoutError("t"), completed_here=4)
    assert asked == [[1, 2, 3, 4, 5, 6]] and err.missing_ranks == [1, 2, 3, 4, 5, 6]
    assert str(err) == (
        "esper_gate call 5: ranks 2-3 did not arrive (waited up to 3 s); rank 1 is waiting in gate #2 of this group "
        "(its call 7 there), not in this gate (#0; were the gates built in a different order on different ranks?); "
        "rank 4 is waiting in gate #1 of this group (its call 1 there), not in this gate (#0; were the gates built "
        "in a different order on different ranks?); rank 5 is waiting in gate #3 of this group (its call 2 there), "
        "not in this gate (#0; were the gates built in a different order on different ranks?). Last call completed: "
        "rank 1: 4, rank 2: 4, rank 3: 4, rank 4: 4, rank 5: 4, rank 6: 4. No rank applied a transition for this "
        "call. Collective error: TimeoutError: t")
    # this gate's own index: a rank whose last call was in gate #2 is here when this is gate #2
    d = Diagnosis(_Beats({0: (5, 4, 9), 1: (4, 4, 9)}).read, 0, 2, 0, datetime.timedelta(seconds=3),
                  sleep=lambda s: None, read_whereabouts=lambda ranks: {1: (2, 4)}, gate_index=2)
    assert str(d.diagnose(5, TimeoutError("t"), 4)).startswith("esper_gate call 5: rank 1 did not arrive")
    # a hint only: whereabouts that cannot be read leave the plain "did not arrive"

    def gone(ranks):
        raise ConnectionError("reset")

    d = Diagnosis(_Beats({0: (5, 4, 9), 1: (4, 4, 9)}).read, 0, 2, 0, datetime.timedelta(seconds=3),
                  sleep=lambda s: None, read_whereabouts=gone)
    assert str(d.diagnose(5, TimeoutError("t"), 4)).startswith("esper_gate call 5: rank 1 did not arrive")


# ---- the watcher ------------------------------------------------------------------

class DictStore:
    """The store requests the watcher and the verdict make, on a dict."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)

    def compare_set(self, key, expected, desired):
        have = self.data.get(key)
        exp = expected.encode() if isinstance(expected, str) else expected
        if (have is None and exp == b"") or have == exp:
            self.data[key] = desired.encode() if isinstance(desired, str) else desired
        return self.data.get(key, exp)


def _wait_for(cond, polls):
    deadline = time.monotonic() + polls * WATCH_POLL_S
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(WATCH_POLL_S / 10)
    return cond()


def test_a_waiting_call_is_announced_within_long_call_s_and_a_completed_one_within_a_heartbeat():
    # The heartbeat's budget: one write a second, whatever the call rate; a call that waits
    # (a peer is missing, the rare case a diagnosis reads heartbeats for) is announced fast.
    from esper_gate._watcher import HEARTBEAT_INTERVAL_S, LONG_CALL_POLL_S, LONG_CALL_S

    store, expired = DictStore(), []
    watcher = Watcher(store, 0, expired.append)
    try:
        assert _wait_for(lambda: store.check(["hb/0"]), polls=4)
        assert store.get("hb/0").decode().startswith("-1,-1,")   # before the warm-up (call 0)
        watcher.begin(1, time.monotonic() + 60)
        t0 = time.monotonic()
        assert _wait_for(lambda: store.get("hb/0").decode().startswith("1,-1,"),
                         polls=(LONG_CALL_S + 2 * LONG_CALL_POLL_S) / WATCH_POLL_S + 4), store.get("hb/0")
        assert time.monotonic() - t0 >= LONG_CALL_S - WATCH_POLL_S   # not at once: the budget
        watcher.end_host(1)
        assert _wait_for(lambda: store.get("hb/0").decode().startswith("1,1,"),
                         polls=HEARTBEAT_INTERVAL_S / WATCH_POLL_S + 4), store.get("hb/0")
        assert watcher.read_heartbeats(1)[0][:2] == (1, 1)
    finally:
        watcher.close()
    assert not expired


def test_a_deadline_fires_once_and_again_after_a_near_miss():
    store, fired = DictStore(), []
    lock = threading.Event()

    def on_expired(call):
        fired.append(call.seq)
        lock.set()

    watcher = Watcher(store, 0, on_expired)
    try:
        watcher.begin(1, time.monotonic() - 1)
        assert lock.wait(2) and fired == [1]
        time.sleep(4 * WATCH_POLL_S)
        assert fired == [1], "one deadline, one verdict"
        # the call completed after all: a near miss
        watcher.end_host(1)
        watcher.resume()
        lock.clear()
        watcher.begin(2, time.monotonic() - 1)
        assert lock.wait(2) and fired == [1, 2]
    finally:
        watcher.close()


def _where_after(store, rank, want, polls=None):
    # whereabouts go out with the heartbeat, once a second (the store's budget)
    from esper_gate._watcher import HEARTBEAT_INTERVAL_S

    polls = HEARTBEAT_INTERVAL_S / WATCH_POLL_S + 6 if polls is None else polls
    return _wait_for(lambda: store.data.get(f"where/{rank}") == want, polls) or store.data.get(f"where/{rank}")


def test_two_gates_publish_where_the_rank_is_and_whether_its_call_there_completed():
    from esper_gate._watcher import Whereabouts

    store, where = DictStore(), Whereabouts(0)
    first = Watcher(store, 0, lambda call: None, whereabouts=(store, 0, where))
    second = Watcher(store, 0, lambda call: None, whereabouts=(store, 1, where))
    try:
        assert _where_after(store, 0, b"1,0,0") is True          # building gate #1: its call 0
        second.built()
        assert _where_after(store, 0, b"1,0,1") is True
        first.begin(3, time.monotonic() + 60)
        assert _where_after(store, 0, b"0,3,0") is True          # waiting in gate #0
        first.end_host(3)
        assert _where_after(store, 0, b"0,3,1") is True          # done there: waiting nowhere
        # gate #0's call 4 completes (as a GPU call does, seen a poll later) after the rank
        # entered gate #1's call 8, where it waits: gate #1's stands
        first.begin(4, time.monotonic() + 60)
        second.begin(8, time.monotonic() + 60)
        first.end_host(4)
        assert _where_after(store, 0, b"1,8,0") is True
        time.sleep(4 * WATCH_POLL_S)
        assert store.data["where/0"] == b"1,8,0"
        # a call that failed is not completed: the rank was held there
        second.forget(8)
        time.sleep(4 * WATCH_POLL_S)
        assert store.data["where/0"] == b"1,8,0"
    finally:
        first.close()
        second.close()


class _TimedStore(DictStore):
    """A DictStore that remembers when each heartbeat was written."""

    def __init__(self):
        super().__init__()
        self.beats = []  # (monotonic time, value)

    def set(self, key, value):
        super().set(key, value)
        if key.startswith("hb/"):
            self.beats.append((time.monotonic(), self.data[key]))


def _beats_until(store, count, limit_s):
    deadline = time.monotonic() + limit_s
    while len(store.beats) < count and time.monotonic() < deadline:
        time.sleep(WATCH_POLL_S / 2)
    return list(store.beats)


def test_heartbeats_come_every_poll_while_a_call_is_stuck_and_once_an_interval_while_idle(monkeypatch):
    """Peers tell when a rank entered a stuck call from its heartbeat, so a call that waits
    longer than LONG_CALL_S is published every LONG_CALL_POLL_S; an idle rank, or one in
    a call that has not waited long, beats once per HEARTBEAT_INTERVAL_S (the store's load)."""
    from esper_gate import _watcher

    monkeypatch.setattr(_watcher, "HEARTBEAT_INTERVAL_S", 0.8)
    monkeypatch.setattr(_watcher, "LONG_CALL_S", 0.3)
    monkeypatch.setattr(_watcher, "LONG_CALL_POLL_S", 0.1)
    store = _TimedStore()
    watcher = Watcher(store, 0, lambda call: None)
    try:
        # idle: the construction's beat, then one an interval later, not sooner
        t0 = _beats_until(store, 1, 5)[0][0]
        beats = _beats_until(store, 2, 5)
        assert len(beats) >= 2 and beats[1][0] - t0 >= 0.75, [round(t - t0, 2) for t, _ in beats]
        # stuck: nothing new until it has waited LONG_CALL_S (the store's budget), then every poll
        tb = time.monotonic()
        watcher.begin(1, tb + 60)
        n = len(store.beats)
        beats = _beats_until(store, n + 6, 5)[n:]
        beats = [b for b in beats if b[1].startswith(b"1,-1,")]
        times = [t - tb for t, _ in beats]
        assert len(beats) >= 5, times
        assert times[0] >= 0.3 - WATCH_POLL_S, f"announced before the call waited long: {times}"
        gaps = [b - a for a, b in zip(times[1:], times[2:])]
        assert max(gaps) < 0.5, f"a stuck call beats every 0.1 s, not every 0.8 s: {times}"
        waited = [int(v.split(b",")[3]) for _, v in beats]
        assert waited[-1] >= 300 and waited == sorted(waited), waited
        assert waited[-1] <= (beats[-1][0] - tb) * 1000 + 50, (waited, times)
        # completed: said at once with no wait (-1), then idle again
        watcher.end_host(1)
        te = time.monotonic()
        n = len(store.beats)
        beats = _beats_until(store, n + 2, 5)[n:]
        assert beats[0][1].startswith(b"1,1,") and beats[0][1].endswith(b",-1"), beats
        assert beats[0][0] - te <= 0.8 + 2 * WATCH_POLL_S, "completion goes out within an interval"
        assert len(beats) >= 2 and beats[1][0] - beats[0][0] >= 0.75, [round(t - te, 2) for t, _ in beats]
    finally:
        watcher.close()


def test_the_c10d_fallbacks_group_outlives_the_gates_deadline_by_a_minute_or_by_the_timeout_above_it():
    """NCCL's watchdog ends the process at the group's timeout: it must come well after the
    gate's own deadline and diagnosis, also for gate timeouts longer than the minute's margin.
    gloo raises in the caller at its own timeout, so its group has the gate's."""
    from esper_gate._group import gate_group_timeout

    s = datetime.timedelta(seconds=1)
    assert gate_group_timeout(5 * s, self_timing=True) == 5 * s
    assert gate_group_timeout(5 * s, self_timing=False) == 65 * s
    assert gate_group_timeout(60 * s, self_timing=False) == 120 * s
    assert gate_group_timeout(90 * s, self_timing=False) == 180 * s
    assert gate_group_timeout(MAX_TIMEOUT_S * s, self_timing=False) == 2 * MAX_TIMEOUT_S * s


def test_a_heartbeat_says_entered_completed_its_count_and_the_wait_and_where_the_rank_is():
    from esper_gate._watcher import HEARTBEAT_INTERVAL_S, Whereabouts

    store, where = DictStore(), DictStore()
    polls = HEARTBEAT_INTERVAL_S / WATCH_POLL_S + 6
    watcher = Watcher(store, 3, lambda call: None, whereabouts=(where, 2, Whereabouts(3)))
    try:
        # construction: no call entered or completed, first beat, no wait; in gate #2 at its warm-up
        assert _wait_for(lambda: store.check(["hb/3"]) and where.check(["where/3"]), polls)
        assert store.get("hb/3") == b"-1,-1,1,-1" and where.get("where/3") == b"2,0,0"
        watcher.begin(1, time.monotonic() + 60)   # a call that waits: announced fast, with where it waits
        assert _wait_for(lambda: store.get("hb/3").startswith(b"1,-1,"), polls), store.get("hb/3")
        assert _wait_for(lambda: where.get("where/3") == b"2,1,0", polls), where.get("where/3")
        assert watcher.read_whereabouts([3, 4]) == {3: (2, 1, False), 4: None}
        watcher.end_host(1)
        assert _wait_for(lambda: store.get("hb/3").startswith(b"1,1,") and store.get("hb/3").endswith(b",-1"),
                         polls), store.get("hb/3")
        beats = watcher.read_heartbeats(5)
        assert beats[3][:2] == (1, 1) and [beats[r] for r in (0, 1, 2, 4)] == [None] * 4, "None: never beat"
        assert read_heartbeats(store, 5)[4] is None and len(read_heartbeats(store, 5)) == 5
    finally:
        watcher.close()
    lone = Watcher(DictStore(), 0, lambda call: None)
    try:
        assert lone.read_whereabouts([0, 1]) == {0: None, 1: None}, "no whereabouts store: nothing known"
    finally:
        lone.close()


def test_an_asynchronous_communicator_error_expires_the_oldest_call_in_flight_at_once():
    done, failed, expired = [-1], [False], []
    watcher = Watcher(DictStore(), 0, expired.append, progress=lambda: done[0], group_failed=lambda: failed[0])
    try:
        done[0] = 3
        assert not watcher.is_completed(Call(2, 0.0)), "a call with no event completes on the host, not the device"
        done[0] = -1
        first = watcher.begin(1, time.monotonic() + 60)
        second = watcher.begin(2, time.monotonic() + 60)
        first.event = second.event = object()
        done[0] = 1
        assert _wait_for(lambda: watcher.completed == 1, polls=20) and list(watcher.inflight) == [second]
        assert watcher.is_completed(first) and not watcher.is_completed(second)
        time.sleep(3 * WATCH_POLL_S)
        assert not expired
        failed[0] = True
        assert not watcher.is_completed(first), "a failed group completes nothing"
        assert _wait_for(lambda: expired, polls=20) and expired == [second]
    finally:
        watcher.close()


def test_news_of_a_call_is_asked_once_per_poll_interval_once_it_waited_long(monkeypatch):
    from esper_gate import _watcher

    monkeypatch.setattr(_watcher, "LONG_CALL_S", 0.1)
    monkeypatch.setattr(_watcher, "LONG_CALL_POLL_S", 0.3)
    asked = []

    def news(call):
        asked.append((time.monotonic(), call.seq))
        return False

    watcher = Watcher(DictStore(), 0, lambda call: None, news=news)
    try:
        t0 = time.monotonic()
        watcher.begin(7, t0 + 60)
        time.sleep(1.2)
    finally:
        watcher.close()
    times = [t - t0 for t, _ in asked]
    assert {seq for _, seq in asked} == {7} and 3 <= len(asked) <= 5, times
    assert times[0] >= 0.1 and all(b - a >= 0.3 - WATCH_POLL_S for a, b in zip(times, times[1:])), times


class _DyingStore(DictStore):
    """A store whose host dies after ``alive`` writes: every request fails from then on."""

    def __init__(self, alive):
        super().__init__()
        self.alive, self.failed = alive, 0

    def set(self, key, value):
        if self.alive <= 0:
            self.failed += 1
            raise ConnectionError("Connection reset by peer")
        self.alive -= 1
        super().set(key, value)


def test_a_dead_store_costs_one_failed_request_and_deadlines_still_fire():
    store, expired = _DyingStore(alive=1), []
    watcher = Watcher(store, 0, expired.append)
    try:
        watcher.begin(1, time.monotonic() + 0.5)   # announcing it is the first request to fail
        assert _wait_for(lambda: watcher.store_error is not None, polls=20)
        assert _wait_for(lambda: expired, polls=40) and [c.seq for c in expired] == [1]
        time.sleep(5 * WATCH_POLL_S)
        assert store.failed == 1
        asked = []
        with pytest.raises(ConnectionError) as info:
            watcher.store_request(asked.append)
        assert info.value is watcher.store_error and asked == []
    finally:
        watcher.close()
    # a request that fails through store_request is the store's error from then on
    watcher = Watcher(DictStore(), 0, lambda call: None)
    try:
        def boom(store):
            raise TimeoutError("store timeout")

        with pytest.raises(TimeoutError):
            watcher.store_request(boom)
        assert isinstance(watcher.store_error, TimeoutError)
        with pytest.raises(TimeoutError):
            watcher.read_heartbeats(1)
    finally:
        watcher.close()


def test_the_watchers_threads_are_daemons_named_for_stack_dumps_and_close_joins_them():
    seen = []
    watcher = Watcher(DictStore(), 4, lambda call: seen.append((threading.current_thread().name,
                                                                  threading.current_thread().daemon)))
    assert watcher._thread.name == "esper_gate-watch-4" and watcher._thread.daemon
    watcher.begin(1, time.monotonic() - 1)
    assert _wait_for(lambda: seen, polls=20) and seen == [("esper_gate-diagnose", True)]
    watcher.close()
    assert not watcher._thread.is_alive() and not any(t.is_alive() for t in watcher.failure_threads)
    t0 = time.monotonic()
    watcher.pause(0.2)
    assert time.monotonic() - t0 < 0.15, "a closed watcher's diagnosis does not wait"
    other = Watcher(DictStore(), 0, lambda call: None)
    try:
        t0 = time.monotonic()
        other.pause(0.2)
        assert 0.15 < time.monotonic() - t0 < 5
    finally:
        other.close()


class _StuckStore(DictStore):
    """A store whose host stopped answering: a write after the first blocks until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.writes = 0

    def set(self, key, value):
        self.writes += 1
        if self.writes > 1:
            self.release.wait(30)
        super().set(key, value)


def test_close_returns_at_once_while_the_store_does_not_answer_a_heartbeat():
    # The watcher's thread never waits in a store request (its store worker does), so a
    # store that does not answer holds neither its deadlines nor close().
    store = _StuckStore()
    watcher = Watcher(store, 0, lambda call: None)
    try:
        watcher.begin(1, time.monotonic() + 60)
        assert _wait_for(lambda: store.writes >= 1, polls=40)
        t0 = time.monotonic()
        watcher.close()
        assert time.monotonic() - t0 < 0.5
    finally:
        store.release.set()


def test_calls_completed_out_of_order_or_forgotten_leave_the_others_watched():
    watcher = Watcher(DictStore(), 0, lambda call: None)
    try:
        calls = [watcher.begin(seq, time.monotonic() + 60) for seq in (1, 2, 3)]
        watcher.end_host(2)
        assert [c.seq for c in watcher.inflight] == [1, 3] and watcher.completed == 2
        assert watcher.is_completed(calls[0]) and watcher.is_completed(calls[1]), "host calls: by number"
        assert not watcher.is_completed(calls[2])
        watcher.forget(3)
        assert [c.seq for c in watcher.inflight] == [1]
        watcher.end_host(1)
        assert not watcher.inflight and watcher.completed == 2
        watcher.end_host(4)   # nothing in flight: still counted
        assert watcher.completed == 4 and watcher.entered == 3
        call = Call(5, 0.0)
        assert call.event is None and abs(call.started - time.monotonic()) < 1
    finally:
        watcher.close()


def test_a_call_another_rank_completed_settles_a_host_call_and_extends_a_gpu_call():
    watcher = Watcher(DictStore(), 0, lambda call: None)
    try:
        host = watcher.begin(1, time.monotonic() - 1)
        watcher.expired = True
        watcher.settle(host, 30.0)
        assert not watcher.expired and not watcher.inflight and watcher.completed == 1
        gpu = watcher.begin(2, time.monotonic() - 1)
        gpu.event = object()
        watcher.expired = True
        t0 = time.monotonic()
        watcher.settle(gpu, 30.0)
        assert not watcher.expired and list(watcher.inflight) == [gpu] and watcher.completed == 1
        assert t0 + 29 < gpu.deadline < time.monotonic() + 31
        other = Call(3, 0.0)
        watcher.settle(other, 30.0)   # not the oldest in flight: nothing to end
        assert list(watcher.inflight) == [gpu] and watcher.completed == 1
    finally:
        watcher.close()


# ---- the rendezvous ----------------------------------------------------------------

def _meet_in_threads(plans, timeout_s, store):
    """Run one thread per rank; ``plans[r]``: (delay before the first attempt, attempts)."""
    out = {}

    def rank_main(rank):
        counts = {}
        delay, attempts = plans[rank]
        time.sleep(delay)
        results = []
        for _ in range(attempts):
            rv = Rendezvous("pg0", rank, len(plans), datetime.timedelta(seconds=timeout_s), store, counts)
            try:
                configs = rv.meet({"rank_of_sender": rank})
                rv.commit()
                results.append(("met", sorted(configs)))
                break
            except esper_gate.GateTimeoutError as e:
                results.append(("timeout", e.missing_ranks))
        out[rank] = results

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_ranks_that_gave_up_are_named_to_a_rank_that_comes_later():
    """The late rank must not pair with the keys the others left behind."""
    out = _meet_in_threads({0: (0, 1), 1: (0, 1), 2: (0.5, 1)}, 0.3, dist.HashStore())
    assert out == {0: [("timeout", [2])], 1: [("timeout", [2])], 2: [("timeout", [0, 1])]}


def test_a_rank_that_never_came_is_named_with_the_timeout_in_seconds():
    rv = Rendezvous("pg0", 0, 2, as_timedelta(0.05), dist.HashStore(), {})
    with pytest.raises(esper_gate.GateTimeoutError, match=r"rank 1 did not arrive within 0\.05 s \(every rank"):
        rv.meet({"rank_of_sender": 0})


def test_a_rebuild_meets_a_late_rank_on_every_rank_whenever_it_arrives():
    """Arrivals around the first attempt's deadline: one verdict per attempt, and the
    rebuild meets, for every arrival time."""
    for delay in (0.0, 0.1, 0.18, 0.2, 0.22, 0.25, 0.3, 0.35):
        out = _meet_in_threads({0: (0, 2), 1: (0, 2), 2: (delay, 1)}, 0.2, dist.HashStore())
        assert out[2] == [("met", [0, 1, 2])], (delay, out)
        for r in (0, 1):
            assert out[r][-1] == ("met", [0, 1, 2]), (delay, out)
            assert out[r][:-1] in ([], [("timeout", [2])]), (delay, out)
        assert out[0][:-1] == out[1][:-1], ("one verdict for the first attempt", delay, out)


# ---- the result ---------------------------------------------------------------------

def _result(inputs, view, policy="unanimous"):
    decision, report, _ = simulate(inputs, view=view)
    mine = inputs[view]
    n = len(mine.votes)
    prepared = _prepare(torch.tensor(mine.votes), torch.tensor(mine.stages), torch.tensor(mine.targets),
                        site=mine.site, num_slots=n)
    return GateConsensus(1, torch.tensor(decision), torch.tensor(report),
                         gate=GateView(view, policy, [str(i) for i in range(n)]), prepared=prepared)


@pytest.mark.parametrize("world", [3, 70])
def test_each_poisoned_rank_learns_its_own_reason(world):
    """Two ranks poisoned for different reasons: each gets a GateInputError with its
    own reason (above 64 ranks the buffer only counts them), the others a
    GatePeerInputError, and no slot passes."""
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(world)]
    a, b = 0, world - 1
    inputs[a].stages = [3, 64, 3, 3]
    inputs[b].votes = [1, 1, 7, 1]
    peer = "ranks 0,2 passed bad input" if world == 3 else "2 rank(s) passed bad input"
    for view, kind, reason in ((a, esper_gate.GateInputError, "stage id outside 0..63"),
                               (b, esper_gate.GateInputError, "vote that is neither 0 nor 1"),
                               (1, esper_gate.GatePeerInputError, peer)):
        res = _result(inputs, view)
        with pytest.raises(kind) as info:
            res.raise_if_diverged()
        assert reason in str(info.value), (view, str(info.value))
        assert res.host_decisions() == [False] * N


def test_above_64_ranks_the_peers_learn_a_lone_poisoned_ranks_reason():
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(70)]
    inputs[66].stages = [3, 64, 3, 3]
    with pytest.raises(esper_gate.GatePeerInputError) as info:
        _result(inputs, view=1).raise_if_diverged()
    assert "rank 66 passed bad input (rank 66: a stage id outside 0..63)" in str(info.value)
    assert info.value.ranks == [66] and info.value.reasons == {66: "a stage id outside 0..63"}


@pytest.mark.parametrize("world", [70, 1024])
def test_above_64_ranks_the_peers_learn_every_reason_with_its_count(world):
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(world)]
    inputs[5].stages = [3, 64, 3, 3]
    inputs[66].stages = [64, 3, 3, 3]
    inputs[world - 1].poison = wire.REASON_SHAPE
    with pytest.raises(esper_gate.GatePeerInputError) as info:
        _result(inputs, view=1).raise_if_diverged()
    assert str(info.value) == ("esper_gate call 1: 3 rank(s) passed bad input (2 with a stage id outside 0..63, "
                               "1 with tensors of the wrong shape or length); no slot was transitioned on any rank")
    assert info.value.ranks == [] and info.value.report.reason_counts == {
        "a stage id outside 0..63": 2, "tensors of the wrong shape or length": 1}


def test_the_error_of_64_ranks_all_diverged_in_1024_slots_is_bounded_and_keeps_the_whole_report():
    world, slots = 64, 1024
    inputs = [RankInput([1] * slots, [(r + s) % 64 for s in range(slots)], [r % 64] * slots, seq=1, site=9)
              for r in range(world)]
    with pytest.raises(esper_gate.GateDivergenceError) as info:
        _result(inputs, view=5).raise_if_diverged()
    message = str(info.value)
    assert len(message.encode()) < MAX_TEXT_CHARS, len(message.encode())
    assert f"… and {slots - MAX_TEXT_SLOTS} more diverged slot(s)" in message
    assert len(info.value.report.diverged_slots) == slots


def test_the_peers_error_groups_bad_input_by_reason_and_bounds_it():
    # ranks 1-3 send bad stages, ranks 4-9 each declare a reason of their own
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(10)]
    for r in range(1, 4):
        inputs[r].stages = [3, 64, 3, 3]
    for r in range(4, 10):
        inputs[r].poison = 16 + r
    with pytest.raises(esper_gate.GatePeerInputError) as info:
        _result(inputs, view=0).raise_if_diverged()
    message = str(info.value)
    assert message.startswith("esper_gate call 1: ranks 1-9 passed bad input (ranks 1-3: a stage id outside "
                              "0..63; rank 4: reason code 20; rank 5: reason code 21; "
                              f"… and {7 - MAX_TEXT_GROUPS} more reason(s)); no slot was transitioned")
    assert info.value.ranks == list(range(1, 10)) and len(info.value.reasons) == 9


class _Ready:
    """A CUDA event's stand-in: ``query()`` is true from the ``after``-th query on."""

    def __init__(self, after=None, at=None):
        self.after, self.at, self.queries = after, at, 0

    def query(self):
        self.queries += 1
        if self.at is not None:
            return time.monotonic() >= self.at
        return self.after is not None and self.queries >= self.after


def _agreed(view=0, world=3, seq=1, **kw):
    inputs = [RankInput([1, 0, 1, 1], [3] * N, [2] * N, seq=seq, site=9) for _ in range(world)]
    decision, report, _ = simulate(inputs, view=view)
    return GateConsensus(seq, torch.tensor(decision), torch.tensor(report),
                         gate=GateView(view, "unanimous", [str(i) for i in range(N)]), **kw)


def test_a_gpu_result_waits_for_its_event_and_then_confirms_the_shared_verdict_once():
    from esper_gate._verdict import Verdict

    ready, store = _Ready(after=3), dist.HashStore()
    confirmed = []

    class Recording(Verdict):
        def confirm(self, seq, latch, void=None):
            confirmed.append(seq)
            return super().confirm(seq, latch)

    res = _agreed(ready=ready, verdict=Recording(lambda request: request(store), rank=0))
    assert res.host_decisions() == [True, False, True, True] and ready.queries == 3 and confirmed == [1]
    assert res.host_decisions() == [True, False, True, True] and confirmed == [1], "confirmed once"
    assert res.report().ok and res.diverged.tolist() == [False] * N
    # a slow event: spin, then short sleeps (not seconds)
    t0 = time.monotonic()
    assert _agreed(ready=_Ready(at=t0 + 0.05)).host_decisions() == [True, False, True, True]
    assert time.monotonic() - t0 < 0.6


def test_a_gpu_result_whose_call_a_peer_failed_raises_that_failure_at_every_host_read():
    from esper_gate._verdict import Verdict

    store = dist.HashStore()
    Verdict(lambda request: request(store), rank=1).failed(1, esper_gate.GateError("rank 2 did not arrive"))
    latch = FailureLatch()
    res = _agreed(ready=_Ready(after=1), latch=latch, verdict=Verdict(lambda request: request(store), rank=0))
    for read in (res.host_decisions, res.host_decisions, res.report, lambda: res.diverged):
        with pytest.raises(esper_gate.GateError, match="rank 2 did not arrive"):
            read()
    assert latch.seq == 1


def test_a_gpu_result_stops_waiting_for_its_event_once_its_call_failed():
    latch = FailureLatch()
    res = _agreed(ready=_Ready(), latch=latch)   # the event never fires: the collective is stuck
    threading.Timer(0.1, lambda: latch.record(1, esper_gate.GateTimeoutError("rank 2 did not arrive", [2]))).start()
    with pytest.raises(esper_gate.GateTimeoutError, match="rank 2 did not arrive"):
        res.host_decisions()
    with pytest.raises(esper_gate.GateError, match="rank 2 did not arrive"):
        res.raise_if_call_failed()


def test_host_reads_take_decodes_decisions_and_the_device_tensor_stays_as_masked():
    res = _agreed()
    masked = torch.zeros(N, dtype=torch.bool)   # invalidated on the device, then the call stood
    res = GateConsensus(1, masked, res._report_tensor, gate=res._gate, decoded=res.decisions)
    assert res.host_decisions() == [True, False, True, True] and res.decisions.tolist() == [False] * N


def test_a_good_call_on_the_host_is_checked_from_its_flags_without_parsing_the_report(monkeypatch):
    from esper_gate import consensus

    parsed = []
    real = consensus.parse_report
    monkeypatch.setattr(consensus, "parse_report", lambda *a, **k: parsed.append(1) or real(*a, **k))
    res = _agreed()
    assert res.raise_if_call_failed() is res and parsed == []
    assert res.raise_if_diverged() is res and parsed == [1]
    assert res.raise_if_call_failed() is res and parsed == [1], "parsed once"


def test_a_result_reports_its_own_call_number_and_the_gates_names():
    from esper_gate.report import Vocabulary

    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=5, site=9) for _ in range(3)]
    inputs[1].seq = 4
    decision, report, _ = simulate(inputs, view=1)
    res = GateConsensus(4, torch.tensor(decision), torch.tensor(report),
                        gate=GateView(1, "unanimous", list("abcd"), Vocabulary({3: "TRAINING"}, {2: "G2"})))
    rep = res.report()
    assert rep.call == 4 and rep.slots[0].name == "a" and rep.vocabulary.stage(3) == "TRAINING"
    with pytest.raises(esper_gate.GateDivergenceError) as info:
        res.raise_if_call_failed()
    assert info.value.report is rep and str(info.value) == str(rep)
    assert str(rep).startswith("esper_gate call 4 on 3 ranks: not in agreement\n  call mismatch: ranks 0,2 at call 5")
    # slots held differently: not a failure of the call, but a divergence
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=5, site=9) for _ in range(3)]
    inputs[2].stages = [3, 4, 3, 3]
    decision, report, _ = simulate(inputs, view=0)
    res = GateConsensus(5, torch.tensor(decision), torch.tensor(report),
                        gate=GateView(0, "unanimous", list("abcd"), Vocabulary({3: "TRAINING", 4: "BLENDING"})))
    assert res.raise_if_call_failed() is res
    with pytest.raises(esper_gate.GateDivergenceError) as info:
        res.raise_if_diverged()
    assert info.value.report is res.report() and str(info.value) == str(res.report())
    assert "rank 2 holds BLENDING -> target 2" in str(info.value)
    assert res.diverged.tolist() == [False, True, False, False] and res.diverged is res.diverged
    assert repr(res).startswith("GateConsensus(seq=5, decisions=tensor([")


def test_bad_input_is_raised_with_this_ranks_own_text_or_the_kernels_reason_in_full():
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(3)]
    inputs[0].stages = [3, 64, 3, 3]
    with pytest.raises(esper_gate.GateInputError) as info:
        _result(inputs, view=0).raise_if_call_failed()
    assert str(info.value) == ("esper_gate call 1 on rank 0: bad input: a stage id outside 0..63 (votes must be 0/1, "
                               "stage and target ids 0..63)")
    # a problem found before the collective is raised in this rank's own words
    decision, report, _ = simulate(inputs, view=0)
    mine = prepare([1] * N, [3] * N, [2] * N, 9, num_slots=N, device=CPU, default_site=77, call="esper_gate call 1",
                   names=["a"])
    assert mine.problem is not None
    res = GateConsensus(1, torch.tensor(decision), torch.tensor(report),
                        gate=GateView(0, "unanimous", list("abcd")), prepared=mine)
    with pytest.raises(esper_gate.GateInputError) as info:
        res.raise_if_call_failed()
    assert str(info.value) == mine.problem


def test_above_64_ranks_a_rank_learns_that_its_own_digest_tensor_was_out_of_range():
    """The buffer counts the poisoned ranks but names none: the rank packs its own input alone."""
    world = 70
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9, digests=[7] * N) for _ in range(world)]
    inputs[5].digests = [7, 2**32, 7, 7]
    inputs[9].stages = [3, 64, 3, 3]
    decision, report, _ = simulate(inputs, view=5)
    mine = prepare(torch.ones(N, dtype=torch.bool), torch.full((N,), 3), torch.full((N,), 2), 9, num_slots=N,
                   device=CPU, default_site=77, call="c", digests=torch.tensor([7, 2**32, 7, 7]),
                   slot_state=slot_state_defaults(N, "unanimous", CPU))
    assert mine.problem is None, "a tensor's range is the kernel's to check"
    res = GateConsensus(1, torch.tensor(decision), torch.tensor(report), gate=GateView(5, "unanimous", list("abcd")),
                        prepared=mine)
    with pytest.raises(esper_gate.GateInputError) as info:
        res.raise_if_call_failed()
    assert str(info.value) == ("esper_gate call 1 on rank 5: bad input: a state digest outside 0..2**32-1 (votes must "
                               "be 0/1, stage and target ids 0..63)")


def test_the_peers_error_names_three_reasons_and_counts_only_more():
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(4)]
    for r in (1, 2, 3):
        inputs[r].poison = 20 + r
    with pytest.raises(esper_gate.GatePeerInputError) as info:
        _result(inputs, view=0).raise_if_call_failed()
    assert str(info.value) == ("esper_gate call 1: ranks 1-3 passed bad input (rank 1: reason code 21; rank 2: reason "
                               "code 22; rank 3: reason code 23); no slot was transitioned on any rank")


def test_poisoned_ranks_whose_reasons_did_not_arrive_are_still_counted():
    # a buffer no honest ranks send: 2 poisoned ranks above 64, their reason counts lost
    world = 70
    inputs = [RankInput([1] * N, [3] * N, [2] * N, seq=1, site=9) for _ in range(world)]
    inputs[3].stages = inputs[4].stages = [3, 64, 3, 3]
    decision, report, _ = simulate(inputs, view=0)
    off = wire.reason_counts_offset(N, world)
    report[off: off + wire.REPORT_REASON_WORDS] = [0] * wire.REPORT_REASON_WORDS
    res = GateConsensus(1, torch.tensor(decision), torch.tensor(report), gate=GateView(0, "unanimous", list("abcd")))
    with pytest.raises(esper_gate.GatePeerInputError) as info:
        res.raise_if_call_failed()
    assert str(info.value) == "esper_gate call 1: 2 rank(s) passed bad input; no slot was transitioned on any rank"


# ---- the verdict -------------------------------------------------------------------

def _verdict(store=None):
    from esper_gate._verdict import Verdict

    store = store if store is not None else dist.HashStore()
    return Verdict(lambda request, *bound: request(store)), store


def test_the_first_rank_to_decide_a_call_decides_it_for_every_rank():
    mine, store = _verdict()
    peer, _ = _verdict(store)
    late = esper_gate.GateTimeoutError("esper_gate call 4: rank 2 did not arrive", [2], {0: 3, 2: 3}, call=4)
    shared = mine.failed(4, late)
    assert shared is not late and type(shared) is esper_gate.GateTimeoutError
    assert (str(shared), shared.missing_ranks, shared.last_completed, shared.call) == (
        str(late), [2], {0: 3, 2: 3}, 4)
    # a peer whose collective completed afterwards adopts the failure
    adopted = peer.completed(4)
    assert (type(adopted), str(adopted), adopted.missing_ranks) == (esper_gate.GateTimeoutError, str(late), [2])
    # a later failure, with another diagnosis, gets the first one
    assert str(peer.failed(4, esper_gate.GateError("another story"))) == str(late)
    # a call that completed first stands: a rank past its deadline does not fail it
    assert peer.completed(5) is None and mine.completed(5) is None
    assert mine.failed(5, late) is None


def test_a_read_of_a_call_a_peer_failed_raises_that_failure_and_latches_it():
    mine, store = _verdict()
    peer, _ = _verdict(store)
    peer.failed(7, esper_gate.GateError("decided by a peer"))
    latch = FailureLatch()
    mine.confirm(6, latch)
    with pytest.raises(esper_gate.GateError, match="decided by a peer"):
        mine.confirm(7, latch)
    assert latch.seq == 7 and latch.failed_at(8)


def test_without_a_store_a_completed_call_stands_and_a_failure_is_this_ranks_own():
    from esper_gate._verdict import Verdict

    def dead(request, *bound):
        raise ConnectionError("Connection reset by peer")

    verdict = Verdict(dead)
    mine = esper_gate.GateError("mine")
    assert verdict.completed(3) is None and verdict.failed(3, mine) is mine


def test_a_rank_that_entered_after_the_deadline_is_named_late():
    """Every rank entered, so none is missing; the one that says it has waited much
    less than this rank's wait past the timeout came after the deadline."""
    # this rank has waited 3.6 s with a 3 s timeout: rank 2 entered 0.4 s after its deadline
    beats = _Beats({0: (5, 4, 9, 3600), 1: (5, 4, 9, 3550), 2: (5, 4, 9, 200)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep,
                          clock=lambda: 103.6)
    err = diagnosis.diagnose(5, RuntimeError("gloo timeout"), completed_here=4, started=100.0)
    assert isinstance(err, esper_gate.GateTimeoutError) and err.missing_ranks == [2], str(err)
    assert "rank 2 arrived too late: after this rank had waited 3 s" in str(err)
    # within the slack of a heartbeat's age, nobody is late: the dead-rank check follows
    beats = _Beats({0: (5, 4, 9, 3600), 1: (5, 4, 9, 3550), 2: (5, 4, 9, 500)},
                   {0: (5, 4, 12, 6100), 1: (5, 4, 12, 6050), 2: (5, 4, 12, 3000)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep,
                          clock=lambda: 103.6)
    err = diagnosis.diagnose(5, RuntimeError("gloo timeout"), completed_here=4, started=100.0)
    assert type(err) is esper_gate.GateError


def test_a_rank_whose_heartbeat_says_it_waited_0_ms_entered_just_now_and_is_named_late():
    """0 ms is the latest a rank can have entered, not "no wait reported" (-1: its call completed)."""
    beats = _Beats({0: (5, 4, 9, 3600), 1: (5, 4, 9, 3550), 2: (5, 4, 9, 0)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep,
                          clock=lambda: 103.6)
    err = diagnosis.diagnose(5, RuntimeError("gloo timeout"), completed_here=4, started=100.0)
    assert isinstance(err, esper_gate.GateTimeoutError) and err.missing_ranks == [2], str(err)
    assert "rank 2 arrived too late" in str(err) and beats.slept == []
    # -1: rank 2's call completed (it reports no wait): not late, so the dead-rank check follows
    beats = _Beats({0: (5, 4, 9, 3600), 1: (5, 4, 9, 3550), 2: (5, 5, 9, -1)},
                   {0: (5, 4, 12, 6100), 1: (5, 4, 12, 6050), 2: (5, 5, 12, -1)})
    diagnosis = Diagnosis(beats.read, 0, 3, 0, datetime.timedelta(seconds=3), sleep=beats.sleep,
                          clock=lambda: 103.6)
    err = diagnosis.diagnose(5, RuntimeError("gloo timeout"), completed_here=4, started=100.0)
    assert type(err) is esper_gate.GateError and beats.slept == [DEAD_RANK_GRACE_S]


@pytest.mark.parametrize("exc", [ValueError("esper_gate.sync: unknown process group name 'x'"),
                                 torch.OutOfMemoryError("CUDA out of memory")], ids=["no group", "no memory"])
def test_an_op_that_failed_before_its_collective_names_its_own_rank_at_once(exc):
    beats = _Beats({0: (5, 4, 9), 1: (5, 4, 9), 2: (5, 4, 9)})
    err = _diagnosis(beats, rank=1).diagnose(5, exc, completed_here=4)
    assert isinstance(err, esper_gate.GateTimeoutError) and err.missing_ranks == [1] and err.call == 5
    assert "rank 1 did not arrive at the collective: its op failed before it" in str(err)
    assert beats.reads == 0 and beats.slept == [], "nothing to wait for: the failure is this rank's"


def test_a_rank_past_its_deadline_adopts_a_verdict_already_made():
    mine, store = _verdict()
    peer, _ = _verdict(store)
    assert mine.peek(3) == (False, None)
    peer.failed(3, esper_gate.GateTimeoutError("rank 1 did not arrive at the collective", [1], {}, call=3))
    decided, failure = mine.peek(3)
    assert decided and failure.missing_ranks == [1] and "did not arrive at the collective" in str(failure)
    peer.completed(4)
    assert mine.peek(4) == (True, None)


def test_verdicts_go_around_a_ring_of_keys_without_mixing_calls():
    from esper_gate._verdict import RING

    mine, store = _verdict()
    peer, _ = _verdict(store)
    assert mine.completed(2) is None
    # the same key, one lap later: an earlier call's "ok" is not this call's verdict
    assert mine.peek(2 + RING) == (False, None)
    assert peer.failed(2 + RING, esper_gate.GateError("late")) is not None
    assert str(mine.completed(2 + RING)) == "late"
    assert mine.peek(2) == (False, None), "overwritten by the next lap"
    tcp = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5))
    on_tcp, _ = _verdict(dist.PrefixStore("g/", tcp))
    assert on_tcp.completed(7) is None and on_tcp.completed(7 + RING) is None
    assert on_tcp.peek(7 + RING) == (True, None)


def test_acknowledgements_go_around_the_ring_with_the_verdicts():
    """The store's host waits for the others' acknowledgements of a failure (wait_read): one
    lap later the same keys serve, and an acknowledgement of the call a lap earlier does not count."""
    from esper_gate._verdict import RING, Verdict

    store = dist.HashStore()
    host = Verdict(lambda request: request(store), rank=0, sleep=lambda s: None)
    peer = Verdict(lambda request: request(store), rank=1)
    host.failed(3, esper_gate.GateError("lap 0"))
    assert host.wait_read(3, [1], 0.05) == [1], "not read yet"
    assert peer.peek(3)[0] and host.wait_read(3, [1], 0.05) == []
    late = 3 + RING
    host.failed(late, esper_gate.GateError("lap 1"))
    assert host.wait_read(late, [1], 0.05) == [1], "rank 1 acknowledged call 3, not this one"
    assert str(peer.state(late)[1]) == "lap 1"
    assert host.wait_read(late, [1], 0.05) == []
    # the ring bounds the keys: one per rank and slot of the ring, whatever the call number
    assert store.check(["ack/3/1"]) and not store.check([f"ack/{late}/1"])
    assert store.get("ack/3/1") == str(late).encode()
    # a rank that acknowledges nothing (no rank given) writes no key
    keys = store.num_keys()
    assert Verdict(lambda request: request(store)).state(late)[0] == "failed" and store.num_keys() == keys


def test_waiting_for_a_final_verdict_returns_at_once_when_nothing_was_claimed_or_the_store_is_gone():
    from esper_gate._verdict import Verdict

    store, slept = dist.HashStore(), []
    mine = Verdict(lambda request: request(store), rank=0, sleep=slept.append)
    t0 = time.monotonic()
    assert mine.wait_final(4, bound_s=2) is None and slept == [], "undecided: nothing to wait for"

    def dead(request):
        raise ConnectionError("Connection reset by peer")

    assert Verdict(dead, rank=0, sleep=slept.append).wait_final(4, bound_s=2) is None and slept == []
    assert time.monotonic() - t0 < 5
    # claimed by a peer: waits for its diagnosis and returns it
    peer = Verdict(lambda request: request(store), rank=1)
    assert peer.claim(6)[0] == "failing"
    waiting = Verdict(lambda request: request(store), rank=2)
    threading.Timer(0.2, lambda: peer.failed(6, esper_gate.GateError("rank 3 did not arrive"))).start()
    t0 = time.monotonic()
    assert str(waiting.wait_final(6, bound_s=30)) == "rank 3 did not arrive"
    assert 0.15 < time.monotonic() - t0 < 10
    # claimed and never diagnosed: None once the bound passed
    peer.claim(7)
    t0 = time.monotonic()
    assert waiting.wait_final(7, bound_s=0.3) is None and 0.3 <= time.monotonic() - t0 < 10


class _CountingStore:
    """The gate's store, counting the requests made to it."""

    def __init__(self):
        self.store, self.requests = dist.HashStore(), []

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def counted(*args):
            self.requests.append(name)
            return method(*args)
        return counted


def test_a_fresh_call_is_decided_in_one_request_and_its_verdict_read_in_two():
    from esper_gate._verdict import Verdict

    counting = _CountingStore()
    mine = Verdict(lambda request: request(counting), rank=0)
    assert mine.completed(1) is None and counting.requests == ["compare_set"]
    counting.requests.clear()
    assert mine.state(1) == ("ok", None) and counting.requests == ["check", "get"]


def test_a_rank_that_learns_a_failure_by_deciding_acknowledges_it_and_an_ok_is_not_acknowledged():
    from esper_gate._verdict import Verdict

    store = dist.HashStore()
    mine = Verdict(lambda request: request(store), rank=0)
    peer = Verdict(lambda request: request(store), rank=1)
    third = Verdict(lambda request: request(store), rank=2)
    assert mine.completed(1) is None and peer.completed(1) is None
    assert not store.check(["ack/1/0"]) and not store.check(["ack/1/1"])
    mine.failed(2, esper_gate.GateError("rank 3 did not arrive"))
    assert str(peer.completed(2)) == "rank 3 did not arrive"             # its collective completed: adopts
    assert str(third.failed(2, esper_gate.GateError("another story"))) == "rank 3 did not arrive"
    assert [store.get(f"ack/2/{r}") for r in range(3)] == [b"2"] * 3
    # a claim (FAILING) is not a failure to acknowledge yet
    assert peer.claim(3) == ("failing", None) and not store.check(["ack/3/1"])
    kind, failure = mine.claim(2)   # a claim after the diagnosis adopts it
    assert kind == "failed" and str(failure) == "rank 3 did not arrive"


def test_a_confirmed_call_that_this_rank_already_failed_raises_without_asking_the_store():
    from esper_gate._verdict import Verdict

    counting = _CountingStore()
    verdict = Verdict(lambda request: request(counting), rank=0)
    latch = FailureLatch()
    latch.record(5, esper_gate.GateError("the watcher's verdict"))
    for seq in (5, 6):
        with pytest.raises(esper_gate.GateError, match="the watcher's verdict"):
            verdict.confirm(seq, latch)
    assert counting.requests == []
    verdict.confirm(4, latch)   # an earlier call stands
    assert counting.requests == ["compare_set"]


def test_a_completed_call_that_a_peer_claimed_but_never_diagnosed_fails_with_a_text_of_its_own(monkeypatch):
    from esper_gate import _verdict
    from esper_gate._verdict import FINAL_WAIT_S, Verdict

    class Clock:   # a clock that moves only when the verdict sleeps
        now = 1000.0

        @classmethod
        def monotonic(cls):
            return cls.now

    slept = []

    def sleep(s):
        slept.append(s)
        Clock.now += s

    monkeypatch.setattr(_verdict, "time", Clock)
    store = dist.HashStore()
    Verdict(lambda request: request(store), rank=1).claim(9)
    err = Verdict(lambda request: request(store), rank=0, sleep=sleep).completed(9)
    assert type(err) is esper_gate.GateError and str(err) == (
        "esper_gate call 9 was failed by a rank whose deadline passed, and its diagnosis did not arrive; no rank "
        "applied a transition for this call")
    assert set(slept) == {_verdict._POLL_S} and FINAL_WAIT_S <= sum(slept) < FINAL_WAIT_S + 0.1


def test_the_exit_hook_cuts_a_diagnosis_short_and_waits_for_its_last_store_requests():
    # A launcher's SIGTERM often lands while a failure is being diagnosed. A diagnosis
    # thread still in a store request when the interpreter finalizes ends in
    # pthread_exit through a noexcept destructor: SIGABRT (the watcher's own case, in
    # gate_sync._stop_watchers_at_exit's note). The exit hook stops its waits and joins it.
    from esper_gate import gate_sync

    started, finished = threading.Event(), threading.Event()

    def diagnose(call):
        started.set()
        watcher.pause(30)   # waiting for heartbeats to settle
        time.sleep(0.3)     # then its last store requests
        finished.set()

    watcher = Watcher(DictStore(), 0, diagnose)

    class _Gate:
        _watcher = watcher

    gate = _Gate()
    gate_sync._live.add(gate)
    try:
        watcher.begin(1, time.monotonic() - 1)   # already past its deadline
        assert started.wait(5)
        t0 = time.monotonic()
        gate_sync._stop_watchers_at_exit()
        assert finished.is_set() and not any(t.is_alive() for t in watcher.failure_threads)
        assert time.monotonic() - t0 < 3
    finally:
        gate_sync._live.discard(gate)
        watcher.close()


# ---- the gate's group ---------------------------------------------------------------

def _gloo_plugin(extended):
    """A backend registered the way third-party ones are, serving the gate's group with gloo."""
    name = f"gloo_plugin_{int(extended)}"
    if name.upper() not in dist.Backend._plugins:
        if extended:
            def create(opts, _backend_options):
                return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, opts.timeout)
        else:
            def create(store, rank, size, timeout):
                return dist.ProcessGroupGloo(store, rank, size, timeout)
        dist.Backend.register_backend(name, create, extended_api=extended, devices=["cpu"])
    return name


@pytest.mark.parametrize("backend", ["gloo", "plugin", "extended_plugin"])
def test_a_gates_group_is_found_by_the_op_and_leaves_c10ds_own_state_alone(one_rank_group, backend):
    import torch.distributed.distributed_c10d as c10d

    from esper_gate._group import free_gate_group, new_gate_group

    if backend != "gloo":
        backend = _gloo_plugin(backend == "extended_plugin")
    count, names = c10d._world.group_count, dict(c10d._world.pg_names)
    name = f"esper_gate.test.{backend}"
    group = new_gate_group([0], backend, CPU, datetime.timedelta(seconds=10), name)
    assert group.group_name == name and (group.rank(), group.size()) == (0, 1)
    # c10d names and counts its groups as if the gate's did not exist
    assert (c10d._world.group_count, dict(c10d._world.pg_names)) == (count, names)
    assert dist.new_group([0]).group_name == str(count)
    votes, stages, targets = torch.tensor([True, False]), torch.tensor([3, 3]), torch.tensor([4, 4])
    decision, _ = esper_gate.sync(votes, stages, targets, 1, 7, "unanimous", name)
    assert decision.tolist() == [True, False]
    free_gate_group(group)
    with pytest.raises(ValueError, match=f"unknown process group name '{name}'"):
        esper_gate.sync(votes, stages, targets, 2, 7, "unanimous", name)
    # the name is free again: freeing forgot it
    again = new_gate_group([0], backend, CPU, datetime.timedelta(seconds=10), name)
    free_gate_group(again)


def test_a_backend_the_gates_group_cannot_use_is_refused_by_name():
    from esper_gate._group import check_group_backend

    with pytest.raises(esper_gate.GateInputError, match="backend 'mpi'.*register_backend"):
        check_group_backend("mpi", CPU)
    with pytest.raises(esper_gate.GateInputError, match="on cpu would use backend 'nccl'"):
        check_group_backend("nccl", CPU)
    check_group_backend("cpu:gloo,cuda:nccl", CPU)
