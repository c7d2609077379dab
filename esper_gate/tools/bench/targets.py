"""Target checking: each target on the measured medians, PASS, MISS or n/a, never asserted.

The targets say what the fused sync must be worth against Esper's per-slot
designs: close to one bare all_reduce of the same size, many times faster
than a collective per slot, nearly flat in the slot count, and GateSync's
Python bookkeeping a small share of the sync.
"""
from __future__ import annotations

from .measure import DESIGNS, SHORT

# esper_gate at most this many times one bare all_reduce of its buffer (gloo, W=2)
FLOOR_MAX = 1.3
# S -> how many times faster than each per-slot design esper_gate must be
UNANIMOUS_MIN = {64: 10.0, 256: 40.0}
BROADCAST_MIN = {64: 20.0}
# S=256 at most this many times S=16: one fused sync barely grows with S
FLAT_MAX = 1.5
# GateSync's Python bookkeeping around the raw op, as a share of the sync
OVERHEAD_MAX = 0.10


def find_row(rows, backend, world, slots, design):
    for r in rows:
        if (r["backend"], r["world"], r["slots"], r["design"]) == (backend, world, slots, design):
            return r
    return None


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Every target, each PASS, MISS or n/a with the measured ratios."""
    out = []
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS})

    def add(name, status, worst, detail, backend, world, threshold):
        out.append({"name": name, "status": status, "value": worst, "threshold": threshold,
                    "backend": backend, "world": world, "detail": detail})

    def med(b, w, s, d):
        c = find_row(rows, b, w, s, d)
        return c["median_us"] if c else None

    for b, w in configs:
        slots = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w) and r["design"] in DESIGNS})
        where = f"{b}, W={w}"
        local = b == "nccl" and w == 1  # GateSync decides locally in a world of one
        fused = "raw_op" if local else "esper_gate"

        if b == "gloo" and w == 2:
            ratios = {s: med(b, w, s, "esper_gate") / med(b, w, s, "bare_floor") for s in slots
                      if med(b, w, s, "esper_gate") and med(b, w, s, "bare_floor")}
            if ratios:
                worst_s = max(ratios, key=ratios.get)
                add(f"esper_gate <= {FLOOR_MAX}x the bare floor at every S ({where})",
                    "PASS" if ratios[worst_s] <= FLOOR_MAX else "MISS", ratios[worst_s],
                    {str(s): round(v, 3) for s, v in ratios.items()}, b, w, FLOOR_MAX)

        if b == "gloo":
            for design, mins in (("per_slot_unanimous", UNANIMOUS_MIN), ("per_slot_rank0_broadcast", BROADCAST_MIN)):
                for s, need in mins.items():
                    name = f"esper_gate >= {need:g}x faster than {SHORT[design]} at S={s} ({where})"
                    old, new = med(b, w, s, design), med(b, w, s, "esper_gate")
                    if old is None or new is None:
                        add(name, "n/a", None, f"S={s} not measured", b, w, need)
                    else:
                        add(name, "PASS" if old / new >= need else "MISS", old / new, None, b, w, need)
        if b == "nccl":
            ratios = {s: med(b, w, s, "per_slot_unanimous") / med(b, w, s, fused) for s in slots
                      if s >= 4 and med(b, w, s, fused) and med(b, w, s, "per_slot_unanimous")}
            name = (f"{SHORT[fused]} >= S/2 x faster than per-slot unanimous for every S >= 4 ({where}"
                    + (", raw op: GateSync issues no collective in a world of one)" if local else ")"))
            if ratios:
                margin = {s: v / (s / 2) for s, v in ratios.items()}
                worst_s = min(margin, key=margin.get)
                add(name, "PASS" if margin[worst_s] >= 1 else "MISS", ratios[worst_s],
                    {str(s): f"{v:.1f}x (need {s / 2:g}x)" for s, v in ratios.items()}, b, w, "S/2")
            else:
                add(name, "n/a", None, "no S >= 4 measured", b, w, "S/2")

        a, z = med(b, w, 16, fused), med(b, w, 256, fused)
        name = f"{SHORT[fused]} nearly flat in S: S=256 <= {FLAT_MAX}x S=16 ({where})"
        if a and z:
            add(name, "PASS" if z / a <= FLAT_MAX else "MISS", z / a, None, b, w, FLAT_MAX)
        else:
            add(name, "n/a", None, "needs S=16 and S=256", b, w, FLAT_MAX)

        name = (f"GateSync bookkeeping <= {OVERHEAD_MAX:.0%} of the sync (median of back-to-back GateSync / raw op pairs - 1)"
                f" at every S ({where})")
        if local:
            add(name, "n/a", None, "world of one: GateSync issues no collective", b, w, OVERHEAD_MAX)
        else:
            def overhead(s):
                cell = find_row(rows, b, w, s, "esper_gate")
                if cell and cell.get("paired_overhead_vs_raw") is not None:
                    return cell["paired_overhead_vs_raw"]
                if med(b, w, s, "esper_gate") and med(b, w, s, "raw_op"):
                    return med(b, w, s, "esper_gate") / med(b, w, s, "raw_op") - 1
                return None

            over = {s: overhead(s) for s in slots if overhead(s) is not None}
            if over:
                worst_s = max(over, key=over.get)
                add(name, "PASS" if over[worst_s] <= OVERHEAD_MAX else "MISS", over[worst_s],
                    {str(s): f"{v:+.1%}" for s, v in over.items()}, b, w, OVERHEAD_MAX)
    return out


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        if t["value"] is None:
            val = ""
        elif "GateSync bookkeeping" in t["name"]:
            val = f": worst {t['value']:+.1%}"
        else:
            val = f": {'worst ' if isinstance(t['detail'], dict) else ''}{fmt_ratio(t['value'])}"
        detail = ""
        if isinstance(t["detail"], dict):
            detail = " [" + ", ".join(f"S={k}: {v}" for k, v in t["detail"].items()) + "]"
        elif t["detail"]:
            detail = f" ({t['detail']})"
        lines.append(f"{t['status']:4s}  {t['name']}{val}{detail}")
    return lines

