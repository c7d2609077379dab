"""Property tests: W simulated ranks packed by the real kernels, summed as the
all_reduce would, decoded from several ranks' views, and compared with the
pure-Python reference and with what each view must report.

The default profile (CI) is short and runs a fixed seed, printed at the start
of the run; ESPER_GATE_SEED=N reruns any seed. ESPER_GATE_LONG=1 runs the long
profile (10,000 cases, S <= 256) from a fresh random seed, printed the same way.
"""
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import esper_gate
from esper_gate import wire
from reference import RankInput, carries_slot_state, expected
from esper_gate.report import parse_report
from simulate import decode_view, pack_rank, reduce_all, simulate

LONG = os.environ.get("ESPER_GATE_LONG") == "1"
SEED = int(os.environ.get("ESPER_GATE_SEED") or (random.SystemRandom().randrange(2**32) if LONG else 20261129))
settings.register_profile("ci", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("long" if LONG else "ci")

# The long profile runs for hours; the suite-wide pytest-timeout is sized for CI.
pytestmark = [pytest.mark.timeout(12 * 3600)] if LONG else []

MAX_W = 16
MAX_S = 256 if LONG else 64
# Worlds at every layout boundary: counter widths change at powers of two,
# lanes (the exact per-rank report) stop after 64 ranks, 1024 and 1025 straddle
# the old 11-bit world field, 65,536 is the limit.
EDGE_WORLDS = (17, 63, 64, 65, 127, 128, 1023, 1024, 1025, 65536)
assert max(EDGE_WORLDS) == wire.MAX_WORLD
# One case at 65,536 ranks costs seconds (65,536 packs plus the Python
# reference), so the CI profile draws up to 1025 at random and leaves the
# limit to the explicit cases below and to tests/test_wire.py's scale
# simulation; the long profile draws every edge.
DRAWN_EDGE_WORLDS = EDGE_WORLDS if LONG else tuple(w for w in EDGE_WORLDS if w <= 1025)


@pytest.fixture(scope="module", autouse=True)
def _print_seed(request):
    line = f"test_properties: hypothesis seed {SEED} (profile {'long' if LONG else 'ci'}; " \
           f"ESPER_GATE_SEED={SEED} reruns it)"
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def _slots_for(world: int, max_slots: int) -> int:
    # Simulating W ranks costs W packs per case: keep S small for large W so
    # the CI profile stays short on two cores.
    if world <= MAX_W:
        return max_slots
    return min(max_slots, 16 if world <= 128 else 4)


def _voters(rng: random.Random, world: int, count: int) -> set:
    return set(rng.sample(range(world), max(0, min(world, count))))


@st.composite
def scenarios(draw, max_world=MAX_W, max_slots=MAX_S, edge_worlds=DRAWN_EDGE_WORLDS):
    world = draw(st.one_of(st.integers(1, max_world), st.sampled_from(edge_worlds))
                 if edge_worlds else st.integers(1, max_world))
    slots = draw(st.integers(1, _slots_for(world, max_slots)))
    policy = draw(st.sampled_from(wire.POLICIES))
    # "edges": every slot's yes-count sits on a policy boundary, W/2 (a tie
    # under majority when W is even) and W/2 + 1 among them.
    vote_plan = draw(st.sampled_from(["bias", "edges"]))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    seq = rng.randrange(0, 2**40)
    site = rng.randrange(0, 2**32)
    # a shared state that ranks start from, then independent perturbations
    stages = [rng.randrange(0, 64) for _ in range(slots)]
    targets = [rng.choice([0, 1, 2, 3, 5, wire.NO_GATE, rng.randrange(0, 64)]) for _ in range(slots)]
    # per-slot state: none (the call's policy, digest 0), policies, digests or both
    slot_state = draw(st.sampled_from(["none", "policies", "digests", "both"]))
    slot_policies = [rng.choice(wire.POLICIES) for _ in range(slots)] \
        if slot_state in ("policies", "both") else None
    slot_digests = [rng.choice([0, 1, wire.MAX_DIGEST, rng.randrange(0, 2**32)]) for _ in range(slots)] \
        if slot_state in ("digests", "both") else None
    if vote_plan == "bias":
        vote_bias = rng.random()
        votes = [[1 if rng.random() < vote_bias else 0 for _ in range(slots)] for _r in range(world)]
    else:
        votes = [[0] * slots for _r in range(world)]
        for s in range(slots):
            count = rng.choice([world // 2, world // 2 + 1, world // 2, world // 2 + 1,
                                (world + 1) // 2, world - 1, world, 0, 1])
            for r in _voters(rng, world, count):
                votes[r][s] = 1
    inputs = [RankInput(votes=votes[r], stages=list(stages), targets=list(targets), seq=seq, site=site,
                        policy=policy, policies=None if slot_policies is None else list(slot_policies),
                        digests=None if slot_digests is None else list(slot_digests)) for r in range(world)]
    kinds = draw(st.lists(st.sampled_from(
        ["stage", "target", "seq", "site", "policy", "slots", "poison_value", "poison_caller", "no_gate",
         "slot_policy", "digest", "none"]),
        max_size=3))
    for kind in kinds:
        r = rng.randrange(world)
        inp = inputs[r]
        s = rng.randrange(len(inp.votes))
        if kind == "stage":
            inp.stages[s] = rng.randrange(0, 64)
        elif kind == "target":
            inp.targets[s] = rng.randrange(0, 64)
        elif kind == "no_gate":  # this rank has no gate where the others may
            inp.targets[s] = wire.NO_GATE
        elif kind == "slot_policy":  # this rank holds another policy for the slot
            inp.policies = [inp.slot_policy(k) for k in range(len(inp.votes))]
            inp.policies[s] = rng.choice(wire.POLICIES)
        elif kind == "digest":  # this rank holds another state digest in the slot
            inp.digests = [inp.slot_digest(k) for k in range(len(inp.votes))]
            inp.digests[s] ^= 1 << rng.randrange(32)
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
            if inp.policies is not None:
                inp.policies = (inp.policies + ["any"] * n)[:n]
            if inp.digests is not None:
                inp.digests = (inp.digests + [7] * n)[:n]
        elif kind == "poison_value":
            which = rng.choice(["stage", "target", "vote", "site", "policy", "digest"])
            if which == "stage":
                inp.stages[s] = rng.choice([-1, 64, 1000])
            elif which == "target":
                inp.targets[s] = rng.choice([-5, 64, 99])
            elif which == "vote":
                inp.votes[s] = rng.choice([2, -1, 7])
            elif which == "policy":  # a code outside 0..3
                inp.policies = [inp.slot_policy(k) for k in range(len(inp.votes))]
                inp.policies[s] = rng.choice([-1, 4, 99])
            elif which == "digest":
                inp.digests = [inp.slot_digest(k) for k in range(len(inp.votes))]
                inp.digests[s] = rng.choice([-1, 2**32, 2**40])
            else:
                inp.site = rng.choice([-1, 2**32, 2**40])
        elif kind == "poison_caller":
            inp.poison = rng.randrange(16, 32)
    view = rng.randrange(world)
    return inputs, view


def _views(world: int, drawn: int) -> list[int]:
    """Rank 0, the last rank, the drawn one and the ranks at the lane boundary."""
    return sorted({0, world - 1, drawn} | {r for r in (63, 64, 65) if r < world})


# ---- what a view must report, from the inputs' meaning ---------------------

def _reason(inp: RankInput) -> int:
    """The reason code a rank sends: the caller's, else its first bad value."""
    if inp.poison:
        return inp.poison
    if not 0 <= inp.site <= 0xFFFFFFFF:
        return wire.REASON_SITE
    for k, (v, s, t) in enumerate(zip(inp.votes, inp.stages, inp.targets)):
        if int(v) not in (0, 1):
            return wire.REASON_VOTE
        if not 0 <= s <= wire.MAX_ID:
            return wire.REASON_STAGE
        if not 0 <= t <= wire.MAX_ID:
            return wire.REASON_TARGET
        if not 0 <= inp.slot_policy(k) <= 3:
            return wire.REASON_POLICY
        if not 0 <= inp.slot_digest(k) < 2**32:
            return wire.REASON_DIGEST
    return wire.REASON_NONE


def _slot_key(inp: RankInput, s: int, slot_state: bool) -> tuple[int, int, int, int, int]:
    """(vote, stage, target, policy code, digest) as the wire carries them."""
    # Without the slot state every slot has the rank's call policy and digest 0.
    call_policy = wire.POLICY_CODES[inp.policy]
    # A rank with fewer slots sends zeros for the rest (capacity padding).
    if s >= len(inp.votes):
        return 0, 0, 0, 0 if slot_state else call_policy, 0
    if not slot_state:
        return int(inp.votes[s]) & 1, inp.stages[s] & wire.MAX_ID, inp.targets[s] & wire.MAX_ID, call_policy, 0
    return (int(inp.votes[s]) & 1, inp.stages[s] & wire.MAX_ID, inp.targets[s] & wire.MAX_ID,
            inp.slot_policy(s) & 3, inp.slot_digest(s) & wire.MAX_DIGEST)


def _passes(policy: str | int, votes: list[int]) -> bool:
    policy = wire.POLICIES[policy] if isinstance(policy, int) else policy
    yes, world = sum(votes), len(votes)
    return {"unanimous": yes == world, "rank0": votes[0] == 1, "majority": 2 * yes > world,
            "any": yes >= 1}[policy]


def check_view_report(inputs: list[RankInput], view: int, rep, decision: list[bool]) -> None:
    """parse_report's verdict for rank ``view`` against the inputs' meaning: the
    fields GateConsensus turns into its exception (GateInputError for a
    poisoned rank, GatePeerInputError for its peers, GateDivergenceError for a
    mismatch or a diverged slot)."""
    world, me = len(inputs), inputs[view]
    n, exact = len(me.votes), world <= wire.MAX_EXACT_WORLD
    reasons = {r: _reason(inp) for r, inp in enumerate(inputs)}
    poisoned = [r for r, code in reasons.items() if code]
    wire_values = {
        "seq": [inp.seq & wire.header_field_mask("seq") for inp in inputs],
        "site": [inp.site & wire.header_field_mask("site") for inp in inputs],
        "policy": [wire.POLICY_CODES[inp.policy] for inp in inputs],
        "slots": [len(inp.votes) & wire.header_field_mask("slots") for inp in inputs],
        "world": [(inp.world if inp.world is not None else world) & wire.header_field_mask("world")
                  for inp in inputs],
    }
    ours = {"policy": wire.POLICY_CODES[me.policy], "slots": n, "world": world}
    mismatches = [name for name, values in wire_values.items()
                  if len(set(values)) > 1 or (name in ours and values[0] != ours[name])]
    header_ok = not poisoned and not mismatches

    assert rep.world == world and rep.num_slots == n and rep.exact == exact
    assert rep.call == wire_values["seq"][0]
    assert not rep.corrupt, "a sum of valid buffers is never corrupt"
    assert rep.mismatches == mismatches
    assert rep.poisoned_count == len(poisoned)
    # Without lanes the wire names a poisoned rank only when it is the only one.
    assert rep.poisoned_ranks == (poisoned if exact or len(poisoned) == 1 else [])
    if exact:
        assert rep.poison_reasons == {r: wire.REASON_TEXT.get(reasons[r] & 31, f"reason code {reasons[r] & 31}")
                                      for r in poisoned}
        assert [(rc.rank, rc.poisoned, rc.reason) for rc in rep.rank_calls] == [
            (r, bool(reasons[r]), reasons[r] & 31) for r in range(world)]
    else:
        # Without lanes a lone poisoned rank's reason is the OR of every rank's reason field.
        lone = {poisoned[0]: wire.REASON_TEXT.get(reasons[poisoned[0]] & 31, f"reason code {reasons[poisoned[0]] & 31}")
                } if len(poisoned) == 1 else {}
        assert rep.rank_calls == [] and rep.poison_reasons == lone
    # Every view counts every poisoned rank under its reason, at every world size.
    counts: dict[str, int] = {}
    for r in poisoned:
        text = wire.REASON_TEXT.get(reasons[r] & 31, f"reason code {reasons[r] & 31}")
        counts[text] = counts.get(text, 0) + 1
    assert rep.reason_counts == counts
    assert rep.header_ok == header_ok

    slot_state = carries_slot_state(inputs)
    assert rep.slot_state == slot_state
    keys = [[_slot_key(inp, s, slot_state) for inp in inputs] for s in range(n)]
    differing = [s for s in range(n) if len({k[1:] for k in keys[s]}) > 1]
    assert [d.slot for d in rep.diverged_slots] == differing
    for d in rep.diverged_slots:
        k = keys[d.slot]
        stages, targets = [x[1] for x in k], [x[2] for x in k]
        assert d.stage_differs == (len(set(stages)) > 1)
        assert d.target_differs == (len(set(targets)) > 1)
        assert (d.rank0_stage, d.rank0_target) == (stages[0], targets[0])
        assert d.stage_range == (min_and(stages), max_or(stages))
        assert d.target_range == (min_and(targets), max_or(targets))
        policies, digests = [x[3] for x in k], [x[4] for x in k]
        assert d.policy_differs == (len(set(policies)) > 1)
        assert d.digest_differs == (len(set(digests)) > 1)
        assert (d.rank0_policy, d.rank0_digest) == (wire.POLICIES[policies[0]], digests[0])
        assert d.digest_range == (min_and(digests, wire.MAX_DIGEST), max_or(digests))
        key_differ = sum(1 for x in k if x[1:] != k[0][1:])
        if exact:
            assert d.ranks_differing == key_differ
            holders = {}
            for r, (vote, stage, target, pol, dig) in enumerate(k):
                holders.setdefault((stage, target, wire.POLICIES[pol], dig), []).append(r)
            assert {(h.stage, h.target, h.policy, h.digest): h.ranks for h in d.holdings} == holders
            assert all(h.votes_passed == [r for r in h.ranks if k[r][0]] for h in d.holdings)
        else:
            assert 1 <= d.ranks_differing <= key_differ
            assert d.holdings == []

    # The slot's own policy decides; a slot where no rank has a gate is never passed.
    no_gate = [all(x[2] == wire.NO_GATE for x in keys[s]) for s in range(n)]
    assert [sv.no_gate for sv in rep.slots] == no_gate
    want = [header_ok and s not in differing and not no_gate[s] and _passes(keys[s][0][3], [x[0] for x in keys[s]])
            for s in range(n)]
    assert decision == want
    assert rep.decided_count == sum(want)
    assert rep.diverged_count == (n if not header_ok else len(differing))
    assert rep.ok == (header_ok and not differing)


def min_and(values, full=wire.MAX_ID):
    out = full
    for v in values:
        out &= v
    return out


def max_or(values):
    out = 0
    for v in values:
        out |= v
    return out


# Draws at the 65,536-rank limit pack every rank and run the Python reference
# for each view, a few seconds each; the whole run takes about 90 s on two
# cores, too close to the suite's 120 s per test.
@pytest.mark.timeout(12 * 3600 if LONG else 600)  # the long profile keeps its own limit
@seed(SEED)
@given(scenarios())
def test_kernels_match_reference(case):
    inputs, drawn = case
    reduced = reduce_all(inputs)
    for view in _views(len(inputs), drawn):
        decision, report = decode_view(reduced, inputs, view)
        exp_decision, exp_report = expected(inputs, view=view)
        assert decision == exp_decision, f"view of rank {view}"
        assert report == exp_report, f"view of rank {view}"
        check_view_report(inputs, view, parse_report(report), decision)


@seed(SEED)
@settings(max_examples=25 if not LONG else 300, deadline=None)
@given(scenarios(max_world=8, max_slots=16, edge_worlds=()), st.integers(65, 200))
def test_large_worlds_summaries_match_reference(case, world):
    """Above 64 ranks there are no lanes; the report carries bounds instead."""
    inputs, _ = case
    rng = random.Random(world)
    # replicate the scenario's ranks up to `world` ranks
    big = [RankInput(list(i.votes), list(i.stages), list(i.targets), i.seq, i.site, i.policy, i.poison,
                     policies=None if i.policies is None else list(i.policies),
                     digests=None if i.digests is None else list(i.digests))
           for i in (inputs[k % len(inputs)] for k in range(world))]
    if rng.random() < 0.5:
        big[rng.randrange(world)].stages[0] ^= 1 + rng.randrange(63)
    if rng.random() < 0.5:
        r = big[rng.randrange(world)]
        r.digests = [r.slot_digest(k) ^ (1 << rng.randrange(32)) for k in range(len(r.votes))]
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


def _slow_at_the_limit(world):
    # 65,536 packs plus the Python reference cost seconds a case: CI's long step runs them
    return pytest.param(world, marks=pytest.mark.slow) if world == wire.MAX_WORLD else world


@pytest.mark.parametrize("world", [_slow_at_the_limit(w) for w in (2, 3, 16) + EDGE_WORLDS])
def test_majority_at_half_and_half_plus_one(world):
    """W/2 yes votes is a tie (fails) when W is even and a minority when odd;
    W/2 + 1 always passes. Read from both sides of the lane boundary."""
    rng = random.Random(world)
    half, plus = _voters(rng, world, world // 2), _voters(rng, world, world // 2 + 1)
    inputs = [RankInput([int(r in half), int(r in plus)], [3, 4], [2, 2], seq=9, site=77, policy="majority")
              for r in range(world)]
    reduced = reduce_all(inputs)
    for view in _views(world, world // 2):
        decision, report = decode_view(reduced, inputs, view)
        assert decision == [False, True], f"view of rank {view}"
        assert (decision, report) == expected(inputs, view=view)
        rep = parse_report(report)
        assert rep.ok and rep.decided_count == 1
        check_view_report(inputs, view, rep, decision)


@pytest.mark.parametrize("world, bad", [
    (64, (3, 63)), (65, (3, 64)), (128, (0, 127)), (1024, (3, 1023)), (1024, (700,)), (65, (64,)),
    pytest.param(65536, (3, 65535), marks=pytest.mark.slow), pytest.param(65536, (40000,), marks=pytest.mark.slow)])
def test_poisoned_ranks_reported_alike_from_every_view(world, bad):
    """Up to 64 ranks the lanes name every poisoned rank and its reason. Past
    64 the wire names one only when it is alone, so two poisoned ranks come
    back as poisoned_count 2 with no rank named but each reason counted, on
    the poisoned ranks' own views as well as on their peers'."""
    inputs = [RankInput([1, 0], [3, 3], [2, 2], seq=5, site=11, policy="any") for _ in range(world)]
    inputs[bad[0]].stages[1] = 64          # a bad value: REASON_STAGE
    if len(bad) > 1:
        inputs[bad[1]].poison = 17         # the caller's own code
    reduced = reduce_all(inputs)
    named = list(bad) if world <= wire.MAX_EXACT_WORLD or len(bad) == 1 else []
    for view in sorted(set(_views(world, bad[0])) | set(bad)):
        decision, report = decode_view(reduced, inputs, view)
        assert (decision, report) == expected(inputs, view=view)
        rep = parse_report(report)
        assert decision == [False, False] and not rep.header_ok and not rep.ok
        assert rep.poisoned_count == len(bad)
        assert rep.poisoned_ranks == named, f"view of rank {view}"
        check_view_report(inputs, view, rep, decision)


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
    bufs = sum(pack_rank(inp, r, 3) for r, inp in enumerate(inputs))
    decision, report = esper_gate.decode(bufs, 2, 3, "any")
    assert not decision.any()
    assert report[wire.G_FLAGS] & wire.FLAG_POLICY_MISMATCH


@pytest.mark.parametrize("world", [_slow_at_the_limit(w) for w in (2, 3, 64, 65, 1024, wire.MAX_WORLD)])
def test_no_gate_slot_policies_and_digests_from_every_view(world):
    """Slot 0: no gate anywhere (never passed, not diverged). Slot 1: the last
    rank has no gate where the others are at G0 (diverged on every rank, also
    the one without a gate). Slot 2: rank0 policy in the slot under a
    unanimous call, only rank 0 votes yes (passed). Slot 3: the last rank's
    digest differs (diverged, the digests named exactly up to 64 ranks).
    Slot 4: the last rank holds another policy (diverged)."""
    last = world - 1
    inputs = []
    for r in range(world):
        inputs.append(RankInput([1, 1, int(r == 0), 1, 1], [9, 2, 3, 4, 6], [wire.NO_GATE, 0, 2, 3, 5], seq=3,
                                site=5, policies=["unanimous", "unanimous", "rank0", "any", "majority"],
                                digests=[0, 0, 0, 0xC0FFEE, 0]))
    inputs[last].targets[1] = wire.NO_GATE
    inputs[last].digests[3] = 0xC0FFEF
    inputs[last].policies[4] = "any"
    reduced = reduce_all(inputs)
    for view in sorted({0, last, world // 2}):
        decision, report = decode_view(reduced, inputs, view)
        assert (decision, report) == expected(inputs, view=view), f"view of rank {view}"
        assert decision == [False, False, True, False, False]
        rep = parse_report(report)
        check_view_report(inputs, view, rep, decision)
        assert [sv.no_gate for sv in rep.slots] == [True, False, False, False, False]
        assert [sv.diverged for sv in rep.slots] == [False, True, False, True, True]
        assert [d.slot for d in rep.diverged_slots] == [1, 3, 4]
        no_gate, digest, policy = rep.diverged_slots
        if world <= wire.MAX_EXACT_WORLD:
            others = "rank 0" if last == 1 else f"ranks 0-{last - 1}"
            assert no_gate.holdings_text() == f"{others} {'holds' if last == 1 else 'hold'} stage 2 -> target 0; " \
                                              f"rank {last} holds stage 2 -> no gate"
            assert f"rank {last} holds stage 4 -> target 3 with digest 0x00c0ffef" in digest.holdings_text()
            assert f"rank {last} holds stage 6 -> target 5 under any" in policy.holdings_text()
        else:
            assert digest.ranks_differing == 1 and digest.digest_range == (0xC0FFEE, 0xC0FFEF)
            assert "digests share bits 0x00c0ffee and use no bits outside 0x00c0ffef" in digest.holdings_text()
