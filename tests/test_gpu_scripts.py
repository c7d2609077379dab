"""The GPU check's scripts, on the CPU: their summary parsing, their no-GPU paths, and the
GateSync-on-a-forced-parent path of gpu_gate_check.py on the owned communicator's CPU double.

benchmarks/gpu_check.sh runs once on a lent GPU with no second try: what of it can run
here runs here.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_gate_check  # noqa: E402
import gpu_owned_check  # noqa: E402
import gpu_summary  # noqa: E402

from esper_gate._spawn import spawn_ranks, values  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the scripts' no-GPU path")


def test_case_lines_become_one_summary_line_each():
    log = "\n".join([
        "NCCL: /x/libnccl.so.2 (2, 30, 7) (torch (2, 30, 7)), usable True ",
        "PASS init_timeout_abort (3.2s): states during 1 s ['pending'], abort 12 ms, then 'aborted'",
        "FAIL cycles (40.0s): 100 x init/abort in 9.0 s: fds +200",
        "    a traceback line that is not a case",
        "FIGURE enqueue (4.0s): host enqueue " + "x" * 400,
        "SKIPPED mapped_words (0.0s): no GPU visible to torch",
    ])
    lines = gpu_summary.case_lines(log, "owned")
    assert [ln.split()[:2] for ln in lines] == [["PASS", "owned:init_timeout_abort"], ["FAIL", "owned:cycles"],
                                                ["FIGURE", "owned:enqueue"], ["SKIPPED", "owned:mapped_words"]]
    assert lines[1].endswith("100 x init/abort in 9.0 s: fds +200")
    assert all(len(ln) < 8 + 1 + 28 + 1 + 6 + 2 + gpu_summary.WIDTH + 1 for ln in lines)
    assert lines[2].endswith("...")


def test_bench_targets_become_figure_lines_never_failures():
    log = "\n".join([
        "[bench] nccl W=1: done in 9.0 s",
        "[bench] summary (targets are reported, never asserted):",
        "  PASS  raw op <= 1.3x the bare floor: worst 1.10x [S=1: 1.1x]",
        "  MISS  esper_gate >= S/2 x faster than per-slot: worst 1.5x",
        "[bench] wrote results/bench.md",
    ])
    lines = gpu_summary.bench_lines(log)
    assert len(lines) == 2 and all(ln.startswith("FIGURE") for ln in lines)
    assert "MISS esper_gate >= S/2" in lines[1]


def test_summary_cli_skips_a_missing_log_and_refuses_a_bad_spec(tmp_path):
    log = tmp_path / "g.log"
    log.write_text("PASS no_host_sync (2.0s): raw op: ok\n")
    run = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_summary.py")]
    out = subprocess.run(run + [f"cases:gate:{log}", f"cases:gate:{tmp_path / 'absent.log'}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split()[:2] == ["PASS", "gate:no_host_sync"], out
    bad = subprocess.run(run + ["nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown spec 'nonsense'" in bad.stderr


def test_a_figure_never_fails_the_run_unless_its_case_broke():
    assert gpu_gate_check.verdict_word("enqueue", False, False) == "FIGURE"  # a missed target
    assert gpu_gate_check.verdict_word("kernels", True, True) == "FAIL"  # raised or hung
    assert gpu_gate_check.verdict_word("owned_transport", False, False) == "FAIL"
    assert gpu_gate_check.verdict_word("owned_transport", True, False) == "PASS"
    assert set(gpu_gate_check.FIGURES) <= set(gpu_gate_check.CASES)


@no_gpu
@pytest.mark.parametrize("script, module", [("gpu_owned_check.py", gpu_owned_check),
                                            ("gpu_gate_check.py", gpu_gate_check)])
def test_without_a_gpu_every_case_is_skipped_with_exit_3(script, module):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 3, out
    lines = gpu_summary.case_lines(out.stdout, "x")
    assert [ln.split()[1] for ln in lines] == [f"x:{c}" for c in module.CASES]
    assert all(ln.startswith("SKIPPED") for ln in lines)


def test_gpu_check_help_prints_its_header():
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "GPU_CHECK_BUDGET_S" in out.stdout and "c10d_fallback" in out.stdout


def _forced_world_of_one(rank, world):
    import owned_double

    gs = gpu_gate_check.forced_gate(torch.device("cpu"), owned=owned_double)
    got = [gs(gpu_gate_check.VOTES, gpu_gate_check.STAGES, gpu_gate_check.TARGETS).decisions.tolist()
           for _ in range(3)]
    kind = type(gs._transport).__name__
    gs.close()
    return kind, gs.transport, got


@pytest.mark.timeout(90)
def test_forced_gate_takes_the_owned_path_in_a_world_of_one():
    """gpu_gate_check's gate_sync_owned and no_host_sync cases build GateSync this way on the GPU."""
    ((kind, transport, got),) = values(spawn_ranks(_forced_world_of_one, 1, timeout=80))
    want = gpu_gate_check._want()
    assert kind == "OwnedTransport" and transport == "owned"
    assert got == [want] * 3, (got, want)
