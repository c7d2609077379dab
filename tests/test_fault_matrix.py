"""benchmarks/fault_matrix.py, dry run on the CPU over the NCCL-like test double.

The default run takes the cases in which every rank is present; the slow step
runs every case (the skipped and killed ranks, also covered by
test_nccl_like.py, wait out the gate's timeout)."""
import os
import subprocess
import sys

import pytest

import nccl_like

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]
_WHY_NOT = nccl_like.supported()
if _WHY_NOT:
    pytestmark.append(pytest.mark.skip(reason=_WHY_NOT))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["agree", "slow", "bad_input", "divergence", "skip", "sigkill"]
PRESENT = ["agree", "slow", "bad_input", "divergence"]


@pytest.mark.parametrize("cases", [PRESENT, pytest.param(ALL, marks=pytest.mark.slow)], ids=["present", "all"])
def test_fault_matrix_dry_run_passes_every_case(cases):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fault_matrix.py"), "--spawn", "2",
                          "--backend", "abortable", "--timeout", "3", "--cases", ",".join(cases)],
                         capture_output=True, text=True, timeout=140, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert [ln.split()[1] for ln in lines] == cases, out.stdout + out.stderr[-3000:]
    assert all(ln.startswith("PASS") for ln in lines), out.stdout
    assert out.returncode == 0
