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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper_gate")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the build info").set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
