"""The GPU check's scripts, on the CPU: their summary parsing, their no-GPU paths, the
GateSync-on-a-forced-parent path of gpu_gate_check.py, and the dry runs of gpu_world2_check.py
and gpu_owned_check.py on the owned communicator's CPU double (tests/owned_double.py).

benchmarks/gpu_check.sh runs once on a lent GPU with no second try: what of it can run
here runs here.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_gate_check  # noqa: E402
import gpu_owned_check  # noqa: E402
import gpu_summary  # noqa: E402
import gpu_world2_check  # noqa: E402

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
                                            ("gpu_gate_check.py", gpu_gate_check),
                                            ("gpu_world2_check.py", gpu_world2_check)])
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
    assert "world2" in out.stdout and "pip show nvidia-nccl-cu13" in out.stdout


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


# ---- gpu_owned_check.py: what NCCL can promise, and what one GPU cannot show ----------------

def test_the_cycles_bound_allows_one_thread_and_fd_per_pending_id_and_nothing_per_healthy_cycle():
    """NCCL's bootstrap root of a unique id whose peer never joins stays for the process's life."""
    assert gpu_owned_check.cycle_bound("pending", 100) == 100 + gpu_owned_check.SLACK
    assert gpu_owned_check.cycle_bound("healthy", 25) == gpu_owned_check.SLACK
    assert gpu_owned_check.SLACK < 25   # a leak of one thread per healthy cycle fails


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the single-GPU skip")
def test_one_context_is_skipped_with_the_reason_where_the_gate_device_is_the_current_one():
    ok, text = gpu_owned_check.case_one_context(None)
    assert ok is None and "cannot show" in text, text


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_owned_check_dry_run_on_the_double():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_owned_check.py"), "--double",
                          "--cycles", "20"], capture_output=True, text=True, timeout=170, cwd=ROOT)
    lines = {ln.split()[1].split(":")[1]: ln for ln in gpu_summary.case_lines(out.stdout, "owned")}
    assert out.returncode == 0, out
    assert set(lines) == set(gpu_owned_check.CASES), out.stdout
    for name, ln in lines.items():
        assert ln.startswith("PASS" if name in gpu_owned_check.DOUBLE_CASES else "SKIPPED"), ln
    # the double leaves a bootstrap root per pending id, as NCCL does, and the bound allows it
    pending, healthy = (int(x) for x in re.findall(r"OS threads ([+-]\d+)", lines["cycles"]))
    assert 20 - 3 <= pending <= gpu_owned_check.cycle_bound("pending", 20), lines["cycles"]
    assert healthy <= gpu_owned_check.SLACK, lines["cycles"]


# ---- gpu_world2_check.py: its judgements, and its dry run on the double ------------------

def _silent(elapsed=3.0, abort_s=6.0, named=True, after=("applied", gpu_world2_check.VOTES)):
    ok_call = ("applied", gpu_world2_check.VOTES)
    outcome = (("raised", "GateTimeoutError", [1], "esper_gate call 2: rank 1 did not arrive",
                ["the gate's NCCL abort has not returned after 1.0 s: ..."]) if named else ok_call)
    r0 = {"timeout": 4.0, "first": ok_call, "outcome": outcome, "elapsed": elapsed, "abort_returned_at_raise": False,
          "close_s": 1.0, "abort_s": abort_s, "after": after}
    r1 = {"timeout": 4.0, "first": ok_call, "close_s": 0.1, "after": after}
    return [r0, r1]


def test_the_silent_peer_must_be_named_in_time_the_abort_return_and_a_new_gate_work():
    judge = gpu_world2_check.judge_silent_peer
    ok, text = judge(_silent())
    assert ok and "rank 1 named after 3.0 s (bound 9 s)" in text and "the NCCL abort took 6.0 s" in text, text
    assert "note on the error: yes" in text
    assert not judge(_silent(elapsed=9.5))[0]                     # past timeout + 5 s
    ok, text = judge(_silent(abort_s=None))
    assert not ok and "NOT returned" in text                       # the abort never freed the stream
    assert not judge(_silent(named=False))[0]                       # no error: the call was applied
    assert not judge(_silent(after=("raised", "GateError", None, "x", [])))[0]   # no new gate


def test_the_check_reports_each_rank_on_its_nccl_host_so_two_ranks_may_share_a_gpu(monkeypatch):
    """Check-only: GateSync refuses two ranks on one GPU of one host; with an NCCL_HOSTID each,
    NCCL sees two hosts, and so does the rendezvous."""
    from esper_gate import _build
    from esper_gate._group import shared_devices

    monkeypatch.setattr(_build, "_where", lambda gate: {"host": "n1", "device": "cuda:0 (GPU u)"})
    plain = _build._where
    assert shared_devices({r: plain(None) for r in (0, 1)}) is not None
    seen = {}
    for r in (0, 1):
        _build._where = plain   # each rank patches its own process once
        gpu_world2_check.report_host_id(gpu_world2_check.host_id(r))
        seen[r] = _build._where(None)
    assert shared_devices(seen) is None
    assert seen[1]["host"] == "n1 (NCCL_HOSTID esper-gate-world2-rank1)"


def test_figure_lines_judge_the_floor_at_every_s_and_the_per_slot_speedup_from_s_4():
    row = {"reps": 5, "words": 74, "per_slot_unanimous": 1600.0, "bare_floor": 100.0, "raw_op": 110.0,
           "esper_gate": 125.0}
    (name1, one), (name16, sixteen) = gpu_world2_check.figure_lines({1: dict(row), 16: dict(row)}, double=False)
    assert (name1, name16) == ("figures_s1", "figures_s16")
    assert "target <= 1.3x: met" in one and "S/2" not in one
    assert "per-slot / GateSync 12.8x (target >= S/2 = 8x: met)" in sixteen
    (_, slow), = gpu_world2_check.figure_lines({16: dict(row, esper_gate=140.0, per_slot_unanimous=900.0)}, False)
    assert "1.40x floor, target <= 1.3x: MISSED" in slow and "(target >= S/2 = 8x: MISSED)" in slow


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_world2_dry_run_on_the_double_runs_every_case_that_needs_no_cuda():
    """The check's code paths before a GPU spends time on them: the owned gate at a world of two,
    ncclInProgress on every call, the silent peer behind 10 s on the caller's stream, the figures."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_world2_check.py"), "--double",
                          "--figure-budget", "0.3", "--slots", "1", "16"],
                         capture_output=True, text=True, timeout=230, cwd=ROOT)
    lines = {ln.split()[1].split(":")[1]: ln for ln in gpu_summary.case_lines(out.stdout, "world2")}
    assert out.returncode == 0, out
    assert set(lines) == {"all_reduce", "no_host_sync", "enqueue", "silent_peer", "figures_s1", "figures_s16",
                          "store_free", "graph_capture"}, out.stdout
    for name in gpu_world2_check.CUDA_ONLY:
        assert lines[name].startswith("SKIPPED"), lines[name]
    assert lines["all_reduce"].startswith("PASS") and "ncclInProgress 50/50 calls" in lines["all_reduce"]
    assert lines["store_free"].startswith("PASS") and "the caller waited for 0 store requests" in lines["store_free"]
    assert lines["silent_peer"].startswith("PASS") and "rank 1 named" in lines["silent_peer"]
    assert all(lines[n].startswith("FIGURE") for n in ("enqueue", "figures_s1", "figures_s16"))


