"""Build information recorded at build time, and the import-time checks against it.

``preflight()`` answers, before the native library is loaded, whether it can be:
the package directory must hold a build (``_C`` and ``_build_info.py``, both
written by ``build_ext``), and that build must match the running torch, version
and CUDA version both. A library built for another torch fails with undefined
symbols at best, so a mismatch is refused with the fix instead.
"""
from __future__ import annotations

import os
import runpy
import sys

import torch

from . import _locate

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

REBUILD_HINT = (
    "rebuild esper_gate against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from the source tree "
    "(or `bash scripts/run.sh test`, which sets up .venv and builds)"
)


class BuildError(ImportError):
    """esper_gate's native library cannot be loaded; the message says why and what to do."""


class NotBuiltError(BuildError):
    """The imported esper_gate directory holds no build and no built copy is installed elsewhere."""


class SourceTreeShadowsError(BuildError):
    """An unbuilt source tree on sys.path hides the esper_gate that is installed."""

    def __init__(self, source: str, installed: str):
        self.source, self.installed = source, installed
        super().__init__(
            f"esper_gate was imported from the source tree {source}, which is not built, and it hides "
            f"the built esper_gate installed at {installed} (the source tree comes first on sys.path: "
            f"it is the current directory, or on PYTHONPATH). Either run from another directory, so that the installed copy is imported, "
            f"or build the source tree in place: `pip install --no-build-isolation -e .`")


class BuildMismatchError(BuildError):
    """esper_gate's native library was built for a different torch or CUDA version."""


def read(pkg_dir: str = PACKAGE_DIR) -> dict | None:
    """The build info in ``pkg_dir`` (read by path, so any copy can be inspected), or None."""
    path = os.path.join(pkg_dir, "_build_info.py")
    if not os.path.exists(path):
        return None
    return dict(runpy.run_path(path)["BUILD_INFO"])


def _base(version: str) -> str:
    return version.split("+")[0]


def mismatches(info: dict) -> list[str]:
    """How the build differs from the running torch; empty when it matches."""
    built, running = info.get("torch_version", "?"), torch.__version__
    built_cuda, running_cuda = info.get("torch_cuda"), torch.version.cuda
    found = []
    if _base(built) != _base(running):
        found.append(f"built for torch {built}, but torch {running} is running")
    if built_cuda != running_cuda:
        def flavour(v):
            return f"CUDA {v}" if v else "no CUDA (a CPU-only torch)"
        found.append(f"built for a torch with {flavour(built_cuda)}, but the running torch has {flavour(running_cuda)}")
    return found


def check(info: dict) -> None:
    found = mismatches(info)
    if found:
        raise BuildMismatchError(
            f"esper_gate was built for torch {info.get('torch_version', '?')} (CUDA {info.get('torch_cuda')}), "
            f"but torch {torch.__version__} (CUDA {torch.version.cuda}) is running: {'; '.join(found)}. "
            f"Fix: {REBUILD_HINT}")


def preflight(pkg_dir: str = PACKAGE_DIR) -> tuple[dict | None, BuildError | None]:
    """(build info, the reason the native library must not be loaded, or None)."""
    installed = _locate.shadowed_copy(pkg_dir)
    if installed is not None:
        return None, SourceTreeShadowsError(pkg_dir, installed)
    info = read(pkg_dir)
    if info is None or _locate.native_library(pkg_dir) is None:
        missing = "esper_gate/_build_info.py" if info is None else "the native library esper_gate/_C"
        return info, NotBuiltError(
            f"esper_gate at {pkg_dir} has no build ({missing} is missing) and no built copy is installed "
            f"elsewhere on sys.path: it was never built. Fix: {REBUILD_HINT}")
    try:
        check(info)
    except BuildMismatchError as e:
        return info, e
    return info, None


def info_command_is_running() -> bool:
    """True while ``python -m esper_gate info`` imports the package.

    runpy imports a package before it runs the package's __main__, so the
    package's import must not refuse a broken build when the command that was
    asked for is the one that reports it. While runpy imports, sys.argv[0] is
    "-m"; sys.orig_argv holds the command line as typed.
    """
    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", []))
    return any(argv[i:i + 3] == ["-m", "esper_gate", "info"] for i in range(len(argv)))
