"""esper_gate.kasmina, the drop-in for Esper's slot.py, with stand-ins for Esper's
classes built from the fields the adapter reads (Esper itself is never imported)."""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field

import pytest

from esper_gate.esper import GateLevel, SeedStage
from esper_gate._spawn import spawn_ranks, values

TIMEOUT_S = 2.0


# ---- stand-ins for Esper's SeedState, SeedSlot, GateResult (its enums are esper_gate.esper's) ----

ACTIVE_STAGES = {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING}


@dataclass
class SeedState:
    stage: SeedStage


@dataclass
class SeedSlot:
    slot_id: str
    state: SeedState | None = None

    @property
    def is_active(self) -> bool:
        return self.state is not None and self.state.stage in ACTIVE_STAGES


@dataclass
class GateResult:
    gate: GateLevel
    passed: bool
    score: float = 0.0
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    message: str = ""
    timestamp: datetime.datetime = field(default_factory=datetime.datetime.now)


def slot_at(slot_id: str, stage: SeedStage | None) -> SeedSlot:
    return SeedSlot(slot_id, None if stage is None else SeedState(stage))


def gate(level: GateLevel, passed: bool, message: str = "local checks") -> GateResult:
    return GateResult(level, passed, score=0.9 if passed else 0.1,
                      checks_passed=["loss_improved"] if passed else [],
                      checks_failed=[] if passed else ["loss_flat"], message=message)


def as_dict(result: GateResult | None) -> dict | None:
    """What a rank sends back to the test (a plain dict pickles everywhere)."""
    if result is None:
        return None
    out = dataclasses.asdict(result)
    out["type"] = type(result).__name__
    out["gate"] = int(result.gate)
    return out


# ---- one process, no process group ---------------------------------------------------------

def test_without_a_process_group_returns_the_same_objects():
    import torch.distributed as dist

    from esper_gate import kasmina

    assert not dist.is_initialized()
    slot = slot_at("r0c0", SeedStage.TRAINING)
    result = gate(GateLevel.G2, True)
    assert kasmina.sync_gate_decision(slot, result) is result
    results = [result, None, gate(GateLevel.G1, False)]
    slots = [slot, slot_at("r0c1", None), slot_at("r0c2", SeedStage.GERMINATED)]
    out = kasmina.sync_gate_decisions(slots, results)
    assert len(out) == 3 and all(a is b for a, b in zip(out, results))
    # the round decides locally: each gate result stands as it is
    rounds = kasmina.gate_round(slots, results, names=["e/a", "e/b", "e/c"], policies=["rank0", None, None],
                                digests=[1, None, 2])
    assert rounds == [kasmina.RoundOutcome("e/a", 2, True, False, None, result),
                      kasmina.RoundOutcome("e/b", None, False, False, None, None),
                      kasmina.RoundOutcome("e/c", 1, False, False, None, results[2])]
    assert rounds[0].gate_result is result
    with pytest.raises(dataclasses.FrozenInstanceError):
        rounds[0].passed = False


def test_round_arguments_are_checked_before_any_collective():
    from esper_gate import GateInputError, kasmina

    slots = [slot_at("r0c0", SeedStage.TRAINING), slot_at("r0c1", None)]
    results = [gate(GateLevel.G2, True), None]
    with pytest.raises(GateInputError, match="gate_round: got 2 slots but 1 gate results"):
        kasmina.gate_round(slots, results[:1])
    with pytest.raises(GateInputError, match="gate_round: policies must have 2 entries, got 1"):
        kasmina.gate_round(slots, results, policies=["any"])
    with pytest.raises(GateInputError, match="names must be a sequence of 2 slot names, got the string 'env0/r0c0'"):
        kasmina.gate_round(slots, results, names="env0/r0c0")
    with pytest.raises(GateInputError, match="digests must have 2 entries, got 3"):
        kasmina.gate_round(slots, results, digests=[1, 2, 3])


def test_one_rank_world_returns_the_same_object(one_rank_group):
    from esper_gate import kasmina

    result = gate(GateLevel.G3, False)
    assert kasmina.sync_gate_decision(slot_at("r1c0", SeedStage.BLENDING), result) is result
    assert not kasmina._cache, "a one-rank world builds no GateSync"


def test_timeout_comes_from_the_argument_then_the_environment(monkeypatch):
    from esper_gate import GateInputError, kasmina

    monkeypatch.delenv(kasmina.TIMEOUT_ENV, raising=False)
    assert kasmina._resolve_timeout(None) == datetime.timedelta(seconds=kasmina.DEFAULT_TIMEOUT_S)
    assert kasmina._resolve_timeout(2.5) == datetime.timedelta(seconds=2.5)
    monkeypatch.setenv(kasmina.TIMEOUT_ENV, "7")
    assert kasmina._resolve_timeout(None) == datetime.timedelta(seconds=7)
    monkeypatch.setenv(kasmina.TIMEOUT_ENV, "soon")
    with pytest.raises(GateInputError, match="ESPER_GATE_TIMEOUT must be a positive number of seconds, got 'soon'"):
        kasmina._resolve_timeout(None)


