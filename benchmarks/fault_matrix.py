"""Fault matrix: what every rank sees when one rank misbehaves, and how long it takes.

On a machine with N >= 2 GPUs, over NCCL:

    torchrun --nproc-per-node N --monitor-interval 30 benchmarks/fault_matrix.py

(--monitor-interval keeps torchrun from stopping the survivors of the SIGKILL
case, the last one, before they report; torchrun then reports the killed rank
as failed, which is that case working.) Without GPUs, as a dry run:

    python benchmarks/fault_matrix.py --spawn 3 --backend gloo
    python benchmarks/fault_matrix.py --spawn 3 --backend abortable   # fails like NCCL
    python benchmarks/fault_matrix.py --spawn 3 --backend owned-double   # the gate's own communicator, as a CPU double

Cases, each on a fresh GateSync over 4 slots; the last rank misbehaves:
    agree       nobody: every rank sees decisions [T, T, T, T]
    slow        it calls timeout/3 late: every rank still agrees
    bad_input   rank 1 passes stage 99: GateInputError there, GatePeerInputError naming 1 elsewhere
    divergence  it holds stage 4 in slot 2: slot 2 is blocked on every rank, the others pass
    skip        it never makes call 2: the others get GateTimeoutError naming it
    sigkill     it is SIGKILLed before call 2: the others get GateTimeoutError naming it
One line per case (printed by rank 0) says what each rank saw and after how
many seconds; a case that does not match its expectation is marked FAIL.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time

CASES = ("agree", "slow", "bad_input", "divergence", "skip", "sigkill")
SLOTS = 4


def _outcome(gs, votes, stages, targets) -> dict:
    import esper_gate

    t0 = time.monotonic()
    try:
        res = gs(votes, stages, targets)
        res.raise_if_diverged()
        return {"saw": f"decisions {res.host_decisions()}", "s": time.monotonic() - t0}
    except esper_gate.GateDivergenceError as e:
        rep = e.report
        return {"saw": f"GateDivergenceError slots {[d.slot for d in rep.diverged_slots]}, "
                       f"decisions {res.host_decisions() if rep.header_ok else 'none'}", "s": time.monotonic() - t0}
    except esper_gate.GateTimeoutError as e:
        return {"saw": f"GateTimeoutError missing {e.missing_ranks}", "s": time.monotonic() - t0}
    except esper_gate.GatePeerInputError as e:
        return {"saw": f"GatePeerInputError ranks {e.ranks}", "s": time.monotonic() - t0}
    except esper_gate.GateError as e:
        return {"saw": f"{type(e).__name__}", "s": time.monotonic() - t0}


def _expected(case: str, rank: int, world: int) -> str:
    last = world - 1
    return {
        "agree": "decisions [True, True, True, True]",
        "slow": "decisions [True, True, True, True]",
        "bad_input": "GateInputError" if rank == 1 else "GatePeerInputError ranks [1]",
        "divergence": "GateDivergenceError slots [2], decisions [True, True, False, True]",
        "skip": "skipped" if rank == last else f"GateTimeoutError missing [{last}]",
        "sigkill": "killed" if rank == last else f"GateTimeoutError missing [{last}]",
    }[case]


def run_case(case: str, rank: int, world: int, timeout_s: float, backend: str | None, device) -> dict:
    import esper_gate

    last = world - 1
    if backend == "owned-double":
        import owned_double  # tests/owned_double.py: the owned NCCL communicator's CPU double

        gs = esper_gate.GateSync(SLOTS, timeout=timeout_s, device=device, _owned=owned_double)
    else:
        gs = esper_gate.GateSync(SLOTS, timeout=timeout_s, backend=backend, device=device)
    ok = [1] * SLOTS, [3] * SLOTS, [4] * SLOTS
    gs(*ok).host_decisions()  # call 1: everyone
    votes, stages, targets = ok
    if case == "slow" and rank == last:
        time.sleep(timeout_s / 3)
    if case == "bad_input" and rank == 1:
        stages = [3, 3, 99, 3]
    if case == "divergence" and rank == last:
        stages = [3, 3, 4, 3]
    if case == "skip" and rank == last:
        time.sleep(timeout_s + 3)  # never makes call 2
        gs.close()
        return {"saw": "skipped", "s": 0.0}
    if case == "sigkill" and rank == last:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    out = _outcome(gs, votes, stages, targets)
    gs.close()
    return out


def rank_main(rank: int, world: int, timeout_s: float, backend: str | None, cases) -> bool:
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    if backend in ("abortable", "owned-double"):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    if backend == "abortable":
        import nccl_like

        nccl_like.register()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    store = dist.PrefixStore("fault_matrix/", _get_default_store())
    all_ok = True
    for case in cases:
        try:
            mine = run_case(case, rank, world, timeout_s, backend, device)
        except Exception as e:  # noqa: BLE001 - reported in the line, never a hang
            mine = {"saw": f"raised {type(e).__name__}: {str(e)[:120]}", "s": 0.0}
        store.set(f"{case}/{rank}", json.dumps(mine))
        if rank != 0:
            continue
        seen = {}
        for r in range(world):
            if case == "sigkill" and r == world - 1:
                seen[r] = {"saw": "killed", "s": 0.0}
                continue
            try:
                store.wait([f"{case}/{r}"], datetime.timedelta(seconds=timeout_s * 3 + 30))
                seen[r] = json.loads(store.get(f"{case}/{r}").decode())
            except Exception:  # noqa: BLE001
                seen[r] = {"saw": "no report", "s": 0.0}
        good = all(seen[r]["saw"] == _expected(case, r, world) for r in range(world))
        all_ok &= good
        cells = "; ".join(f"rank {r}: {seen[r]['saw']} ({seen[r]['s']:.2f} s)" for r in range(world))
        print(f"{'PASS' if good else 'FAIL'} {case:<10} {cells}", flush=True)
    return all_ok


def _spawned(rank, world, timeout_s, backend, cases):
    return rank_main(rank, world, timeout_s, backend, cases)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("nccl", "gloo", "abortable", "owned-double"), default=None,
                    help="backend of the gate's group (default: nccl with GPUs, else gloo)")
    ap.add_argument("--timeout", type=float, default=5.0, help="GateSync timeout in seconds (default 5)")
    ap.add_argument("--spawn", type=int, default=0, metavar="N",
                    help="start N local ranks here instead of running under torchrun")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = ap.parse_args(argv)
    import torch

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; expected some of {list(CASES)}")
    cases.sort(key=CASES.index)  # sigkill last: the job cannot go on without that rank
    default_backend = "nccl" if backend == "nccl" else "gloo"
    print(f"fault matrix: backend {backend}, timeout {args.timeout} s, cases {','.join(cases)}", flush=True)
    if args.spawn:
        from esper_gate._spawn import spawn_ranks

        world = args.spawn
        if world < 2:
            ap.error("--spawn needs at least 2 ranks")
        dead = (world - 1,) if "sigkill" in cases else ()
        results = spawn_ranks(_spawned, world, args.timeout, backend, cases, backend=default_backend,
                              timeout=60 + len(cases) * (4 * args.timeout + 30), expect_dead=dead)
        return 0 if results[0].value else 1
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if default_backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(default_backend)
    ok = rank_main(rank, world, args.timeout, backend, cases)
    return 0 if ok or rank != 0 else 1


if __name__ == "__main__":
    sys.exit(main())