UNBUILDABLE_WORLD = """
import sys
sys.path.insert(0, {benchmarks!r})
import esper_gate
import gpu_world2_check as m


def gate(self, slots=4, timeout=30.0):
    raise esper_gate.GateError("GateSync construction: rank 1 did not initialize the gate's communicator (test)")


m.World.gate = gate  # the spawned ranks run this file first too (their __mp_main__)
if __name__ == "__main__":
    sys.exit(m.main(["--double"]))
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_world_of_two_that_cannot_build_a_gate_stops_at_once_and_every_case_says_why(tmp_path):
    """On the GPU each later case would wait out a construction timeout for the same reason."""
    script = tmp_path / "unbuildable.py"
    script.write_text(UNBUILDABLE_WORLD.format(benchmarks=os.path.join(ROOT, "benchmarks")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=ROOT)
    lines = {ln.split()[1].split(":")[1]: ln for ln in gpu_summary.case_lines(out.stdout, "w")}
    assert out.returncode == 1, out
    assert set(lines) == set(gpu_world2_check.CASES), out.stdout
    assert lines["all_reduce"].startswith("FAIL") and "GateSync construction" in lines["all_reduce"]
    assert lines["silent_peer"].startswith("FAIL") and "could not build a gate" in lines["silent_peer"]
    assert lines["figures"].startswith("SKIPPED") and "could not build a gate" in lines["figures"]