def test_one_cached_gate_sync_per_group_slot_count_and_policy_and_a_new_one_for_a_new_world(monkeypatch):
    from esper_gate import kasmina
    from esper_gate.esper import VOCABULARY

    class FakeGateSync:
        config_error = None

        def __init__(self, num_slots, *, policy, group, timeout, vocabulary):
            self.args = (num_slots, policy, group, timeout, vocabulary)
            self.closed = False

        def close(self):
            self.closed = True

    class Group:  # what the cache reads of a c10d group: its name, which a re-initialized world reuses
        def __init__(self, name):
            self.group_name = name

    monkeypatch.setattr(kasmina, "GateSync", FakeGateSync)
    monkeypatch.setattr(kasmina, "_cache", {})
    monkeypatch.delenv(kasmina.TIMEOUT_ENV, raising=False)
    world = Group("0")
    a = kasmina.cached_gate_sync(4, group=world)
    assert a.args == (4, "unanimous", world, datetime.timedelta(seconds=60), VOCABULARY)
    assert kasmina.cached_gate_sync(4, group=world) is a
    b = kasmina.cached_gate_sync(4, policy="majority", group=world, timeout=5)
    c = kasmina.cached_gate_sync(2, group=world)
    assert b is not a and c is not a and b is not c
    assert b.args[1:4] == ("majority", world, datetime.timedelta(seconds=5)) and c.args[0] == 2
    again = Group("0")
    d = kasmina.cached_gate_sync(4, group=again)
    assert d is not a and d.args[2] is again and a.closed and not (b.closed or c.closed)
    assert kasmina.cached_gate_sync(4, group=again) is d
    kasmina.clear_cache()
    assert b.closed and c.closed and d.closed and kasmina._cache == {}


def test_the_cached_gate_sync_defaults_to_the_world(one_rank_group, monkeypatch):
    import torch.distributed as dist

    from esper_gate import kasmina

    class FakeGateSync:
        config_error = None

        def __init__(self, num_slots, *, policy, group, timeout, vocabulary):
            self.group = group

        def close(self):
            pass

    monkeypatch.setattr(kasmina, "GateSync", FakeGateSync)
    monkeypatch.setattr(kasmina, "_cache", {})
    gs = kasmina.cached_gate_sync(2, timeout=5)
    assert gs.group is dist.group.WORLD and kasmina.cached_gate_sync(2, group=dist.group.WORLD, timeout=5) is gs


def test_esper_names_are_its_stage_and_gate_ids():
    from esper_gate.esper import GATE_NAMES, STAGE_NAMES, VOCABULARY

    assert STAGE_NAMES == {0: "UNKNOWN", 1: "DORMANT", 2: "GERMINATED", 3: "TRAINING", 4: "BLENDING",
                           6: "HOLDING", 7: "FOSSILIZED", 8: "PRUNED", 9: "EMBARGOED", 10: "RESETTING"}
    assert GATE_NAMES == {0: "G0", 1: "G1", 2: "G2", 3: "G3", 5: "G5"}
    assert VOCABULARY.holding(SeedStage.BLENDING, GateLevel.G2) == "BLENDING -> G2"
    assert VOCABULARY.holding(5, 4) == "stage 5 -> target 4", "ids Esper leaves unused print as ids"


def test_above_64_ranks_a_call_mismatch_is_told_from_the_counts():
    from esper_gate import kasmina
    from esper_gate.esper import VOCABULARY
    from esper_gate.report import parse_report
    from reference import RankInput
    from simulate import simulate

    # the last of 70 ranks is one gate call behind, at BLENDING -> G3
    inputs = [RankInput([1], [3], [2], seq=5, site=9) for _ in range(69)] + [RankInput([1], [4], [3], seq=4, site=9)]
    rep = parse_report(simulate(inputs)[1], ["r0c0"], vocabulary=VOCABULARY)
    assert kasmina._call_mismatch_note(rep, 9, ["r0c0"]) == (
        "ddp_divergence: ranks are at different gate calls: call mismatch: rank 0 has 5, at least 1 rank(s) "
        "differ (values share bits 0b100 and use no bits outside 0b101); slot r0c0 (#0): rank 0 holds "
        "TRAINING -> G2; at least 1 rank(s) differ; stages share bits 0b000 and use no bits outside 0b111, "
        "targets share bits 0b10 and use no bits outside 0b11; no rank transitions slot r0c0")


def test_above_64_ranks_a_call_mismatch_note_names_the_first_diverged_slots_and_counts_the_rest():
    from esper_gate import kasmina
    from esper_gate.report import MAX_TEXT_CHARS, MAX_TEXT_SLOTS, parse_report
    from reference import RankInput
    from simulate import simulate

    slots = 1024
    inputs = [RankInput([1] * slots, [3] * slots, [2] * slots, seq=5, site=9) for _ in range(69)]
    inputs.append(RankInput([1] * slots, [4] * slots, [3] * slots, seq=4, site=9))
    ids = [str(s) for s in range(slots)]
    note = kasmina._call_mismatch_note(parse_report(simulate(inputs)[1], ids), 9, ids)
    assert len(note) < MAX_TEXT_CHARS and note.count("; slot ") == MAX_TEXT_SLOTS
    assert f"… and {slots - MAX_TEXT_SLOTS} more diverged slot(s); no rank transitions this layout" in note


