"""Where esper_gate was imported from, and whether an unbuilt source tree hides a built copy.

Standard library only and no relative imports: tests/conftest.py loads this file
by path, before anything imports the package.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys

PACKAGE = "esper_gate"


def native_library(pkg_dir: str) -> str | None:
    """The built ``_C`` extension in ``pkg_dir``, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(pkg_dir, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def is_built(pkg_dir: str) -> bool:
    return native_library(pkg_dir) is not None and os.path.exists(os.path.join(pkg_dir, "_build_info.py"))


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def other_copies(pkg_dir: str) -> list[str]:
    """Every other esper_gate package directory this interpreter could import, in sys.path order."""
    found: list[str] = []

    def add(spec) -> None:
        locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
        for loc in locations:
            if os.path.isdir(loc) and not _same(loc, pkg_dir) and not any(_same(loc, f) for f in found):
                found.append(loc)

    parent = os.path.dirname(os.path.abspath(pkg_dir))
    for entry in sys.path:
        if os.path.isdir(entry or ".") and _same(entry or ".", parent):
            continue
        add(importlib.machinery.PathFinder.find_spec(PACKAGE, [entry]))
    # An editable install of another checkout answers through its own finder on sys.meta_path.
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            add(finder.find_spec(PACKAGE, None))
        except Exception:  # a third-party finder that does not expect this query
            continue
    return found


def shadowed_copy(pkg_dir: str) -> str | None:
    """A built copy that ``pkg_dir`` hides because ``pkg_dir`` itself was never built, or None."""
    if is_built(pkg_dir):
        return None
    for other in other_copies(pkg_dir):
        if is_built(other):
            return other
    return None
