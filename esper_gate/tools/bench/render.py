"""Rendering: the benchmark's results as a markdown report and a log-log plot."""
from __future__ import annotations

from ... import wire
from .measure import DESIGNS, LABELS, SHORT
from .targets import find_row, fmt_ratio, target_lines

STYLE = {  # matplotlib: color, marker, linestyle
    "per_slot_unanimous": ("tab:red", "o", "-"),
    "per_slot_rank0_broadcast": ("tab:orange", "s", "-"),
    "bare_floor": ("tab:gray", "^", "--"),
    "esper_gate": ("tab:blue", "D", "-"),
    "raw_op": ("tab:cyan", ".", ":"),
}


def _config_title(backend: str, world: int) -> str:
    if backend == "gloo":
        return f"gloo (CPU tensors), world size {world}"
    return f"NCCL (CUDA tensors), world size {world}"


def render_markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    out = ["# esper_gate microbenchmark", "",
           f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; machine: {meta['machine']}",
           f"- torch {meta['torch']}, esper_gate build: {meta['esper_gate_build']}; "
           f"budget {meta['budget_s']:g} s per (world, S) cell, warm-up {meta['warmup']} rounds per design",
           "",
           "Latency per gate round (agreement on all S slots), median µs [25th–75th percentile]. One sample "
           "is a barrier-delimited block of consecutive rounds: the slowest rank's block time divided by the "
           "rounds in it; the designs take turns inside every repetition.", ""]
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS},
                     key=lambda c: (c[0] != "gloo", c[1]))
    for b, w in configs:
        slots = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w) and r["design"] in DESIGNS})
        out += [f"## {_config_title(b, w)}", ""]
        if b == "gloo" and w > (meta.get("cpu_count") or w):
            out += [f"W={w} ranks share {meta['cpu_count']} CPU cores (oversubscribed): treat these numbers as "
                    f"indicative.", ""]
        if b == "nccl" and w == 1:
            out += ["In a world of one GateSync decides locally (pack + decode, no collective); the raw op line "
                    "goes through NCCL.", ""]
        out.append("| design | " + " | ".join(f"S={s}" for s in slots) + " |")
        out.append("|---|" + "---:|" * len(slots))
        out.append("| packed buffer (int64 elements) | "
                   + " | ".join(str(wire.buffer_words(s, w)) for s in slots) + " |")
        for d in DESIGNS:
            cells = []
            for s in slots:
                c = find_row(rows, b, w, s, d)
                cells.append("–" if c is None else f"{c['median_us']:,.0f} [{c['p25_us']:,.0f}–{c['p75_us']:,.0f}]")
            out.append(f"| {LABELS[d]} | " + " | ".join(cells) + " |")
        ratio_rows = [("esper_gate / bare floor", "esper_gate", "bare_floor", False),
                      ("per-slot unanimous / esper_gate", "per_slot_unanimous", "esper_gate", False),
                      ("rank-0 broadcast / esper_gate", "per_slot_rank0_broadcast", "esper_gate", False),
                      ("GateSync / raw op - 1", "esper_gate", "raw_op", True)]
        for label, num, den, pct in ratio_rows:
            cells = []
            for s in slots:
                a, z = find_row(rows, b, w, s, num), find_row(rows, b, w, s, den)
                if a is None or z is None:
                    cells.append("–")
                else:
                    r = a["median_us"] / z["median_us"]
                    cells.append(f"{r - 1:+.1%}" if pct else fmt_ratio(r))
            out.append(f"| *{label}* | " + " | ".join(cells) + " |")
        paired = []
        for s in slots:
            c = find_row(rows, b, w, s, "esper_gate")
            v = c.get("paired_overhead_vs_raw") if c else None
            paired.append("–" if v is None else f"{v:+.1%}")
        out.append("| *GateSync / raw op - 1, median of back-to-back pairs* | " + " | ".join(paired) + " |")
        samples = [f"{find_row(rows, b, w, s, 'esper_gate')['samples']}" if find_row(rows, b, w, s, 'esper_gate') else "–"
                   for s in slots]
        out.append("| *samples per design* | " + " | ".join(samples) + " |")
        out.append("")
        enq = [r for r in rows if (r["backend"], r["world"], r["design"]) == (b, w, "enqueue")]
        if enq:
            out += ["Host-side enqueue time of one `torch.ops.esper_gate.sync` on CUDA (call to return, GPU not "
                    "waited for), µs:", "",
                    "| S | median | 25th–75th | min |", "|---:|---:|---:|---:|"]
            out += [f"| {r['slots']} | {r['median_us']:.1f} | {r['p25_us']:.1f}–{r['p75_us']:.1f} | "
                    f"{r['min_us']:.1f} |" for r in sorted(enq, key=lambda r: r["slots"])]
            out.append("")
    for dev in sorted({r["device"] for r in result.get("local", [])}):
        local = [r for r in result["local"] if r["device"] == dev]
        out += [f"## One process, no collective ({'CUDA' if dev == 'cuda' else 'CPU'}; torch.utils.benchmark)", "",
                "Where esper_gate's own time goes, W=2 buffer layout, µs per call (median)"
                + (", each kernel followed by a device synchronize:" if dev == "cuda" else ":"), "",
                "| S | pack | decode | pack + decode + host read | GateSync call + host read, local path "
                "| GateSync's Python around the kernels | pack + decode + host read, with per-slot policies "
                "and digests |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["slots"], r["what"]): r["median_us"] for r in local}
        for s in sorted({r["slots"] for r in local}):
            state = by.get((s, "pack_decode_read_slot_state"))  # absent from results of older versions
            out.append(f"| {s} | {by[(s, 'pack')]:.1f} | {by[(s, 'decode')]:.1f} | "
                       f"{by[(s, 'pack_decode_read')]:.1f} | {by[(s, 'gate_sync_local')]:.1f} | "
                       f"{by[(s, 'gate_sync_local')] - by[(s, 'pack_decode_read')]:.1f} | "
                       + ("n/a" if state is None else f"{state:.1f}") + " |")
        out.append("")
    out += ["## Targets", "", "```"] + target_lines(result["targets"]) + ["```", ""]
    if result.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    if result.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(out)


def render_plot(result: dict, path: str) -> str | None:
    """Latency against S, log-log, one panel per (backend, world). None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, or bash scripts/run.sh setup)"
    rows = result["rows"]
    configs = sorted({(r["backend"], r["world"]) for r in rows if r["design"] in DESIGNS},
                     key=lambda c: (c[0] != "gloo", c[1]))
    if not configs:
        return "no rows to plot"
    fig, axes = plt.subplots(1, len(configs), figsize=(5.2 * len(configs), 4.4), squeeze=False)
    for ax, (b, w) in zip(axes[0], configs):
        for d in DESIGNS:
            pts = sorted((r["slots"], r) for r in rows if (r["backend"], r["world"], r["design"]) == (b, w, d))
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ys = [r["median_us"] for _, r in pts]
            err = [[r["median_us"] - r["p25_us"] for _, r in pts], [r["p75_us"] - r["median_us"] for _, r in pts]]
            color, marker, ls = STYLE[d]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, linestyle=ls, capsize=3,
                        linewidth=1 if d == "raw_op" else 1.8, label=SHORT[d])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs_all = sorted({r["slots"] for r in rows if (r["backend"], r["world"]) == (b, w)})
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel("slots S")
        ax.set_ylabel("µs per gate round (median, IQR bars)")
        ax.set_title(_config_title(b, w), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"esper_gate vs per-slot gate sync ({result['meta']['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