# ---- ranks as threads of this process ---------------------------------------------------------
#
# The adapters' logic (votes from slots, notes, outcomes) on W ranks without spawning them:
# each rank is a thread whose GateSync is a stand-in that prepares its inputs as GateSync
# does, packs them with the real op, meets the other threads, and decodes the sum of every
# rank's buffer (what the all_reduce leaves) into a real GateConsensus. Construction, the
# transport and the failure path are GateSync's, tested elsewhere.

class _ThreadGate:
    def __init__(self, world, rank, num_slots, policy):
        self.world, self.rank, self.num_slots, self.policy = world, rank, num_slots, policy
        self.world_size = world.size
        self.slot_names = [str(i) for i in range(num_slots)]
        self.seq = 0

    def __call__(self, votes, stages, targets, *, site=None, names=None, policies=None, digests=None,
                 bad_input=None):
        import torch

        import esper_gate
        from esper_gate import GateInputError
        from esper_gate._inputs import prepare, site_fingerprint, slot_state_defaults
        from esper_gate.consensus import GateConsensus, GateView
        from esper_gate.esper import VOCABULARY

        if names is not None and not isinstance(names, (str, bytes)):
            names = [str(n) for n in names]
        p = prepare(votes, stages, targets, site, num_slots=self.num_slots, device=torch.device("cpu"),
                    default_site=site_fingerprint(self.num_slots, None),
                    call=f"esper_gate call {self.seq + 1} on rank {self.rank}", policies=policies, digests=digests,
                    default_policy=self.policy, names=names, bad_input=bad_input,
                    slot_state=slot_state_defaults(self.num_slots, self.policy, torch.device("cpu")))
        self.seq += 1
        buf = esper_gate.pack(p.votes, p.stages, p.targets, self.seq, p.site, self.policy, self.rank,
                              self.world_size, p.poison, policies=p.policies, digests=p.digests)
        decision, report = esper_gate.decode(self.world.all_reduce(self.rank, buf), self.num_slots,
                                             self.world_size, self.policy)
        view = GateView(self.rank, self.policy, names if names is not None and p.problem is None
                        else self.slot_names, VOCABULARY)
        result = GateConsensus(self.seq, decision, report, gate=view, prepared=p)
        if p.problem is not None:
            raise GateInputError(p.problem)
        return result.raise_if_call_failed()


