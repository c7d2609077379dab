"""benchmarks/fault_matrix.py, dry run on the CPU over the NCCL-like test double
(a c10d group that fails like ProcessGroupNCCL) and over the owned-communicator
double (tests/owned_double.py, the gate's own NCCL communicator on the CPU).

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["agree", "slow", "bad_input", "divergence", "skip", "sigkill"]
PRESENT = ["agree", "slow", "bad_input", "divergence"]


@pytest.mark.parametrize("backend", ["abortable", "owned-double"])
@pytest.mark.parametrize("cases", [PRESENT, pytest.param(ALL, marks=pytest.mark.slow)], ids=["present", "all"])
def test_fault_matrix_dry_run_passes_every_case(cases, backend):
    if backend == "abortable" and _WHY_NOT:
        pytest.skip(_WHY_NOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fault_matrix.py"), "--spawn", "2",
                          "--backend", backend, "--timeout", "3", "--cases", ",".join(cases)],
                         capture_output=True, text=True, timeout=140, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert [ln.split()[1] for ln in lines] == cases, out.stdout + out.stderr[-3000:]
    assert all(ln.startswith("PASS") for ln in lines), out.stdout
    assert out.returncode == 0
