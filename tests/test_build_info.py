"""The import-time check against the torch esper_gate was built for, `info`, and the build's packaging."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile

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


def test_cuda_version_mismatch_is_refused(monkeypatch):
    # a cu126 torch and a cu130 torch of the same version must not pass for each other
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    info = dict(esper_gate.BUILD_INFO, torch_version=torch.__version__, torch_cuda="12.6")
    with pytest.raises(build_info.BuildMismatchError,
                       match=r"built for a torch with CUDA 12\.6, but the running torch has CUDA 13\.0.*"
                             r"pip install --no-build-isolation"):
        build_info.check(info)
    build_info.check(dict(info, torch_cuda="13.0"))


PKG_DIR = os.path.dirname(os.path.abspath(esper_gate.__file__))
SRC_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(args, cwd, env=None):
    # PYTHONPATH: the copy under test stays importable from cwd however it was installed
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), os.path.dirname(PKG_DIR)]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_info_command_prints_the_build(tmp_path):
    p = run_python(["-m", "esper_gate", "info"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"esper_gate build info ({PKG_DIR})" in p.stdout
    assert f"torch_version  {esper_gate.BUILD_INFO['torch_version']}" in p.stdout
    assert f"running torch  {torch.__version__} (CUDA {torch.version.cuda})" in p.stdout
    assert re.search(r"^  GPU            \S", p.stdout, re.M)
    assert "torch.ops.esper_gate.sync" in p.stdout
    assert "MISMATCH" not in p.stdout


def copy_package(dest, built: bool):
    """A copy of the package under test in dest/esper_gate: with its build, or laid out like a fresh checkout."""
    os.makedirs(os.path.join(dest, "esper_gate"))
    for path in glob.glob(os.path.join(PKG_DIR, "*.py")):
        if built or os.path.basename(path) != "_build_info.py":
            shutil.copy(path, os.path.join(dest, "esper_gate"))
    if built:
        shutil.copy(esper_gate._locate.native_library(PKG_DIR), os.path.join(dest, "esper_gate"))
    return os.path.join(dest, "esper_gate")


OTHER_CUDA = "11.8" if torch.version.cuda != "11.8" else "12.6"


@pytest.mark.parametrize("field, value, says", [
    ("torch_cuda", OTHER_CUDA, f"built for a torch with CUDA {OTHER_CUDA}, but the running torch has"),
    ("torch_version", "2.0.0", f"built for torch 2.0.0, but torch {torch.__version__} is running"),
])
def test_info_reports_a_mismatch_and_exits_nonzero(tmp_path, field, value, says):
    pkg = copy_package(tmp_path, built=True)
    info = dict(esper_gate.BUILD_INFO, **{field: value})
    with open(os.path.join(pkg, "_build_info.py"), "w") as f:
        f.write(f"BUILD_INFO = {info!r}\n")
    p = run_python(["-m", "esper_gate", "info"], cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"esper_gate build info ({pkg})" in p.stdout  # the info still prints, from the copy
    assert f"{field:14s} {value}" in p.stdout
    assert f"running torch  {torch.__version__}" in p.stdout
    assert "ops            not loaded" in p.stdout
    assert "MISMATCH: " + says in p.stdout
    assert "fix: rebuild esper_gate" in p.stdout and "pip install --no-build-isolation" in p.stdout
    p = run_python(["-c", "import esper_gate"], cwd=tmp_path)
    assert p.returncode != 0 and "BuildMismatchError" in p.stderr and says in p.stderr, p.stderr


def test_unbuilt_source_tree_names_the_copy_it_hides(tmp_path):
    src = copy_package(tmp_path, built=False)
    p = run_python(["-c", "import esper_gate"], cwd=tmp_path)
    assert p.returncode != 0
    assert "SourceTreeShadowsError" in p.stderr, p.stderr
    assert f"from the source tree {src}, which is not built" in p.stderr
    assert f"the built esper_gate installed at {PKG_DIR}" in p.stderr
    assert "run from another directory" in p.stderr and "pip install --no-build-isolation -e ." in p.stderr
    # info answers: it reports the installed copy, which is what other directories import
    p = run_python(["-m", "esper_gate", "info"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith(f"note: esper_gate was imported from the source tree {src}")
    assert f"esper_gate build info ({PKG_DIR})" in p.stdout
    assert "torch.ops.esper_gate.sync" in p.stdout


def test_unbuilt_tree_alone_says_it_was_never_built(tmp_path):
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    if os.path.isdir(os.path.join(torch_site, "esper_gate")):
        pytest.skip(f"esper_gate is installed next to torch in {torch_site}, so no interpreter that has "
                    f"this torch lacks an installed esper_gate")
    copy_package(tmp_path, built=False)
    # -S: no site-packages (and no editable-install hook); torch comes in through PYTHONPATH
    env = dict(os.environ, PYTHONPATH=torch_site)
    p = subprocess.run([sys.executable, "-S", "-m", "esper_gate", "info"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "(none: esper_gate/_build_info.py is missing, so this copy was never built)" in p.stdout
    assert "PROBLEM: esper_gate at" in p.stdout and "it was never built" in p.stdout


def source_copy(tmp_path):
    """setup.py and what it reads, without any build output."""
    dest = tmp_path / "src"
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt"):
        shutil.copy(os.path.join(SRC_ROOT, name), dest)
    shutil.copytree(os.path.join(SRC_ROOT, "csrc"), dest / "csrc")
    copy_package(dest, built=False)
    return dest


def test_metadata_commands_write_no_build_info_and_the_sdist_is_complete(tmp_path):
    src = source_copy(tmp_path)
    for cmd in (["egg_info"], ["sdist", "-d", str(tmp_path / "dist")]):
        p = run_python(["setup.py", "-q", *cmd], cwd=src)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "esper_gate setup: metadata only" in p.stdout
        assert not (src / "esper_gate" / "_build_info.py").exists(), f"setup.py {cmd[0]} wrote build info"
    with tarfile.open(glob.glob(str(tmp_path / "dist" / "esper_gate-*.tar.gz"))[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src / "csrc") for f in fs}
    assert wanted and wanted <= names, f"the sdist lacks {sorted(wanted - names)}"
    assert "esper_gate/_locate.py" in names and "esper_gate/_build_info.py" not in names


def test_a_build_against_another_torch_than_the_target_is_refused(tmp_path):
    # What pip's build isolation does: the target interpreter, with PYTHONPATH
    # pointing at an environment that holds another torch.
    src = source_copy(tmp_path)
    overlay = tmp_path / "pip-build-env-test" / "overlay"
    (overlay / "torch").mkdir(parents=True)
    (overlay / "torch" / "__init__.py").write_text("__version__ = '2.0.0'\nclass version:\n    cuda = None\n")
    env = dict(os.environ, PYTHONPATH=str(overlay), PYTHONNOUSERSITE="1")
    p = subprocess.run([sys.executable, "setup.py", "bdist_wheel"], cwd=src, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert f"would compile against torch 2.0.0 at {overlay / 'torch'}" in p.stderr, p.stderr
    assert "pip install --no-build-isolation ." in p.stderr
    assert not (src / "esper_gate" / "_build_info.py").exists()
