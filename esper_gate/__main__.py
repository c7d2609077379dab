"""Command line: ``python -m esper_gate {info,smoke,...}``."""
from __future__ import annotations

import argparse
import sys


def cmd_info(_args) -> int:
    import torch

    import esper_gate

    info = esper_gate.BUILD_INFO
    print("esper_gate build info")
    for key in ("version", "build", "torch_version", "torch_cuda", "cuda_archs", "nvcc", "cxx11_abi",
                "python", "built_at"):
        print(f"  {key:14s} {info.get(key)}")
    print(f"  {'running torch':14s} {torch.__version__} (CUDA {torch.version.cuda}, "
          f"GPU available: {torch.cuda.is_available()})")
    ops = [name for name in ("pack", "decode", "sync") if hasattr(torch.ops.esper_gate, name)]
    print(f"  {'ops':14s} {', '.join('torch.ops.esper_gate.' + n for n in ops)}")
    return 0


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
