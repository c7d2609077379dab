"""``python -m esper_gate demo`` end to end (small sizes), and its simulation."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from esper_gate._spawn import free_port

DEMO_TIMEOUT_S = 150


def run_demo(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["esper_gate", "demo", *args]
    # the demo bounds every wait itself; this timeout only guards the test run
    return subprocess.run(cmd, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)


def summary_of(stdout: str) -> dict[str, str]:
    """The summary block: {"epochs": "6", "collectives issued": "6 (one per epoch)", ...}."""
    block = stdout.split("\nsummary (", 1)[1]
    rows = {}
    for line in block.splitlines()[1:]:
        key, sep, value = line.strip().partition(":")
        if sep:
            rows[key] = value.strip()
    return rows


def leading_int(text: str) -> int:
    return int(re.match(r"\d+", text).group())


def check_run(stdout: str, *, epochs: int, diverged_rank: int) -> dict[str, str]:
    summary = summary_of(stdout)
    assert summary["epochs"] == str(epochs)
    assert summary["final slot stages identical on all ranks"] == "yes"
    assert summary["collectives issued"] == f"{epochs} (one per epoch)"
    assert summary["divergences caught"] == "1 (injected: 1)"
    assert summary["transitions applied to diverged slots"] == "0 on every rank"
    assert leading_int(summary["per-slot design would issue"]) >= 1
    assert summary["transitions applied"].endswith("on every rank")
    # the injected divergence is reported with the ranks and their stages
    assert "not in agreement" in stdout
    assert "holds PRUNED -> G0" in stdout and f"rank {diverged_rank} holds PRUNED" in stdout
    assert "no rank transitioned slot" in stdout
    return summary


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_end_to_end():
    done = run_demo("--world", "2", "--slots", "4", "--epochs", "6", "--diverge-at", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    check_run(done.stdout, epochs=6, diverged_rank=1)
    assert "epoch 3: rank 1 pruned slot" in done.stdout
    assert "epochs [" in done.stdout and "6/6" in done.stdout


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_show_hang_then_esper_gate():
    done = run_demo("--show-hang", "--world", "3", "--slots", "4", "--epochs", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    old, new = done.stdout.split("the same scenario with esper_gate", 1)
    assert "the job would have hung" in old
    assert "rank 2: still waiting in the gradient all_reduce" in old
    assert re.search(r"rank 0: still waiting in the gate all_reduce for slot r\dc\d", old)
    assert re.search(r"rank 1: still waiting in the gate all_reduce for slot r\dc\d", old)
    check_run(new, epochs=4, diverged_rank=2)


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_under_torchrun():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m"]
    done = run_demo("--slots", "3", "--epochs", "4", "--diverge-at", "2", launcher=launcher)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "launched by torchrun" in done.stdout
    check_run(done.stdout, epochs=4, diverged_rank=1)


# ---- in this process -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--diverge-at", "99", "--epochs", "5"], "--diverge-at must be within 1..5"),
    (["--slots", "0"], "--slots must be within 1..1024, got 0"),
    (["--show-hang", "--diverge-at", "-1"], "--show-hang needs a divergence"),
    (["--backend", "nccl"], "--backend nccl needs"),
])
def test_bad_options_fail_fast(argv, message, capsys):
    from esper_gate.tools import demo

    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_lifecycles_stay_in_step_and_visit_every_stage():
    """Run every rank's simulation here, deciding gates unanimously in Python."""
    from esper_gate.esper import SeedStage as S
    from esper_gate.tools import demo

    world, num_slots, epochs = 3, 8, 80
    ranks = [demo.Lifecycles(num_slots, seed=1, rank=r) for r in range(world)]
    legal = {(S.DORMANT, S.GERMINATED), (S.GERMINATED, S.TRAINING), (S.TRAINING, S.BLENDING),
             (S.BLENDING, S.HOLDING), (S.HOLDING, S.FOSSILIZED), (S.PRUNED, S.EMBARGOED),
             (S.EMBARGOED, S.RESETTING), (S.RESETTING, S.DORMANT)}
    legal |= {(s, S.PRUNED) for s in demo.PRUNABLE_STAGES}
    seen, vetoes = set(), 0
    for epoch in range(1, epochs + 1):
        before = ranks[0].stages()
        checks = [life.begin_epoch(epoch) for life in ranks]
        for i in range(num_slots):
            votes = [c[i].vote for c in checks if c[i] is not None]
            assert len(votes) in (0, world), "every rank checks the same gates"
            if votes and all(votes):
                for life in ranks:
                    life.pass_gate(i)
            vetoes += bool(votes) and any(votes) and not all(votes)
        stages = [life.stages() for life in ranks]
        assert all(s == stages[0] for s in stages), f"ranks out of step at epoch {epoch}"
        for a, b in zip(before, stages[0]):
            assert a == b or (a, b) in legal, f"illegal transition {a} -> {b}"
        seen |= set(stages[0])
    assert seen == {S.DORMANT, S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED,
                    S.PRUNED, S.EMBARGOED, S.RESETTING}
    assert vetoes > 0, "per-rank noise must sometimes split the vote"
