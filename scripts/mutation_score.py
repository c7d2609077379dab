"""Per-module mutation score from mutmut's results (mutants/esper_gate/*.meta).

Run by scripts/mutation.sh after ``mutmut run``; reads the equivalent mutants
from scripts/mutation-equivalent.txt, one a line:

    <mutant name> | <its mutated line, as `mutmut show` prints it after "+"> | <why it is equivalent>

(several changed lines are joined with " / ").

An entry counts only while ``mutmut show`` still prints that line for that
name: an edit that renumbers a function's mutants makes the entry stale (said,
not applied) instead of hiding another mutant.

Score = (killed + timeout) / (mutants - equivalent). A timeout is a mutant that
made a test hang (pytest-timeout or mutmut's CPU limit): the suite noticed it.
"No tests" (no fast test runs the function) counts as surviving.

    python scripts/mutation_score.py [--survivors] [--min PCT] [module ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUIVALENT = os.path.join(ROOT, "scripts", "mutation-equivalent.txt")
MODULES = ["_verdict", "_failure", "_diagnosis", "_watcher", "_latch", "_inputs", "consensus", "report", "kasmina"]
# mutmut's exit codes (mutmut/stats.py)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", None: "not run",
          -11: "segfault", -9: "segfault"}


def _mutmut() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mutmut")
    return here if os.path.exists(here) else "mutmut"


def load_equivalent() -> dict[str, tuple[str, str]]:
    out = {}
    if not os.path.exists(EQUIVALENT):
        return out
    with open(EQUIVALENT, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # the mutated line may hold " | " itself (a bitwise or): the name is first, the reason last
            name, _, rest = line.partition(" | ")
            mutated, _, reason = rest.rpartition(" | ")
            if not (name.strip() and mutated.strip() and reason.strip()):
                raise SystemExit(f"{EQUIVALENT}:{n}: expected '<name> | <mutated line> | <reason>', got {line!r}")
            out[name.strip()] = (mutated.strip(), reason.strip())
    return out


def mutated_lines(name: str) -> str | None:
    """The '+' lines of ``mutmut show name``, stripped and joined with ' / ' (None: no such mutant)."""
    r = subprocess.run([_mutmut(), "show", name], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    plus = [ln[1:].strip() for ln in r.stdout.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(plus)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--survivors", action="store_true", help="list every surviving mutant")
    ap.add_argument("--min", type=float, default=None, help="exit 1 when a module other than _failure scores below")
    args = ap.parse_args()
    equivalent = load_equivalent()
    low = []
    print(f"{'module':12s} {'mutants':>7s} {'killed':>6s} {'timeout':>7s} {'survived':>8s} {'no tests':>8s} "
          f"{'equiv':>5s} {'score':>6s}")
    totals = [0] * 6
    stale = []
    for mod in args.modules:
        meta = os.path.join(ROOT, "mutants", "esper_gate", f"{mod}.py.meta")
        if not os.path.exists(meta):
            print(f"{mod:12s} (not run)")
            continue
        with open(meta, encoding="utf-8") as f:
            codes = json.load(f)["exit_code_by_key"]
        counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "equiv": 0}
        survivors = []
        for name, code in sorted(codes.items()):
            status = STATUS.get(code, "suspicious")
            if status in ("survived", "no tests") and name in equivalent:
                want, _why = equivalent[name]
                got = mutated_lines(name)
                if got == want:
                    counts["equiv"] += 1
                    continue
                stale.append((name, want, got))
            if status in ("killed", "timeout", "survived", "no tests"):
                counts[status] += 1
            else:
                counts["survived"] += 1  # suspicious, segfault, not run: not a kill
            if status not in ("killed", "timeout"):
                survivors.append((name, status))
        total = len(codes)
        tested = total - counts["equiv"]
        score = 100.0 * (counts["killed"] + counts["timeout"]) / tested if tested else 100.0
        for i, k in enumerate(("killed", "timeout", "survived", "no tests", "equiv")):
            totals[i + 1] += counts[k]
        totals[0] += total
        print(f"{mod:12s} {total:7d} {counts['killed']:6d} {counts['timeout']:7d} {counts['survived']:8d} "
              f"{counts['no tests']:8d} {counts['equiv']:5d} {score:5.1f}%")
        if args.min is not None and mod != "_failure" and score < args.min:
            low.append(mod)
        if args.survivors:
            for name, status in survivors:
                print(f"    {status:9s} {name}")
    tested = totals[0] - totals[5]
    if tested:
        print(f"{'all':12s} {totals[0]:7d} {totals[1]:6d} {totals[2]:7d} {totals[3]:8d} {totals[4]:8d} "
              f"{totals[5]:5d} {100.0 * (totals[1] + totals[2]) / tested:5.1f}%")
    for name, want, got in stale:
        print(f"stale equivalent entry {name}: listed as {want!r}, mutmut shows {got!r}; re-check it")
    if low:
        print(f"below {args.min}%: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
