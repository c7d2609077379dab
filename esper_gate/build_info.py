"""Build information recorded by setup.py, and the import-time torch check."""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "rebuild esper_gate against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from the source tree "
    "(or `bash scripts/run.sh test`, which sets up .venv and builds)"
)


class BuildMismatchError(ImportError):
    """esper_gate's native library was built for a different torch."""


def load() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError as e:
        raise BuildMismatchError(
            f"esper_gate has no build info (esper_gate/_build_info.py is missing): it was never "
            f"built. {REBUILD_HINT}") from e
    return dict(BUILD_INFO)


def _base(version: str) -> str:
    return version.split("+")[0]


def check(info: dict) -> None:
    built = info.get("torch_version", "?")
    running = torch.__version__
    if _base(built) != _base(running) or (torch.version.cuda is None) != (info.get("torch_cuda") is None):
        raise BuildMismatchError(
            f"esper_gate was built for torch {built} (CUDA {info.get('torch_cuda')}), "
            f"but torch {running} (CUDA {torch.version.cuda}) is running: {REBUILD_HINT}")
