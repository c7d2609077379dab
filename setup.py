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

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def say(msg):
    print(f"esper_gate setup: {msg}", flush=True)


def find_nvcc():
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


def choose_build():
    force_cuda = os.environ.get("ESPER_GATE_FORCE_CUDA", "") == "1"
    force_cpu = os.environ.get("ESPER_GATE_FORCE_CPU", "") == "1"
    if force_cuda and force_cpu:
        sys.exit("esper_gate setup: ESPER_GATE_FORCE_CUDA=1 and ESPER_GATE_FORCE_CPU=1 contradict each other")
    home, nvcc = find_nvcc()
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


def write_build_info(with_cuda, archs, nvcc):
    info = {
        "version": "0.1.0",
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": "cuda" if with_cuda else "cpu",
        "cuda_archs": archs if with_cuda else None,
        "nvcc": nvcc_version(nvcc) if with_cuda else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.version.split()[0],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.path.join(ROOT, "esper_gate", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; checked by esper_gate at import.\n")
        f.write(f"BUILD_INFO = {info!r}\n")
    return info


def extensions():
    with_cuda, why, home, nvcc = choose_build()
    say(f"{'CUDA' if with_cuda else 'CPU-only'} build: {why}")
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", "csrc/cpu/gate_kernels.cpp"]
    cxx_flags = ["-O2"]
    archs = None
    if with_cuda:
        archs = os.environ.get("ESPER_GATE_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        say(f"CUDA archs: {archs}; nvcc: {nvcc_version(nvcc)}")
        sources.append("csrc/cuda/gate_kernels.cu")
    include_dirs = [os.path.join(ROOT, "csrc")]
    info = write_build_info(with_cuda, archs, nvcc)
    say(f"torch {info['torch_version']} (cxx11 abi {info['cxx11_abi']}), MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}, ninja={'yes' if shutil.which('ninja') else 'no'}")
    if with_cuda:
        return [
            cpp_extension.CUDAExtension(
                "esper_gate._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O2", "-lineinfo"]},
            )
        ]
    return [
        cpp_extension.CppExtension(
            "esper_gate._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
    ]


setup(
    name="esper_gate",
    version="0.1.0",
    description="One fused, hang-proof cross-rank gate consensus op for Esper's seed slots",
    packages=find_packages(include=["esper_gate", "esper_gate.*"]),
    python_requires=">=3.10",
    install_requires=["torch"],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "numpy"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))},
    zip_safe=False,
)
