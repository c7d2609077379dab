"""Store requests per gate call at the store's host, measured on one rank with a counting store.

One rank's watcher and verdict run against a dict store that counts every
request, for calls made at a steady rate (a training loop's gate calls, each
completing at once). Every rank does the same, so the host of the job's store
sees W times one rank's requests; the table scales the measured per-rank
figures by W (a model: the ranks are not run as threads beyond one).

    python benchmarks/store_load.py [--rate 100] [--seconds 4] [--watcher PATH]

Each call is confirmed as GateSync confirms it (``Verdict.confirm``), twice
over: with the fast path (a call completed within the window of the previous
one is applied with no store request) and without it (the design before: one
compare-and-set per call on every rank). ``--watcher PATH`` loads another
watcher module (e.g. the one of an earlier commit,
``git show bdec0fc:esper_gate/_watcher.py > /tmp/old_watcher.py``) to measure
its heartbeats the same way.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import time

import datetime

from esper_gate._failure import FailurePath
from esper_gate._latch import FailureLatch
from esper_gate._verdict import Verdict, fast_window

WORLDS = (2, 64, 1024, 65536)


class CountingStore:
    def __init__(self):
        self.data, self.count = {}, 0
        self.lock = threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.count += 1
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        with self.lock:
            self.count += 1
            return self.data[key]

    def check(self, keys):
        with self.lock:
            self.count += 1
            return all(k in self.data for k in keys)

    def compare_set(self, key, expected, desired):
        with self.lock:
            self.count += 1
            have = self.data.get(key)
            exp = expected.encode() if isinstance(expected, str) else expected
            if have is None and exp == b"" or have == exp:
                self.data[key] = desired.encode() if isinstance(desired, str) else desired
            return self.data.get(key, exp)


def load_watcher(path: str | None):
    if path is None:
        from esper_gate import _watcher
        return _watcher
    spec = importlib.util.spec_from_file_location("esper_gate._watcher_measured", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "esper_gate"
    spec.loader.exec_module(mod)
    return mod


def measure(watcher_mod, rate: float, seconds: float, fast: bool = True) -> dict:
    store = CountingStore()
    where = (store, 0, watcher_mod.Whereabouts(0)) if hasattr(watcher_mod, "Whereabouts") else (store, 0)
    w = watcher_mod.Watcher(store, 0, lambda call: None, whereabouts=where)
    request = getattr(w, "store_request")
    verdict = Verdict(lambda fn, *bound: request(fn), rank=0)
    latch = FailureLatch()
    if fast and hasattr(w, "applied_alone"):
        path = FailurePath(lambda: None, w, None, verdict, latch, datetime.timedelta(seconds=60), 0, 2, None)
        path.fast_s = fast_window(60.0)
        verdict._fast = path.applies_alone
    time.sleep(0.3)
    idle0 = store.count
    time.sleep(seconds)
    idle = (store.count - idle0) / seconds
    start, calls, cas = store.count, 0, 0
    t0 = time.monotonic()
    period = 1.0 / rate
    while time.monotonic() - t0 < seconds:
        calls += 1
        w.begin(calls, time.monotonic() + 60)
        w.end_host(calls)
        before = store.count
        verdict.confirm(calls, latch)     # the call's verdict on the caller's path
        cas += store.count - before
        time.sleep(max(period - (time.monotonic() - t0 - (calls - 1) * period), 0))
    elapsed = time.monotonic() - t0
    busy_total = store.count - start
    w.close()
    return {"idle_per_s": idle, "calls": calls, "calls_per_s": calls / elapsed,
            "verdict_per_call": cas / calls, "heartbeat_per_s": (busy_total - cas) / elapsed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0, help="gate calls per second")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--watcher", default=None, help="path of another _watcher.py to measure")
    args = p.parse_args(argv)
    mod = load_watcher(args.watcher)
    rows = {}
    for design, fast in (("compare-and-set per call", False), ("fast path", True)):
        m = rows[design] = measure(mod, args.rate, args.seconds, fast)
        print(f"{design}: one rank, {m['calls']} calls at {m['calls_per_s']:.0f}/s: verdict "
              f"{m['verdict_per_call']:.2f} requests/call, heartbeats {m['heartbeat_per_s']:.2f}/s busy, "
              f"{m['idle_per_s']:.2f}/s idle")
    print(f"\n| W | design | verdict requests per call at the host | heartbeat requests per call at the host "
          f"({args.rate:.0f} calls/s) | host requests/s busy | host requests/s idle |")
    print("|---|---|---|---|---|---|")
    for world in WORLDS:
        for design, m in rows.items():
            beats = m["heartbeat_per_s"] / m["calls_per_s"]
            busy = m["verdict_per_call"] * m["calls_per_s"] + m["heartbeat_per_s"]
            print(f"| {world:,} | {design} | {world * m['verdict_per_call']:,.1f} | {world * beats:,.2f} | "
                  f"{world * busy:,.0f} | {world * m['idle_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
