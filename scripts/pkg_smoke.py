"""Smoke test of an installed esper_gate wheel (run by scripts/check_packaging.sh).

Run it from a directory outside the checkout with the interpreter of a fresh
environment: it checks that esper_gate comes from that environment, then runs a
2-rank gloo sync and checks every rank's decisions.
"""
import os
import sys

import esper_gate
from esper_gate._spawn import spawn_ranks, values

# slot 0 and 1: every rank votes yes; slot 2: rank 1 votes no; slot 3: the ranks
# hold different stages (a divergence: never transitioned, reported).
VOTES = [[True, True, True, True], [True, True, False, True]]
STAGES = [[3, 3, 3, 4], [3, 3, 3, 6]]
TARGETS = [2, 2, 2, 3]
WANT_DECISIONS = [True, True, False, False]
WANT_DIVERGED = [False, False, False, True]


def rank_main(rank, world):
    import esper_gate as eg

    gate = eg.GateSync(num_slots=4, policy="unanimous", timeout=60)
    result = gate(VOTES[rank], STAGES[rank], TARGETS)
    return result.decisions.tolist(), result.diverged.tolist(), str(result.report())


def main() -> int:
    where = os.path.realpath(esper_gate.__file__)
    print(f"esper_gate {esper_gate.__version__} imported from {where} (python {sys.version.split()[0]}, "
          f"{esper_gate.BUILD_INFO['build']} build for torch {esper_gate.BUILD_INFO['torch_version']})")
    if not where.startswith(os.path.realpath(sys.prefix) + os.sep):
        print(f"FAIL: expected esper_gate from the environment {sys.prefix}")
        return 1
    results = values(spawn_ranks(rank_main, 2, timeout=180, pg_timeout_s=60))
    ok = True
    for rank, (decisions, diverged, report) in enumerate(results):
        print(f"rank {rank}: decisions {decisions}, diverged {diverged}")
        if decisions != WANT_DECISIONS or diverged != WANT_DIVERGED:
            print(f"FAIL: rank {rank} expected decisions {WANT_DECISIONS}, diverged {WANT_DIVERGED}\n{report}")
            ok = False
    print("2-rank gloo sync through the installed wheel: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
