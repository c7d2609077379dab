"""Command line: ``python -m esper_gate {info,smoke,...}``."""
from __future__ import annotations

import argparse
import os
import sys


INFO_KEYS = ("version", "build", "torch_version", "torch_cuda", "cuda_archs", "nvcc", "nccl", "cxx11_abi",
             "abi", "python", "built_at")


def cmd_info(_args) -> int:
    """Print what is known even when ``import esper_gate`` would refuse; exit 1 on a problem."""
    import torch

    import esper_gate
    from esper_gate import _locate, build_info

    problem = esper_gate._BUILD_PROBLEM
    pkg_dir = os.path.dirname(os.path.abspath(esper_gate.__file__))
    if isinstance(problem, build_info.SourceTreeShadowsError):
        # Report the installed copy: it is what `import esper_gate` gets from any other directory.
        print(f"note: {problem}")
        print(f"      what follows describes the installed copy at {problem.installed}\n")
        pkg_dir = problem.installed
        problem = None
    info = build_info.read(pkg_dir)
    print(f"esper_gate build info ({pkg_dir})")
    if info is None:
        print("  (none: esper_gate/_build_info.py is missing, so this copy was never built)")
    for key in INFO_KEYS if info else ():
        print(f"  {key:14s} {info.get(key)}")
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "none visible to torch")
    print(f"  {'running torch':14s} {torch.__version__} (CUDA {torch.version.cuda}) at "
          f"{os.path.dirname(torch.__file__)}")
    print(f"  {'GPU':14s} {gpu}")
    found = build_info.mismatches(info) if info else []
    library = _locate.native_library(pkg_dir)
    if info and not found and library and problem is None:
        if not hasattr(torch.ops.esper_gate, "sync"):  # not yet loaded: the installed copy
            torch.ops.load_library(library)
        ops = [name for name in ("pack", "decode", "sync") if hasattr(torch.ops.esper_gate, name)]
        print(f"  {'ops':14s} {', '.join('torch.ops.esper_gate.' + n for n in ops) or 'none registered'}")
    elif library is None:
        print(f"  {'ops':14s} none: there is no native library (esper_gate/_C) in {pkg_dir}")
    else:
        print(f"  {'ops':14s} not loaded: {library} was not built for this torch")
    for line in nccl_lines():
        print(f"  {line}")
    if found:
        print("\nMISMATCH: " + "; ".join(found))
        print(f"fix: {build_info.REBUILD_HINT}")
        return 1
    if problem is not None:
        print(f"\nPROBLEM: {problem}")
        return 1
    return 0


def nccl_lines() -> list[str]:
    """The NCCL library the gate's own communicator would use, or why there is none."""
    from esper_gate import _nccl

    try:
        info = _nccl.library_info()
    except Exception as e:  # noqa: BLE001 - info reports, it does not fail on this
        return [f"{'gate NCCL':14s} unknown: {type(e).__name__}: {e}"]
    def v(t):
        return ".".join(map(str, t)) if t else "none"

    # Two versions, and they may differ: torch.cuda.nccl.version() is the nccl.h torch was
    # built with; the library loaded is whatever nvidia-nccl wheel is installed now.
    lines = [f"{'torch NCCL':14s} {v(info['torch_version'])} (torch's build-time nccl.h)"]
    if info["path"]:
        lines.append(f"{'loaded NCCL':14s} {info['path']} (version {v(info['version'])}; this build's header "
                     f"{v(info['header_version'])}, the gate needs >= {v(info['min_version'])})")
    if info["differs"]:
        lines.append(f"{'NCCL versions':14s} differ: {info['differs']}")
    lines.append(f"{'gate NCCL use':14s} " + ("yes" if info["usable"] else f"no: {info['why']}"))
    return lines


COMMANDS = {
    "info": "print the build info",
    "demo": "the demo: real ranks, divergent seed lifecycles, one sync per epoch (--help)",
    "bench": "a quick side-by-side benchmark against the old designs (--help)",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m esper_gate {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        argparse.ArgumentParser(prog="python -m esper_gate info").parse_args(rest)
        return cmd_info(None)
    if cmd == "demo":
        from .tools.demo import main as demo_main

        return demo_main(rest)
    from .tools.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
