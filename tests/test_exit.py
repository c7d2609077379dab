"""A process that exits with a GateSync still open exits cleanly.

Before esper_gate stopped its watcher threads at exit (gate_sync._stop_watchers_at_exit),
such a process was sometimes killed by SIGABRT ("terminate called without an active
exception"): the watcher (now its store thread), a daemon thread, came back from a c10d Store request after the
interpreter had begun to finalize, and CPython ended it with pthread_exit() inside pybind11's
noexcept ``~gil_scoped_release``. Here each heartbeat first blocks 20 ms in a Store request
(with the GIL released), so the watcher is nearly always inside one when the rank exits: before
the fix about two rank pairs in three aborted; 4 pairs all passing by chance was ~1 %.

The ranks are fresh interpreters that end normally (multiprocessing children end with
os._exit, which skips the interpreter's teardown and with it the bug).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper_gate._spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 4
RANK_TIMEOUT_S = 60

RANK = textwrap.dedent('''
    import os, sys
    from dataclasses import dataclass, field
    from datetime import timedelta

    import torch.distributed as dist

    import esper_gate._watcher as watcher
    from esper_gate import kasmina

    # Every heartbeat: a store request that blocks 20 ms with the GIL released, then the write,
    # both on the gate's store thread (the watcher's thread makes no store request itself).
    watcher.HEARTBEAT_INTERVAL_S = 0.0
    watcher.WATCH_POLL_S = 0.0005
    publish = watcher.Watcher._publish

    def slow(store):
        try:
            store.wait(["esper_gate-test-never"], timedelta(seconds=0.02))
        except Exception:
            pass

    def slow_publish(self):
        self._worker.submit(slow)
        return publish(self)

    watcher.Watcher._publish = slow_publish

    @dataclass
    class Result:
        gate: int
        passed: bool
        checks_failed: list = field(default_factory=list)
        message: str = ""

    class Slot:
        slot_id = "r0c0"
        is_active = True
        stage = 3

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    [outcome] = kasmina.gate_round([Slot()], [Result(2, True)], timeout=20)
    assert outcome.passed and not outcome.diverged, outcome
    if os.environ["MODE"] == "destroy":
        dist.destroy_process_group()   # the world goes; the cached gate stays open
    print(f"rank {rank} done", flush=True)
    # exit with the cached GateSync (its group and watcher) still open
''')


def run_pair(tmp_path: Path, mode: str) -> list[tuple[int, str]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=dict(os.environ, RANK=str(r), INIT=init, MODE=mode,
                                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
             for r in range(2)]
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=RANK_TIMEOUT_S)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(PAIRS * 2 * RANK_TIMEOUT_S + 30)
@pytest.mark.parametrize("mode", ["open", "destroy"])
def test_exit_with_an_open_cached_gate_is_clean(tmp_path, mode):
    for pair in range(PAIRS):
        for rank, (rc, text) in enumerate(run_pair(tmp_path, mode)):
            assert rc == 0 and f"rank {rank} done" in text and "terminate called" not in text, \
                f"pair {pair}, rank {rank} exited {rc}:\n{text[-2000:]}"
