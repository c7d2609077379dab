"""``python -m esper_gate demo`` end to end (small sizes); the loop itself is tested in test_esper_round.py."""
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
    # the round is called twice per epoch on every rank, whatever the rank's slots hold
    assert summary["round calls per rank"] == f"{2 * epochs} on every rank (2 per epoch)"
    assert summary["transitions applied to diverged slots"] == "0"
    assert summary["transitions applied"].endswith("on every rank")
    # the lone prune diverges exactly the pruned slot, which is the only one out of step
    caught = summary["divergences caught"]
    pruned = re.search(rf"rank {diverged_rank} pruned (r\dc\d) on its own", caught).group(1)
    # rank 0's alpha step drifts on one slot (by default): a digest divergence there, stage unchanged
    digest_row = summary["of which state-digest divergences"]
    drift = re.search(r"; (r\dc\d): rank 0's alpha step drifted at epoch \d+, its stage the same on every "
                      r"rank \(only the digest tells\)", digest_row)
    expected = {pruned} | ({drift.group(1)} if drift else set())
    if drift:
        assert re.match(rf"\d+ slot-rounds, on .*{drift.group(1)}", digest_row), digest_row
    assert set(re.search(r"on (.*) only", caught).group(1).split(", ")) == expected, caught
    # every rank learns every slot's divergence, also the ranks without a gate there
    assert re.search(r"seen by \d+ on every rank", caught), caught
    assert summary["slots in step at the end"].endswith(f"({pruned} differs)")
    # a per-check sync would have paired different numbers of gate checks per rank
    checks = summary["gate checks a per-check sync would pair"]
    assert "on every rank" not in checks and f"rank {diverged_rank}:" in checks
    # the first divergence is printed as reported, naming the slot and the rank with its stage
    line = next(ln for ln in stdout.splitlines() if re.match(r"\s+round \d+ \(epoch \d+, after the", ln))
    assert pruned in line and re.search(rf"rank {diverged_rank} holds (PRUNED|EMBARGOED|RESETTING|DORMANT)", line)
    return summary


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_end_to_end():
    done = run_demo("--world", "2", "--slots", "4", "--epochs", "8", "--diverge-at", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    check_run(done.stdout, epochs=8, diverged_rank=1)
    assert "epochs [" in done.stdout and "8/8" in done.stdout


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_show_hang_then_esper_gate():
    done = run_demo("--show-hang", "--world", "3", "--slots", "4", "--epochs", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    old, new = done.stdout.split("the same loop with esper_gate", 1)
    assert "the job would have hung" in old
    assert re.search(r"rank 2, epoch \d+: its gate check for slot r\dc\d adopted rank 0's decision for slot "
                     r"r\dc\d", old)
    assert "rank 2: still waiting in the gradient all_reduce" in old
    assert re.search(r"rank 0: still waiting in a gate broadcast for slot r\dc\d", old)
    check_run(new, epochs=8, diverged_rank=2)


@pytest.mark.multiprocess
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_under_torchrun():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m"]
    done = run_demo("--slots", "4", "--epochs", "8", "--diverge-at", "4", launcher=launcher)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "launched by torchrun" in done.stdout
    check_run(done.stdout, epochs=8, diverged_rank=1)


# ---- in this process -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--diverge-at", "99", "--epochs", "5"], "--diverge-at must be within 1..5"),
    (["--slots", "0"], "--slots must be within 1..1024, got 0"),
    (["--show-hang", "--diverge-at", "-1"], "--show-hang needs a divergence"),
    (["--backend", "nccl"], "--backend nccl needs"),
    (["--drift-at", "4", "--diverge-at", "4", "--epochs", "8"], "--drift-at must be within 1..8 and differ"),
    (["--drift-at", "9", "--epochs", "8"], "got 9"),
])
def test_bad_options_fail_fast(argv, message, capsys):
    from esper_gate.tools import demo

    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err
