"""Summary lines of benchmarks/gpu_check.sh from its step logs: one PASS/FAIL/SKIPPED/FIGURE per line.

    python benchmarks/gpu_summary.py cases:PREFIX:LOG ... bench:LOG ...

``cases:owned:OUT/owned_nccl.log`` turns every case line of gpu_owned_check.py or
gpu_gate_check.py ("PASS name (1.2s): text") into "PASS     owned:name  text".
``bench:OUT/bench.log`` turns the benchmark's target summary (after "[bench]
summary") into FIGURE lines: targets are reported, never asserted. A log that
is missing gives no line (its step's own line says why). CPU-tested in
tests/test_gpu_scripts.py.
"""
from __future__ import annotations

import os
import re
import sys

# "PASS name (1.2s): text", or "SKIPPED name: text" (a case that did not run has no time)
CASE = re.compile(r"^(PASS|FAIL|SKIPPED|FIGURE) (\w+)(?: \(([\d.]+)s\))?: (.*)$")
WIDTH = 300  # a summary line's text is cut here; the log has it whole


def line(word: str, name: str, text: str, seconds: str = "") -> str:
    text = " ".join(text.split())
    if len(text) > WIDTH:
        text = text[:WIDTH - 3] + "..."
    took = f"{seconds}s" if seconds else ""
    return f"{word:<8} {name:<28} {took:>6}  {text}"


def case_lines(text: str, prefix: str) -> list[str]:
    out = []
    for raw in text.splitlines():
        m = CASE.match(raw)
        if m:
            word, name, secs, rest = m.groups()
            out.append(line(word, f"{prefix}:{name}", rest, f"{float(secs):.0f}" if secs else ""))
    return out


def bench_lines(text: str) -> list[str]:
    out, on = [], False
    for raw in text.splitlines():
        if raw.startswith("[bench] summary"):
            on = True
            continue
        if on:
            if not raw.startswith("  ") or not raw.strip():
                break
            status, _, rest = raw.strip().partition(" ")
            out.append(line("FIGURE", "bench", f"{status} {rest.strip()}"))
    return out


def main(argv: list[str]) -> int:
    for spec in argv:
        kind, _, rest = spec.partition(":")
        if kind == "cases":
            prefix, _, path = rest.partition(":")
        elif kind == "bench":
            prefix, path = "", rest
        else:
            print(f"gpu_summary: unknown spec {spec!r} (expected cases:PREFIX:LOG or bench:LOG)", file=sys.stderr)
            return 2
        if not os.path.exists(path):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        for out in (case_lines(text, prefix) if kind == "cases" else bench_lines(text)):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
