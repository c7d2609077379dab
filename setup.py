"""Build esper_gate's native ops against the torch that is installed.

Build with `pip install --no-build-isolation .` (or `-e .`) so the extension
compiles against the torch you will run with. The CUDA kernels are built when
torch has CUDA and nvcc is found, the CPU kernels only otherwise; every choice
is printed. Knobs (all optional):

  ESPER_GATE_FORCE_CUDA=1   fail unless the CUDA kernels can be built
  ESPER_GATE_FORCE_CPU=1    build the CPU kernels only
  ESPER_GATE_CUDA_ARCHS     arch list, e.g. "9.0" (else TORCH_CUDA_ARCH_LIST,
                            else "8.0;9.0+PTX": A100, H100/H200, PTX for newer)
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import datetime
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# The oldest CPython the one abi3 wheel serves (python_module.cpp uses only the limited API).
LIMITED_API_TAG, LIMITED_API_HEX = "cp310", "0x030A0000"
SOURCES = ["csrc/ops.cpp", "csrc/python_module.cpp", "csrc/wire_constants.cpp", "csrc/cpu/gate_kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda/gate_kernels.cu"]
# The gate's own NCCL communicator (CUDA build only): compiled against the nccl.h of torch's
# nvidia-nccl wheel, never linked; it finds the libnccl.so.2 torch loaded at run time.
NCCL_SOURCES = ["csrc/nccl/nccl_comm.cpp"]
# Commands that compile; the others (sdist, egg_info, dist_info, --version...) only need metadata.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "bdist", "install", "develop",
                  "editable_wheel"}
NO_BUILD_ISOLATION = (
    "build against the torch you will run: install torch (and setuptools, wheel, ninja) into your "
    "environment, then `pip install --no-build-isolation .` (or `-e .`)")


def say(msg):
    print(f"esper_gate setup: {msg}", flush=True)


def builds_extension(argv) -> bool:
    return any(arg in BUILD_COMMANDS for arg in argv[1:])


def torch_of_target_interpreter():
    """Where the torch of ``sys.executable`` lives once pip's build overlay is taken away, or None.

    pip's isolated build runs the target interpreter with PYTHONPATH pointing at
    a temporary pip-build-env-* directory (and PYTHONNOUSERSITE set); without
    those the interpreter sees the environment the package is being installed
    into. A PYTHONPATH of the user's own is kept: their torch may live there.
    """
    env = dict(os.environ)
    paths = env.pop("PYTHONPATH", "").split(os.pathsep)
    kept = [p for p in paths if p and "pip-build-env-" not in p]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    if len(kept) < len([p for p in paths if p]):
        env.pop("PYTHONNOUSERSITE", None)
    code = "import importlib.util as u; s = u.find_spec('torch'); print(s.origin if s else '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(ROOT) or "/",
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return os.path.dirname(out) if out else None


def isolated_build_problem(torch):
    """Why this build would compile against a torch other than the one that will run it, or None."""
    if os.environ.get("ESPER_GATE_ALLOW_ISOLATED_BUILD") == "1":
        return None
    here = os.path.dirname(os.path.abspath(torch.__file__))
    markers = ("pip-build-env-", "build-env-", os.sep + "builds-v0" + os.sep)  # pip, pypa/build, uv
    target = torch_of_target_interpreter()
    if target == "unknown":
        target = here
    if target is not None and os.path.realpath(target) == os.path.realpath(here) and \
            not any(m in here for m in markers):
        return None
    where = f"torch {torch.__version__} at {here}"
    runs = (f"{sys.executable} outside the build runs the torch at {target}" if target
            else f"{sys.executable} outside the build has no torch at all")
    return (f"this build would compile against {where}, a build-isolation environment, but {runs}. "
            f"esper_gate refuses to import against a torch other than the one it was built with, so: "
            f"{NO_BUILD_ISOLATION}. (To build in an isolated environment anyway, for a wheel that will "
            f"be installed next to exactly this torch, set ESPER_GATE_ALLOW_ISOLATED_BUILD=1.)")


def import_torch_for_build():
    try:
        import torch
    except ImportError:
        target = torch_of_target_interpreter()
        if target and target != "unknown":
            sys.exit(f"esper_gate setup: this build cannot see the torch at {target}: pip's build isolation "
                     f"hides it (a plain `pip install .`), and esper_gate compiles against the torch it "
                     f"will run with: {NO_BUILD_ISOLATION}")
        sys.exit(f"esper_gate setup: torch is not importable by {sys.executable}, and esper_gate compiles "
                 f"against the torch it will run with: {NO_BUILD_ISOLATION}")
    problem = isolated_build_problem(torch)
    if problem:
        sys.exit(f"esper_gate setup: {problem}")
    return torch


def find_nvcc(cpp_extension):
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home, os.path.join(home, "bin", "nvcc")
    return home, None


def nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else "unknown"


def choose_build(torch, cpp_extension):
    force_cuda = os.environ.get("ESPER_GATE_FORCE_CUDA", "") == "1"
    force_cpu = os.environ.get("ESPER_GATE_FORCE_CPU", "") == "1"
    if force_cuda and force_cpu:
        sys.exit("esper_gate setup: ESPER_GATE_FORCE_CUDA=1 and ESPER_GATE_FORCE_CPU=1 contradict each other")
    home, nvcc = find_nvcc(cpp_extension)
    if force_cpu:
        return False, "ESPER_GATE_FORCE_CPU=1", home, nvcc
    if torch.version.cuda and nvcc:
        return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is {nvcc}", home, nvcc
    why = (
        f"torch {torch.__version__} has no CUDA" if not torch.version.cuda
        else f"no nvcc found (CUDA_HOME={home!r}; set CUDA_HOME to the toolkit)"
    )
    if force_cuda:
        sys.exit(f"esper_gate setup: ESPER_GATE_FORCE_CUDA=1 but {why}")
    return False, why, home, nvcc


def find_nccl_include(torch):
    """(the include dir of the nccl.h that torch's NCCL wheel ships, its version), or (None, why not).

    torch's CUDA wheels depend on nvidia-nccl-cu*, installed next to torch as
    ``nvidia/nccl/{include,lib}``; that header is the one of the library torch
    loads. Looked up beside torch first, then wherever ``nvidia.nccl`` imports from.
    """
    import importlib.util
    import re

    import glob

    nvidia = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), "nvidia")
    candidates = [os.path.join(nvidia, "nccl", "include")] + sorted(
        os.path.dirname(h) for h in glob.glob(os.path.join(nvidia, "*", "include", "nccl.h")))
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
        candidates += [os.path.join(p, "include") for p in (spec.submodule_search_locations or [])] if spec else []
    except (ImportError, ValueError):
        pass
    for inc in candidates:
        header = os.path.join(inc, "nccl.h")
        if os.path.exists(header):
            with open(header) as f:
                text = f.read()
            parts = [re.search(rf"#define NCCL_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
            version = ".".join(m.group(1) for m in parts) if all(parts) else "unknown"
            return inc, version
    return None, (f"no nccl.h in {' or '.join(dict.fromkeys(candidates))} (torch's nvidia-nccl wheel is not "
                  f"installed), so the gate's own NCCL communicator is not built")


def build_info_text(torch, with_cuda, archs, nvcc, nccl=None):
    info = {
        "version": "0.1.0",
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": "cuda" if with_cuda else "cpu",
        "cuda_archs": archs if with_cuda else None,
        "nvcc": nvcc_version(nvcc) if with_cuda else None,
        # "2.30.7 (<include dir>)" when csrc/nccl was built, else why it was not.
        "nccl": nccl,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "abi": f"abi3 (CPython >= {LIMITED_API_TAG[2]}.{LIMITED_API_TAG[3:]})",
        "python": sys.version.split()[0],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return ("# Written by build_ext when the native library is built; checked by esper_gate at import.\n"
            f"BUILD_INFO = {info!r}\n")


def extensions_and_build_ext():
    """(ext_modules, build_ext class): the real ones when compiling, placeholders for metadata only."""
    if not builds_extension(sys.argv):
        say(f"metadata only ({' '.join(sys.argv[1:]) or 'no command'}): torch is not needed; the build "
            f"settings are chosen and printed when the extension is built")
        from setuptools.command.build_ext import build_ext

        return [Extension("esper_gate._C", SOURCES + CUDA_SOURCES + NCCL_SOURCES, py_limited_api=True)], build_ext

    torch = import_torch_for_build()
    from torch.utils import cpp_extension

    with_cuda, why, home, nvcc = choose_build(torch, cpp_extension)
    say(f"{'CUDA' if with_cuda else 'CPU-only'} build: {why}")
    sources = list(SOURCES)
    cxx_flags = ["-O2", f"-DPy_LIMITED_API={LIMITED_API_HEX}"]
    archs = None
    nccl = "none: a CPU-only build"
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        archs = os.environ.get("ESPER_GATE_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        say(f"CUDA archs: {archs}; nvcc: {nvcc_version(nvcc)}")
        sources += CUDA_SOURCES
        nccl_include, nccl_version = find_nccl_include(torch)
        if nccl_include:
            nccl = f"{nccl_version} ({nccl_include})"
            sources += NCCL_SOURCES
            include_dirs.append(nccl_include)
            say(f"the gate's own NCCL communicator: built against nccl.h {nccl}, not linked")
        else:
            nccl = f"none: {nccl_version}"
            say(f"the gate's own NCCL communicator: skipped, {nccl_version}")
    info_text = build_info_text(torch, with_cuda, archs, nvcc, nccl)
    say(f"torch {torch.__version__} at {os.path.dirname(torch.__file__)} (cxx11 abi "
        f"{bool(torch._C._GLIBCXX_USE_CXX11_ABI)}), wheel tag {LIMITED_API_TAG}-abi3 "
        f"(Py_LIMITED_API={LIMITED_API_HEX}), MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}, "
        f"ninja={'yes' if shutil.which('ninja') else 'no'}")

    class BuildExtWithInfo(cpp_extension.BuildExtension):
        """Writes esper_gate/_build_info.py next to the library it describes, only when building it."""

        def run(self):
            super().run()
            targets = [os.path.join(self.build_lib, "esper_gate")]  # what the wheel packs
            if self.inplace:  # `build_ext --inplace` and editable installs import the source tree
                targets.append(os.path.join(ROOT, "esper_gate"))
                self.remove_stale_libraries()
            for pkg_dir in targets:
                if os.path.isdir(pkg_dir):
                    with open(os.path.join(pkg_dir, "_build_info.py"), "w") as f:
                        f.write(info_text)
                    say(f"wrote {os.path.join(pkg_dir, '_build_info.py')}")

        def remove_stale_libraries(self):
            # Python prefers _C.cpython-3XY-*.so to _C.abi3.so: a library left by an
            # older build would be imported instead of the one just built.
            import importlib.machinery

            built = self.get_ext_fullpath("esper_gate._C")
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(os.path.dirname(built), "_C" + suffix)
                if os.path.exists(path) and not os.path.samefile(path, built):
                    os.remove(path)
                    say(f"removed {path}, left by an earlier build")

    # -ldl: dl_iterate_phdr/dlopen/dlsym of csrc/nccl (in libc itself since glibc 2.34).
    kwargs = dict(include_dirs=include_dirs, py_limited_api=True,
                  extra_link_args=["-ldl"] if with_cuda else [])
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "esper_gate._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O2", "-lineinfo"]},
            **kwargs)
    else:
        ext = cpp_extension.CppExtension("esper_gate._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         **kwargs)
    return [ext], BuildExtWithInfo.with_options(use_ninja=bool(shutil.which("ninja")))


ext_modules, build_ext_class = extensions_and_build_ext()

setup(
    name="esper_gate",
    version="0.1.0",
    description="One fused, hang-proof cross-rank gate consensus op for Esper's seed slots",
    packages=find_packages(include=["esper_gate", "esper_gate.*"]),
    python_requires=">=3.10",
    # numpy: GateSync reads a CPU report through Tensor.numpy(), which needs it at run time.
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "numpy"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_class},
    # One wheel per torch + CUDA build serves every CPython from 3.10 on.
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}},
    zip_safe=False,
)