class _ThreadWorld:
    """``size`` ranks as threads; ``run(fn)`` calls ``fn(rank)`` on each and returns the results."""

    group_name = "threads"

    def __init__(self, size):
        import threading

        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._bufs = [None] * size
        self._local = threading.local()
        self._gates = {}
        self.groups, self.timeouts = [], []   # what the adapters passed on
        self.tamper = None   # a function of the reduced buffer: a corrupt or foreign sum

    def all_reduce(self, rank, buf):
        self._bufs[rank] = buf
        self._barrier.wait()
        total = sum(b.clone() for b in self._bufs)
        self._barrier.wait()  # every rank has summed before any rank's next call overwrites its buffer
        return total if self.tamper is None else self.tamper(total)

    def parent_group(self, group=None):
        self.groups.append(group)
        return self

    def cached_gate_sync(self, num_slots, *, policy="unanimous", group=None, timeout=None):
        assert group is self, "the adapter passes the parent group it resolved"
        self.timeouts.append(timeout)
        rank = self._local.rank
        key = (rank, num_slots, policy)
        if key not in self._gates:
            self._gates[key] = _ThreadGate(self, rank, num_slots, policy)
        return self._gates[key]

    def run(self, fn):
        import threading

        out, errors = [None] * self.size, []

        def main(rank):
            self._local.rank = rank
            try:
                out[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return out


@pytest.fixture
def threads(monkeypatch):
    from esper_gate import kasmina

    world = _ThreadWorld(3)
    monkeypatch.setattr(kasmina, "parent_group", world.parent_group)
    monkeypatch.setattr(kasmina, "cached_gate_sync", world.cached_gate_sync)
    return world


def test_a_slot_without_an_active_seed_votes_no_whatever_its_gate_result_says(threads):
    """Rank 2's slot still holds TRAINING but its seed is no longer active (Esper's
    ``is_active``): its gate result passed, yet it must vote no, so no rank transitions."""
    from esper_gate import kasmina

    class Inactive(SeedSlot):
        @property
        def is_active(self) -> bool:
            return False

    def main(rank):
        slot = (Inactive if rank == 2 else SeedSlot)("r0c0", SeedState(SeedStage.TRAINING))
        results = [gate(GateLevel.G2, True)]
        return (kasmina.gate_round([slot], results)[0],
                kasmina.sync_gate_decisions([slot], results, policy="majority")[0])

    out = threads.run(main)
    for rank, (unanimous, majority) in enumerate(out):
        assert not unanimous.passed and not unanimous.diverged and unanimous.gate == 2 and unanimous.name == "r0c0"
        assert majority.passed, "2 of 3 is a majority"
        if rank == 2:
            assert unanimous.note == "this rank voted no: the slot has no active seed here"
            assert unanimous.gate_result.checks_failed == []
            assert majority.checks_failed == [] and "rank 2 voted no (2 of 3 passed)" in majority.message
        else:
            assert unanimous.note.startswith("ddp_veto: rank 2 voted no (2 of 3 passed, unanimous policy)")
            assert unanimous.gate_result.checks_failed == ["ddp_veto"]
            assert majority.checks_failed == [] and majority.message == "local checks"


# ---- real ranks (gloo) ----------------------------------------------------------------------

def test_a_gate_result_that_is_no_dataclass_is_copied_with_the_outcome_and_left_untouched(threads):
    """Esper's GateResult is a dataclass; any object with its fields works, copied, not edited."""
    from esper_gate import kasmina

    class PlainResult:
        def __init__(self, passed):
            self.gate, self.passed, self.score = GateLevel.G2, passed, 0.5
            self.checks_passed, self.checks_failed, self.message = [], [] if passed else ["loss_flat"], ""

    def main(rank):
        original = PlainResult(rank != 1)
        out = kasmina.sync_gate_decision(slot_at("r0c0", SeedStage.TRAINING), original)
        return original, out

    for rank, (original, out) in enumerate(threads.run(main)):
        assert type(out) is PlainResult and out is not original and not out.passed
        assert (original.passed, original.message) == (rank != 1, "")
        if rank == 1:
            assert out.checks_failed == ["loss_flat"] and out.message == ""
        else:
            assert out.checks_failed == ["ddp_veto"] and original.checks_failed == []
            assert out.message == ("ddp_veto: rank 1 voted no (2 of 3 passed, unanimous policy); no rank "
                                   "transitions this slot")


def test_the_adapters_pass_the_group_timeout_and_per_slot_arguments_on(threads):
    from esper_gate import kasmina

    def main(rank):
        slots = [slot_at("r0c0", SeedStage.TRAINING), slot_at("r0c1", SeedStage.HOLDING)]
        results = [gate(GateLevel.G2, rank != 1), gate(GateLevel.G5, True)]   # rank 1 fails e/a: "any" passes it
        one = kasmina.sync_gate_decision(slots[1], results[1], group=threads, timeout=2.5)
        both = kasmina.sync_gate_decisions(slots, results, group=threads, timeout=2.5, names=["e/a", "e/b"],
                                           policies=["any", None], digests=[0, 7 if rank else 8])
        rounds = kasmina.gate_round(slots, results, group=threads, timeout=2.5, names=["e/a", "e/b"],
                                    policies=["any", None], digests=[0, 7 if rank else 8])
        return one, both, rounds

    for one, both, rounds in threads.run(main):
        assert one.passed and both[0].passed and rounds[0].passed
        # the digests reached the wire: rank 0's differs in e/b, which diverges under its own policy
        assert not both[1].passed and both[1].checks_failed == ["ddp_divergence"]
        assert "ranks do not hold the same state in slot e/b" in both[1].message
        assert "rank 0 holds HOLDING -> G5 with digest 0x00000008" in both[1].message
        assert rounds[1].diverged and rounds[1].name == "e/b" and "slot e/b" in rounds[1].note
    assert set(threads.groups) == {threads} and set(threads.timeouts) == {2.5}


def test_names_are_compared_as_text_and_a_round_of_other_names_is_another_call(threads):
    """1 and "1" name the same slot; a rank whose round names other slots is at another call,
    and every rank learns the outcome for its own slots."""
    from esper_gate import kasmina
    from esper_gate._inputs import site_fingerprint

    def main(rank):
        slots = [slot_at("a", SeedStage.TRAINING), slot_at("b", SeedStage.TRAINING)]
        results = [gate(GateLevel.G2, True), gate(GateLevel.G2, rank != 0)]
        same = kasmina.gate_round(slots, results, names=[1, 2] if rank == 1 else ["1", "2"])
        other = kasmina.gate_round(slots, results, names=["e/x", "e/y"] if rank == 2 else ["e/a", "e/b"])
        return same, other

    theirs = site_fingerprint(2, ["e/x", "e/y"])
    mine = site_fingerprint(2, ["e/a", "e/b"])
    for rank, (same, other) in enumerate(threads.run(main)):
        assert [(o.name, o.passed, o.diverged) for o in same] == [("1", True, False), ("2", False, False)]
        for o in other:
            assert (o.passed, o.diverged, o.gate) == (False, True, 2) and o.passed is False
            assert o.gate_result.checks_failed == (["loss_flat", "ddp_divergence"] if rank == 0 and o.name.endswith(
                ("b", "y")) else ["ddp_divergence"])
        if rank == 2:
            assert other[0].note == (
                f"ddp_divergence: ranks are at different gate calls: ranks 0-1 at another slot or slot layout (gate "
                f"call 2, site {mine:#010x}); rank 2 at this layout of 2 slots (gate call 2); no rank transitions "
                f"this layout of 2 slots")
        else:
            assert other[0].note == (
                f"ddp_divergence: ranks are at different gate calls: ranks 0-1 at this layout of 2 slots (gate call "
                f"2); rank 2 at another slot or slot layout (gate call 2, site {theirs:#010x}); no rank transitions "
                f"this layout of 2 slots")


def test_above_64_ranks_a_call_mismatch_note_names_the_diverged_slot_by_its_id(monkeypatch):
    from esper_gate import kasmina

    world = _ThreadWorld(70)
    monkeypatch.setattr(kasmina, "parent_group", world.parent_group)
    monkeypatch.setattr(kasmina, "cached_gate_sync", world.cached_gate_sync)

    def main(rank):
        slot = slot_at("r0c1", SeedStage.BLENDING) if rank == 69 else slot_at("r0c0", SeedStage.TRAINING)
        return kasmina.sync_gate_decision(slot, gate(GateLevel.G3 if rank == 69 else GateLevel.G2, True))

    out = world.run(main)
    assert all(not r.passed and r.checks_failed == ["ddp_divergence"] for r in out)
    assert "ranks are at different gate calls: " in out[0].message
    assert "slot r0c0 (#0): rank 0 holds TRAINING -> G2; at least 1 rank(s) differ" in out[0].message
    assert "slot r0c1 (#0): rank 0 holds TRAINING -> G2" in out[69].message


def test_a_corrupt_buffer_is_raised_on_every_rank_not_reported_per_slot(threads):
    """Ranks at other calls are an outcome to report per slot; a sum no honest ranks make is not."""
    from esper_gate import GateDivergenceError, kasmina, wire

    def corrupt(total):
        total = total.clone()
        total[wire.WORD_PRESENCE] += 1   # one rank too many
        return total

    threads.tamper = corrupt

    def main(rank):
        try:
            kasmina.gate_round([slot_at("a", SeedStage.TRAINING)], [gate(GateLevel.G2, True)])
        except GateDivergenceError as e:
            return e.report.corrupt
        return None

    assert threads.run(main) == [True] * threads.size


def test_round_arguments_are_named_after_the_function_that_took_them():
    from esper_gate import GateInputError, kasmina

    with pytest.raises(GateInputError, match="^sync_gate_decisions: got 1 slots but 2 gate results$"):
        kasmina.sync_gate_decisions([slot_at("a", SeedStage.TRAINING)], [None, None])


def test_a_frozen_gate_result_is_replaced_not_edited(threads):
    from esper_gate import kasmina

    @dataclass(frozen=True)
    class Frozen:
        gate: int
        passed: bool
        checks_failed: tuple = ()
        message: str = ""

    def main(rank):
        return kasmina.sync_gate_decision(slot_at("a", SeedStage.TRAINING), Frozen(2, rank != 2))

    for rank, out in enumerate(threads.run(main)):
        assert type(out) is Frozen and not out.passed
        assert list(out.checks_failed) == ([] if rank == 2 else ["ddp_veto"])


def test_a_slots_stage_is_dormant_without_a_state_or_a_stage():
    from esper_gate import kasmina

    class NoStage:
        pass

    class Holder:
        state = NoStage()

    assert kasmina._slot_stage(object(), "slot", []) == kasmina._slot_stage(Holder(), "slot", []) \
        == int(SeedStage.DORMANT)
    assert kasmina._slot_stage(slot_at("a", SeedStage.BLENDING), "slot", []) == int(SeedStage.BLENDING)


def test_above_64_ranks_a_veto_counts_the_ranks_that_voted_no():
    from esper_gate import kasmina
    from esper_gate.report import SlotVotes

    counted = SlotVotes(slot=0, name="a", status=0, yes=60, votes=[], stages=[], targets=[])
    assert kasmina._vote_note(counted, 70, True, "unanimous") == (
        "ddp_veto: 10 of 70 ranks voted no (60 of 70 passed, unanimous policy); no rank transitions this slot")
    assert kasmina._vote_note(counted, 70, False, "majority") == (
        "passed by majority consensus although this rank's gate failed: 10 of 70 ranks voted no (60 of 70 passed)")


def test_above_64_ranks_a_call_mismatch_note_describes_eight_diverged_slots_without_a_rest():
    from esper_gate import kasmina
    from esper_gate.report import MAX_TEXT_SLOTS, parse_report
    from reference import RankInput
    from simulate import simulate

    n = MAX_TEXT_SLOTS
    inputs = [RankInput([1] * n, [3] * n, [2] * n, seq=5, site=9) for _ in range(69)]
    inputs.append(RankInput([1] * n, [4] * n, [3] * n, seq=4, site=9))
    ids = [str(s) for s in range(n)]
    note = kasmina._call_mismatch_note(parse_report(simulate(inputs)[1], ids), 9, ids)
    assert note.count("; slot ") == n and "more diverged slot" not in note


def _scenarios_main(rank, world, spawned=True):
    """Every scenario on one rank. ``spawned``: a real rank of a gloo world, which also counts
    the collectives and the cached GateSyncs; else a thread of ``_ThreadWorld``."""
    import contextlib

    from torch.profiler import profile

    from esper_gate import kasmina

    if not spawned:
        profile = contextlib.nullcontext  # noqa: F811 - no collective to count among threads

    out: dict = {}
    one = dict(timeout=TIMEOUT_S)
    last = world - 1

    # every rank passes
    original = gate(GateLevel.G2, True)
    agreed = kasmina.sync_gate_decision(slot_at("r0c1", SeedStage.TRAINING), original, **one)
    out["agreed"] = as_dict(agreed)
    out["agreed_is_new_object"] = agreed is not original

    # rank 1 fails its gate: everyone else is vetoed
    original = gate(GateLevel.G2, rank != 1)
    out["veto"] = as_dict(kasmina.sync_gate_decision(slot_at("r0c1", SeedStage.TRAINING), original, **one))
    out["veto_original_untouched"] = as_dict(original)

    # the last rank is already BLENDING (checking G3) while the others are TRAINING (G2)
    stage, level = (SeedStage.BLENDING, GateLevel.G3) if rank == last else (SeedStage.TRAINING, GateLevel.G2)
    out["stage"] = as_dict(kasmina.sync_gate_decision(slot_at("r0c1", stage), gate(level, True), **one))

    # the last rank checks its gate for another slot
    slot_id = "r0c2" if rank == last else "r0c1"
    out["slot"] = as_dict(kasmina.sync_gate_decision(slot_at(slot_id, SeedStage.TRAINING),
                                                     gate(GateLevel.G2, True), **one))

    # ... and at another stage too: the message says what each rank holds
    slot, level = (slot_at("r0c2", SeedStage.BLENDING), GateLevel.G3) if rank == last else \
        (slot_at("r0c1", SeedStage.TRAINING), GateLevel.G2)
    out["slot_stage"] = as_dict(kasmina.sync_gate_decision(slot, gate(level, True), **one))

    # nothing is left behind: the next gate call agrees again
    out["after"] = as_dict(kasmina.sync_gate_decision(slot_at("r0c1", SeedStage.TRAINING),
                                                      gate(GateLevel.G2, True), **one))

    # majority: 2 of 3 pass, so the rank that failed is carried along
    out["majority"] = as_dict(kasmina.sync_gate_decision(slot_at("r0c3", SeedStage.HOLDING),
                                                         gate(GateLevel.G5, rank != 1), policy="majority", **one))

    # batched: the last rank has no seed in slot r1c1
    slots = [slot_at("r1c0", SeedStage.TRAINING), slot_at("r1c1", SeedStage.BLENDING),
             slot_at("r1c2", None), slot_at("r1c3", SeedStage.GERMINATED)]
    results = [gate(GateLevel.G2, True), gate(GateLevel.G3, True), None, gate(GateLevel.G1, rank != 0)]
    if rank == last:
        slots[1], results[1] = slot_at("r1c1", None), None
    # Building the cached GateSync is collective (a rendezvous and one warm-up
    # sync); count only what the gate round itself issues.
    if spawned:
        kasmina.cached_gate_sync(len(slots), group=None, timeout=TIMEOUT_S)
    with profile() as prof:
        batched = kasmina.sync_gate_decisions(slots, results, **one)
    out["batched"] = [as_dict(r) for r in batched]
    if spawned:
        out["batched_collectives"] = [e.name for e in prof.events() if e.name.startswith("gloo:")]
        out["cache"] = sorted((k[1], k[2], gs.calls) for k, (_parent, gs) in kasmina._cache.items())

    # one round for the model (env 1's, whose slot ids other models share):
    #   r0c0: rank0 policy in the slot (the round's is unanimous), rank 1 fails: passed everywhere;
    #   r0c1: the last rank has no seed and no gate there: diverged everywhere, also on the last rank;
    #   r0c2: the last rank's state digest differs: diverged, though every rank passes G5;
    #   r0c3: no rank has a gate: nothing to do, and not a divergence.
    from esper_gate import state_digest

    slots = [slot_at("r0c0", SeedStage.TRAINING), slot_at("r0c1", SeedStage.BLENDING),
             slot_at("r0c2", SeedStage.HOLDING), slot_at("r0c3", None)]
    results = [gate(GateLevel.G2, rank != 1), gate(GateLevel.G3, True), gate(GateLevel.G5, True), None]
    if rank == last:
        slots[1], results[1] = slot_at("r0c1", None), None
    digests = [None, None, state_digest(7, "blend", 0.5 if rank != last else 0.25), None]
    if spawned:
        kasmina.cached_gate_sync(len(slots), group=None, timeout=TIMEOUT_S)
    with profile() as prof:
        rounds = kasmina.gate_round(slots, results, policies=["rank0", None, None, None],
                                    names=[f"env1/{s.slot_id}" for s in slots], digests=digests, **one)
    if spawned:
        out["round_collectives"] = [e.name for e in prof.events() if e.name.startswith("gloo:")]
    out["round"] = [dict(name=o.name, gate=o.gate, passed=o.passed, diverged=o.diverged, note=o.note,
                         result=as_dict(o.gate_result)) for o in rounds]
    out["digests"] = [state_digest(7, "blend", 0.5), state_digest(7, "blend", 0.25)]

    # the last rank passes one name too few: bad input there, its peers told so, in the same call
    from esper_gate import GateInputError, GatePeerInputError

    names = [f"env1/{s.slot_id}" for s in slots][:3 if rank == last else 4]
    try:
        kasmina.gate_round(slots, results, names=names, **one)
        out["bad_names"] = None
    except (GateInputError, GatePeerInputError) as e:
        out["bad_names"] = (type(e).__name__, str(e))

    # batched under two policies, the same votes: rank 1 fails r2c0, every rank fails r2c1
    slots = [slot_at("r2c0", SeedStage.TRAINING), slot_at("r2c1", SeedStage.TRAINING)]
    for policy in ("any", "unanimous"):
        results = [gate(GateLevel.G2, rank != 1), gate(GateLevel.G2, False)]
        decided = kasmina.sync_gate_decisions(slots, results, policy=policy, **one)
        out[f"batched_{policy}"] = [as_dict(r) for r in decided]
    if spawned:
        out["policy_cache"] = sorted((k[1], k[2], gs.policy) for k, (_parent, gs) in kasmina._cache.items()
                                     if k[1] == 2)
        kasmina.clear_cache()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_adapter_on_real_ranks():
    world = 3
    check_scenarios(values(spawn_ranks(_scenarios_main, world, timeout=120)), world, spawned=True)


def test_adapter_on_ranks_in_threads(threads):
    """The same scenarios, in milliseconds, where mutation testing runs them."""
    check_scenarios(threads.run(lambda rank: _scenarios_main(rank, threads.size, spawned=False)), threads.size,
                    spawned=False)


def check_scenarios(results, world, spawned):
    for rank, out in enumerate(results):
        agreed = out["agreed"]
        assert agreed["type"] == "GateResult" and out["agreed_is_new_object"]
        assert agreed["passed"] and agreed["checks_failed"] == [] and agreed["message"] == "local checks"
        assert agreed["gate"] == 2 and agreed["score"] == 0.9 and agreed["checks_passed"] == ["loss_improved"]

        veto = out["veto"]
        assert not veto["passed"]
        if rank == 1:  # its own gate failed: nothing to veto
            assert veto["checks_failed"] == ["loss_flat"] and veto["message"] == "local checks"
        else:
            assert veto["checks_failed"] == ["ddp_veto"]
            assert "rank 1 voted no" in veto["message"] and "2 of 3 passed" in veto["message"]
            assert veto["message"].startswith("local checks; ")
        assert out["veto_original_untouched"]["checks_failed"] == ([] if rank != 1 else ["loss_flat"])

        stage = out["stage"]
        assert not stage["passed"] and stage["checks_failed"] == ["ddp_divergence"]
        assert "ranks 0-1 hold TRAINING -> G2" in stage["message"]
        assert "rank 2 holds BLENDING -> G3" in stage["message"]
        assert "slot r0c1" in stage["message"]

        slot = out["slot"]
        assert not slot["passed"] and slot["checks_failed"] == ["ddp_divergence"]
        assert "different gate calls" in slot["message"]
        if rank < 2:
            assert "ranks 0-1 at slot r0c1" in slot["message"] and "rank 2 at another slot" in slot["message"]
        else:
            assert "rank 2 at slot r0c2" in slot["message"] and "ranks 0-1 at another slot" in slot["message"]

        slot_stage = out["slot_stage"]
        assert not slot_stage["passed"] and slot_stage["checks_failed"] == ["ddp_divergence"]
        assert "holding TRAINING -> G2" in slot_stage["message"]
        assert "holding BLENDING -> G3" in slot_stage["message"]

        assert out["after"]["passed"] and out["after"]["checks_failed"] == []

        majority = out["majority"]
        assert majority["passed"] and majority["checks_failed"] == ([] if rank != 1 else ["loss_flat"])
        if rank == 1:
            assert "passed by majority consensus although this rank's gate failed" in majority["message"]

        b = out["batched"]
        if spawned:
            assert out["batched_collectives"] == ["gloo:all_reduce"], "one collective for all slots"
        assert b[0]["passed"] and b[0]["checks_failed"] == []
        assert b[2] is None
        assert not b[3]["passed"]
        assert b[3]["checks_failed"] == (["loss_flat"] if rank == 0 else ["ddp_veto"])
        if rank == 2:
            assert b[1] is None
        else:
            assert not b[1]["passed"] and b[1]["checks_failed"] == ["ddp_divergence"]
            assert "slot r1c1" in b[1]["message"]
            assert "ranks 0-1 hold BLENDING -> G3" in b[1]["message"]
            assert "rank 2 holds DORMANT -> no gate" in b[1]["message"]

        if spawned:
            # one GateSync per (group, slot count, policy), reused by every call
            assert out["cache"] == [(1, "majority", 1), (1, "unanimous", 6), (4, "unanimous", 1)]
            # the round: one collective
            assert out["round_collectives"] == ["gloo:all_reduce"]
        # every slot's outcome on every rank
        r0, r1, r2, r3 = out["round"]
        assert [o["name"] for o in out["round"]] == ["env1/r0c0", "env1/r0c1", "env1/r0c2", "env1/r0c3"]
        assert (r0["gate"], r0["passed"], r0["diverged"]) == (2, True, False)
        assert r0["result"]["passed"]
        if rank == 1:
            assert "passed by rank0 consensus although this rank's gate failed" in r0["note"]
        assert not r1["passed"] and r1["diverged"]
        assert "slot env1/r0c1" in r1["note"] and "rank 2 holds DORMANT -> no gate" in r1["note"]
        assert "ranks 0-1 hold BLENDING -> G3" in r1["note"]
        if rank == world - 1:
            assert r1["gate"] is None and r1["result"] is None, "no gate here, yet it learns the divergence"
        else:
            assert r1["gate"] == 3 and r1["result"]["checks_failed"] == ["ddp_divergence"]
        mine, theirs = out["digests"]
        assert (r2["gate"], r2["passed"], r2["diverged"]) == (5, False, True)
        assert f"ranks 0-1 hold HOLDING -> G5 with digest {mine:#010x}" in r2["note"]
        assert f"rank 2 holds HOLDING -> G5 with digest {theirs:#010x}" in r2["note"]
        assert r3 == dict(name="env1/r0c3", gate=None, passed=False, diverged=False, note=None, result=None)
        kind, text = out["bad_names"]
        if rank == world - 1:
            assert kind == "GateInputError" and "names must be a sequence of 4 slot names, got 3 names" in text
        else:
            assert kind == "GatePeerInputError" and "rank 2 passed bad input" in text

        # the policy reaches the batched sync: "any" passes what "unanimous" vetoes
        passed_any, failed_any = out["batched_any"]
        assert passed_any["passed"] and not failed_any["passed"]
        if rank == 1:
            assert passed_any["checks_failed"] == ["loss_flat"]
            assert "passed by any consensus although this rank's gate failed" in passed_any["message"]
        else:
            assert passed_any["checks_failed"] == []
        vetoed, failed = out["batched_unanimous"]
        assert not vetoed["passed"] and vetoed["checks_failed"] == (["loss_flat"] if rank == 1 else ["ddp_veto"])
        assert not failed["passed"] and failed_any["checks_failed"] == failed["checks_failed"] == ["loss_flat"]
        if spawned:
            assert out["policy_cache"] == [(2, "any", "any"), (2, "unanimous", "unanimous")]


def _skips_main(rank, world):
    """Rank 2 never reaches the first gate (no active seed there, so it never builds the
    GateSync); later, after every rank did one round, rank 0 skips the next round."""
    from torch.distributed.distributed_c10d import _get_default_store

    from esper_gate import kasmina

    store = _get_default_store()
    out = {}
    if rank == world - 1:
        store.wait([f"test/first/{r}" for r in range(world - 1)], datetime.timedelta(seconds=60))
    else:
        t0 = time.monotonic()
        try:
            kasmina.sync_gate_decision(slot_at("r0c0", SeedStage.TRAINING), gate(GateLevel.G2, True),
                                       timeout=TIMEOUT_S)
            out["first"] = {"error": None}
        except Exception as e:
            out["first"] = {"error": type(e).__name__, "missing": getattr(e, "missing_ranks", None),
                            "elapsed": time.monotonic() - t0, "text": str(e)}
        store.set(f"test/first/{rank}", "1")
    slots = [slot_at(f"r0c{i}", SeedStage.TRAINING) for i in range(2)]
    kasmina.sync_gate_decisions(slots, [gate(GateLevel.G2, True)] * 2, timeout=TIMEOUT_S)
    if rank == 0:
        time.sleep(TIMEOUT_S + 2)  # past the others' GateTimeoutError
        return out
    t0 = time.monotonic()
    try:
        kasmina.sync_gate_decisions(slots, [gate(GateLevel.G2, True)] * 2, timeout=TIMEOUT_S)
        out["later"] = {"error": None}
    except Exception as e:
        out["later"] = {"error": type(e).__name__, "missing": getattr(e, "missing_ranks", None),
                        "elapsed": time.monotonic() - t0}
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_ranks_that_skip_a_first_gate_or_a_later_round_are_named_not_waited_for():
    world = 3
    results = values(spawn_ranks(_skips_main, world, timeout=90))
    for res in results[:-1]:
        first = res["first"]
        assert first["error"] == "GateTimeoutError", first
        assert first["missing"] == [world - 1]
        assert first["elapsed"] < TIMEOUT_S + 5
        assert f"rank {world - 1} did not arrive" in first["text"]
    assert "first" not in results[-1]
    assert "later" not in results[0]
    for res in results[1:]:
        later = res["later"]
        assert later["error"] == "GateTimeoutError" and later["missing"] == [0], later
        assert later["elapsed"] < TIMEOUT_S + 5


def _asymmetric_round_main(rank, world):
    """Epoch 1: model A has one slot fewer on rank 1, then model B (2 slots, the same on
    every rank). Epoch 2: model A is whole again on every rank, then model B."""
    from esper_gate import kasmina

    out = {}
    for epoch in (1, 2):
        model_a = [slot_at(f"r0c{i}", SeedStage.TRAINING) for i in range(3)]
        if epoch == 1 and rank == 1:
            model_a = model_a[:2]
        model_b = [slot_at(f"r1c{i}", SeedStage.TRAINING) for i in range(2)]
        for model, slots in (("A", model_a), ("B", model_b)):
            try:
                rounds = kasmina.gate_round(slots, [gate(GateLevel.G2, True)] * len(slots), timeout=TIMEOUT_S)
                res = {"error": None, "passed": [o.passed for o in rounds]}
            except Exception as e:  # noqa: BLE001 - the outcome is what is tested
                res = {"error": type(e).__name__, "text": str(e)}
            res["cache"] = sorted((k[1], k[2]) for k in kasmina._cache)
            out[(epoch, model)] = res
    kasmina.clear_cache()
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_config_error_leaves_every_cache_alike_and_ends_with_its_round():
    r0, r1 = values(spawn_ranks(_asymmetric_round_main, 2, timeout=90))
    for out in (r0, r1):
        a = out[(1, "A")]
        assert a["error"] == "GateConfigError", a
        assert "rank 0: num_slots=3" in a["text"] and "rank 1: num_slots=2" in a["text"]
        # model B right after, and both models in the next epoch, agree on every rank
        for when in ((1, "B"), (2, "A"), (2, "B")):
            assert out[when]["error"] is None, (when, out[when])
            assert all(out[when]["passed"]), (when, out[when])
        assert a["cache"] == [], "the gate the ranks built with other settings is kept by no rank"
        assert out[(1, "B")]["cache"] == [(2, "unanimous")]
        assert out[(2, "B")]["cache"] == [(2, "unanimous"), (3, "unanimous")]
