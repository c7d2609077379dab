"""The import-time check that esper_gate runs against the torch it was built for."""
import re
import subprocess
import sys

import pytest
import torch

import esper_gate
from esper_gate import build_info


def test_build_info_matches_running_torch():
    info = esper_gate.BUILD_INFO
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["build"] in ("cpu", "cuda")
    assert (info["torch_cuda"] is None) == (torch.version.cuda is None)


@pytest.mark.parametrize("built, cuda", [("2.0.0+cpu", None), ("9.9.9", "13.0")])
def test_mismatched_torch_is_refused_with_rebuild_hint(built, cuda):
    info = dict(esper_gate.BUILD_INFO, torch_version=built, torch_cuda=cuda)
    with pytest.raises(build_info.BuildMismatchError,
                       match=re.escape(f"built for torch {built}") + ".*pip install --no-build-isolation"):
        build_info.check(info)


def test_cuda_flavour_mismatch_is_refused():
    flipped = None if torch.version.cuda else "13.0"
    info = dict(esper_gate.BUILD_INFO, torch_version=torch.__version__, torch_cuda=flipped)
    with pytest.raises(build_info.BuildMismatchError, match="rebuild esper_gate"):
        build_info.check(info)


def test_info_command_prints_the_build():
    out = subprocess.run([sys.executable, "-m", "esper_gate", "info"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert f"torch_version  {esper_gate.BUILD_INFO['torch_version']}" in out
    assert "torch.ops.esper_gate.sync" in out
