"""The benchmark, the soak and the GPU check script run end to end at tiny sizes
and write results that parse. No timing is ever asserted here: the targets are
the benchmark's own PASS/MISS summary."""
import json
import os
import re
import subprocess
import sys

import pytest

from esper_gate import wire
from esper_gate.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_quick_bench_writes_table_json_plot_and_summary(tmp_path):
    out = tmp_path / "bench"
    p = _run(["-m", "esper_gate", "bench", "--backend", "gloo", "--slots", "1", "4", "--worlds", "2",
              "--budget", "0.2", "--warmup", "1", "--min-reps", "3", "--max-reps", "4", "--no-local",
              "--out", str(out)], timeout=200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    md = (out / "bench.md").read_text()
    for design in bench.DESIGNS:  # the two per-slot designs, the floor and esper_gate, plus the raw op
        assert re.search(rf"^\| {re.escape(bench.LABELS[design])} \|( [0-9,]+ \[[0-9,]+–[0-9,]+\] \|){{2}}$",
                         md, re.M), design
    assert f"| packed buffer (int64 elements) | {wire.buffer_words(1, 2)} | {wire.buffer_words(4, 2)} |" in md

    data = json.loads((out / "bench.json").read_text())
    assert {"meta", "rows", "targets", "notes", "errors"} <= set(data)
    assert data["errors"] == []
    rows = [r for r in data["rows"] if r["design"] in bench.DESIGNS]
    assert {(r["slots"], r["design"]) for r in rows} == {(s, d) for s in (1, 4) for d in bench.DESIGNS}
    for r in rows:
        assert (r["backend"], r["world"]) == ("gloo", 2)
        assert r["buffer_words"] == wire.buffer_words(r["slots"], 2)
        assert 0 < r["p25_us"] <= r["median_us"] <= r["p75_us"]
        assert 3 <= r["samples"] <= 4 and r["rounds_per_sample"] >= 1
    assert data["meta"]["buffer_words"]["gloo/W=2"] == {"1": wire.buffer_words(1, 2), "4": wire.buffer_words(4, 2)}

    statuses = {t["status"] for t in data["targets"]}
    assert statuses <= {"PASS", "MISS", "n/a"} and statuses & {"PASS", "MISS"}
    assert re.search(r"^\s+(PASS|MISS)\s+esper_gate <= 1\.3x the bare floor", p.stdout, re.M), p.stdout[-2000:]
    assert re.search(r"^\s+(PASS|MISS)\s+GateSync bookkeeping", p.stdout, re.M)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in p.stdout
    else:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(medians):
    return [{"backend": b, "world": w, "slots": s, "design": d, "median_us": m, "p25_us": m, "p75_us": m}
            for (b, w, s, d), m in medians.items()]


def test_targets_are_computed_from_the_medians():
    medians = {}
    for s in (1, 4, 16, 64, 256):
        medians.update({("gloo", 2, s, "bare_floor"): 100.0, ("gloo", 2, s, "esper_gate"): 120.0,
                        ("gloo", 2, s, "raw_op"): 115.0, ("gloo", 2, s, "per_slot_unanimous"): 50.0 * s,
                        ("gloo", 2, s, "per_slot_rank0_broadcast"): 20.0 * s})
    medians[("gloo", 2, 256, "esper_gate")] = 200.0  # 1.67x the S=16 value: not flat; 2x the floor
    got = {t["name"]: t for t in bench.evaluate_targets(_rows(medians))}
    floor = next(t for n, t in got.items() if "bare floor" in n)
    assert floor["status"] == "MISS" and floor["value"] == pytest.approx(2.0)
    flat = next(t for n, t in got.items() if "flat" in n)
    assert flat["status"] == "MISS" and flat["value"] == pytest.approx(200 / 120)
    u64 = next(t for n, t in got.items() if "unanimous at S=64" in n)
    assert u64["status"] == "PASS" and u64["value"] == pytest.approx(50 * 64 / 120)   # 26.7x >= 10x
    u256 = next(t for n, t in got.items() if "unanimous at S=256" in n)
    assert u256["status"] == "PASS" and u256["value"] == pytest.approx(50 * 256 / 200)  # 64x >= 40x
    b64 = next(t for n, t in got.items() if "broadcast at S=64" in n)
    assert b64["status"] == "MISS" and b64["value"] == pytest.approx(20 * 64 / 120)    # 10.7x < 20x
    over = next(t for n, t in got.items() if "bookkeeping" in n)
    assert over["status"] == "MISS" and over["detail"]["16"] == "+4.3%"  # S=256: 200/115 - 1

    # NCCL with one rank: judged on the raw op (GateSync takes its local path there)
    nccl = {("nccl", 1, s, "per_slot_unanimous"): 30.0 * s for s in (1, 4, 16)}
    nccl.update({("nccl", 1, s, "raw_op"): 40.0 for s in (1, 4, 16)})
    nccl.update({("nccl", 1, s, "esper_gate"): 10.0 for s in (1, 4, 16)})
    got = bench.evaluate_targets(_rows(nccl))
    speed = next(t for t in got if "S/2" in t["name"])
    assert speed["status"] == "PASS" and speed["value"] == pytest.approx(3.0)  # S=4: 3x >= 2x
    assert next(t for t in got if "bookkeeping" in t["name"])["status"] == "n/a"
    assert bench.target_lines(got)[0].startswith("PASS")


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--worlds", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--slots", "0"])
    args = bench.parse_args(["--preset", "full"])
    assert args.slots == [1, 4, 16, 64, 256] and args.worlds == [2, 4]


def test_local_costs_rows():
    rows = bench.local_costs([1, 4], min_run_time=0.01)
    assert {(r["slots"], r["what"]) for r in rows} == {
        (s, w) for s in (1, 4)
        for w in ("pack", "decode", "pack_decode_read", "gate_sync_local", "pack_decode_read_slot_state")}
    assert all(r["median_us"] > 0 for r in rows)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_soak_short_run_returns_every_call(tmp_path):
    p = _run(["benchmarks/soak.py", "--calls", "200", "--world", "2", "--slots", "8", "--report-every", "50",
              "--deadline", "150", "--out", str(tmp_path)], timeout=200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "soak.json").read_text())
    s = data["summary"]
    assert data["error"] is None
    assert s["no_hang"] and s["all_calls_returned"] and s["all_decisions_right"]
    assert s["rss_status"] in ("PASS", "MISS") and isinstance(s["max_rss_growth_mb"], float)
    assert len(data["ranks"]) == 2
    for r in data["ranks"]:
        assert r["calls_returned"] == 200 and r["wrong_decisions"] == 0 and r["reports_read"] == 4
        assert r["latency_max_ms"] >= r["latency_median_ms"] > 0
    assert "resident memory growth per rank" in p.stdout


def test_gpu_check_script_is_valid_bash():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    p = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "OUT_DIR" in p.stdout
