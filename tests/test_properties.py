"""Property tests: W simulated ranks packed by the real kernels, summed as the
all_reduce would, decoded, and compared with the pure-Python reference.

The default profile is short (CI). ESPER_GATE_LONG=1 runs the long profile
(10,000 cases over W <= 16, S <= 256).
"""
import os
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esper_gate
from esper_gate import wire
from reference import RankInput, expected
from simulate import simulate

LONG = os.environ.get("ESPER_GATE_LONG") == "1"
settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("long" if LONG else "ci")

MAX_W = 16
MAX_S = 256 if LONG else 64


@st.composite
def scenarios(draw, max_world=MAX_W, max_slots=MAX_S):
    world = draw(st.integers(1, max_world))
    slots = draw(st.integers(1, max_slots))
    policy = draw(st.sampled_from(wire.POLICIES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    seq = rng.randrange(0, 2**40)
    site = rng.randrange(0, 2**32)
    # a shared state that ranks start from, then independent perturbations
    stages = [rng.randrange(0, 64) for _ in range(slots)]
    targets = [rng.choice([0, 1, 2, 3, 5, rng.randrange(0, 64)]) for _ in range(slots)]
    vote_bias = rng.random()
    inputs = []
    for _r in range(world):
        inputs.append(RankInput(
            votes=[1 if rng.random() < vote_bias else 0 for _ in range(slots)],
            stages=list(stages), targets=list(targets), seq=seq, site=site, policy=policy))
    kinds = draw(st.lists(st.sampled_from(
        ["stage", "target", "seq", "site", "policy", "slots", "poison_value", "poison_caller", "none"]),
        max_size=3))
    for kind in kinds:
        r = rng.randrange(world)
        inp = inputs[r]
        s = rng.randrange(len(inp.votes))
        if kind == "stage":
            inp.stages[s] = rng.randrange(0, 64)
        elif kind == "target":
            inp.targets[s] = rng.randrange(0, 64)
        elif kind == "seq":
            inp.seq += rng.choice([1, -1, 2**32])  # 2**32 wraps to the same wire value
        elif kind == "site":
            inp.site = rng.randrange(0, 2**32)
        elif kind == "policy":
            inp.policy = rng.choice(wire.POLICIES)
        elif kind == "slots":
            # a different slot count within the same capacity (a different
            # capacity means a different buffer size, which GateSync rejects
            # before any collective)
            cap = wire.capacity_for(slots)
            n = rng.randrange(cap // 2 + 1, cap + 1) if cap > 1 else 1
            inp.votes = (inp.votes + [1] * n)[:n]
            inp.stages = (inp.stages + [3] * n)[:n]
            inp.targets = (inp.targets + [2] * n)[:n]
        elif kind == "poison_value":
            which = rng.choice(["stage", "target", "vote", "site"])
            if which == "stage":
                inp.stages[s] = rng.choice([-1, 64, 1000])
            elif which == "target":
                inp.targets[s] = rng.choice([-5, 64, 99])
            elif which == "vote":
                inp.votes[s] = rng.choice([2, -1, 7])
            else:
                inp.site = rng.choice([-1, 2**32, 2**40])
        elif kind == "poison_caller":
            inp.poison = rng.randrange(16, 32)
    view = rng.randrange(world)
    return inputs, view


@given(scenarios())
def test_kernels_match_reference(case):
    inputs, view = case
    decision, report, _ = simulate(inputs, view=view)
    exp_decision, exp_report = expected(inputs, view=view)
    assert decision == exp_decision
    assert report == exp_report


@settings(max_examples=25 if not LONG else 300, deadline=None)
@given(scenarios(max_world=8, max_slots=16), st.integers(65, 200))
def test_large_worlds_summaries_match_reference(case, world):
    """Above 64 ranks there are no lanes; the report carries bounds instead."""
    inputs, _ = case
    rng = random.Random(world)
    # replicate the scenario's ranks up to `world` ranks
    big = [RankInput(list(i.votes), list(i.stages), list(i.targets), i.seq, i.site, i.policy, i.poison)
           for i in (inputs[k % len(inputs)] for k in range(world))]
    if rng.random() < 0.5:
        big[rng.randrange(world)].stages[0] ^= 1 + rng.randrange(63)
    decision, report, _ = simulate(big, view=0)
    exp_decision, exp_report = expected(big, view=0)
    assert decision == exp_decision
    assert report == exp_report


def test_all_policies_on_a_split_vote():
    # 3 of 5 ranks pass: unanimous fails, majority and any pass, rank0 follows rank 0
    for policy, want in [("unanimous", False), ("majority", True), ("any", True), ("rank0", False)]:
        inputs = [RankInput([v], [3], [2], policy=policy) for v in (0, 1, 1, 1, 0)]
        decision, report, _ = simulate(inputs)
        assert decision == [want], policy
        assert (decision, report) == expected(inputs)


def test_majority_tie_fails():
    inputs = [RankInput([v], [3], [2], policy="majority") for v in (1, 1, 0, 0)]
    assert simulate(inputs)[0] == [False]


def test_decoding_random_buffers_never_crashes():
    """The decoder trusts nothing from the wire: any int64 words decode safely."""
    gen = torch.Generator().manual_seed(1234)
    for world in (1, 2, 3, 64, 65, 300):
        for slots in (1, 5, 64):
            n = wire.buffer_words(slots, world)
            for _ in range(20):
                buf = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=gen)
                decision, report = esper_gate.decode(buf, slots, world, "any")
                assert report[wire.G_FLAGS] & wire.FLAG_HEADER_OK == 0
                assert not decision.any()
                small = torch.randint(0, 4, (n,), dtype=torch.int64, generator=gen)
                decision, report = esper_gate.decode(small, slots, world, "any")
                assert report.shape == (wire.report_words(slots, world),)


def test_decoding_with_another_policy_than_packed_is_a_mismatch():
    inputs = [RankInput([1, 0], [3, 3], [2, 2], policy="unanimous") for _ in range(3)]
    bufs = sum(__import__("simulate").pack_rank(inp, r, 3) for r, inp in enumerate(inputs))
    decision, report = esper_gate.decode(bufs, 2, 3, "any")
    assert not decision.any()
    assert report[wire.G_FLAGS] & wire.FLAG_POLICY_MISMATCH
