"""The human-readable side of `eft bench`: bench.md (Markdown tables) and PNG plots.

`markdown(result)` renders, from the JSON object alone: the configuration; per mode, the LRA Table 2
layout (time per step with the speed-up over vanilla, peak memory with the ratio to vanilla, one
column per length), achieved GFLOP/s and the fraction of each row's ceiling (its products alone,
`products.py`, with the median per mechanism); the fitted slopes beside the card's stated complexity; the
crossover lengths; every configuration that did not run and why. `write_plots(result, out_dir)`
draws time and memory against N on log-log axes, one panel per taxonomy class (card.classes),
a line per mechanism, vanilla dashed in every panel for reference. matplotlib is imported lazily
and only through its object-oriented API (no pyplot, no global backend change).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from . import analysis

STATUS_CELL = {"oom": "OOM", "timeout": "timeout", "error": "error", "unsupported": "n/a"}
MODE_TITLE = {"forward": "Forward (inference)", "train": "Train (forward + backward)"}
METRICS = {"time_ms": ("time", "time per step (ms)"), "peak_mem_mb": ("memory", "peak memory of the step (MiB)")}


def _backend_rates(probe: dict | None) -> str:
    """": torch.matmul 96, oneDNN 212 GFLOP/s" from the last probe (nothing for an older bench.json)."""
    rates = (probe or {}).get("backends") or {}
    return (": " + ", ".join(f"{name} {_num(rate)}" for name, rate in rates.items()) + " GFLOP/s") if rates else ""


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _slope(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _label(config: dict[str, Any], name: str) -> str:
    return f"{config['cards'][name]['title']} (`{name}`)"


def _row_index(result: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["mechanism"], r["mode"], r["seq_len"]): r for r in result["rows"]}


def _cell(row: dict[str, Any] | None, render) -> str:
    if row is None:
        return "not run"
    if row["status"] != "ok":
        return STATUS_CELL.get(row["status"], row["status"])
    return render(row)


def markdown(result: dict[str, Any]) -> str:
    config, summary = result["config"], result["summary"]
    index = _row_index(result)
    lengths, modes, names = config["lengths"], config["modes"], config["mechanisms"]
    out: list[str] = ["# eft bench: efficiency of the attention mechanisms", ""]
    state = "complete" if config["complete"] else ("interrupted, partial" if config["interrupted"] else "incomplete")
    wall = config.get("wall_time_s")
    out += [f"Run started {config['started_at']}, wall time {_num(wall)} s ({state}). One attention layer as "
            f"`et.build_attention(name, dim={config['dim']}, heads={config['heads']}, causal={config['causal']})` "
            f"builds it (projections included), input x of shape (B={config['batch']}, N, {config['dim']}), "
            f"{config['dtype']}, on {config['device']} ({config['device_name']}, "
            f"{config['threads']} torch thread{'' if config['threads'] == 1 else 's'}).", ""]

    out += ["## Configuration", ""]
    settings = [
        ("mechanisms", ", ".join(names) + (" (vanilla added as the baseline)" if config["baseline_added"] else "")),
        ("lengths N", ", ".join(map(str, lengths))), ("modes", ", ".join(modes)),
        ("batch, dim, heads (head dim)", f"{config['batch']}, {config['dim']}, {config['heads']} ({config['head_dim']})"),
        ("dtype, causal, device", f"{config['dtype']}, {config['causal']}, {config['device']}"),
        ("quick", str(config["quick"])),
        ("rounds per configuration", f"up to {config['repeats']} (at least {config['min_rounds']} when the limit allows), "
                                     f"time budget {config['time_budget_s']:g} s, samples of >= {config['sample_min_s'] * 1e3:g} ms"),
        ("limit per configuration", f"{config['timeout_s']:g} s"),
        ("matrix-multiply rate", f"{_num(config['matmul_gflops'])} GFLOP/s (best float32 "
                                 f"{(config.get('matmul_probe') or {}).get('size', '?')}^3 product over {config['matmul_probe_s']:g} s "
                                 f"at start-up and {config['matmul_probe_s'] / 10:g} s before every block, on the faster "
                                 f"backend{_backend_rates(config.get('matmul_probe'))})"),
        ("load average at start, end", f"{_num(config.get('load_average_start'))}, {_num(config.get('load_average_end'))} "
                                       f"(1-minute, {config['cpu_count']} CPUs)"),
        ("peak memory", config["memory_method"] + "; " + config["memory_unit"]),
        ("FLOPs", config["flops_method"]),
        ("ceiling", config["ceiling_method"] if config.get("ceiling") else "not measured (--no-ceiling)"),
        ("forward mode", config["forward_mode"]), ("train mode", config["train_mode"]),
        ("torch, python", f"{config['torch_version']}, {config['python_version']} on {config['platform']}"),
    ]
    out += [_table(["setting", "value"], [[k, v] for k, v in settings]), ""]

    out += ["## How to read it", "",
            "- **Time** is the median over rounds of one step. All mechanisms of one (N, mode) are timed in the "
            "same rounds, in rotating order; **speed-up** = vanilla's time / the mechanism's time, as the median "
            "over rounds of the ratio within a round (robust to drift of a shared machine).",
            "- **Peak memory** is measured once per configuration in a fresh process: the high-water mark of the "
            "resident size during one step minus the resident size before it.",
            f"- **Slope**: least-squares fit of log(value) on log(N) over the {config['slope_points']} largest lengths "
            "where the configuration ran; ~2 means quadratic, ~1 linear. Small N is dominated by fixed costs "
            "(projections, Python), which flattens every curve. **Check** flags a memory or FLOPs slope above the "
            f"card's stated exponent by more than {config['slope_tolerance']:g}, a time slope by more than "
            f"{config['time_slope_tolerance']:g} (+0.15 with a log factor). The FLOPs slope is exact but counts "
            "only matrix products; memory counts everything.",
            "- **Crossover length**: the smallest measured N from which the mechanism is faster than vanilla at that "
            "N and at every larger measured N (faster: its paired time ratio is below 1, or vanilla did not run "
            "there); 'none up to N=...' when it is not faster at the largest length.",
            f"- A time marked * is noisy: its samples spread by more than {config['noisy_spread']:.0%} of the median "
            "(max - min); the machine was busy during those rounds.",
            "- **Ceiling**: the row's own matrix products (forward + backward without what the backward pass "
            "recomputes) replayed alone on preallocated buffers, timed in the same rounds: a lower bound on any "
            "implementation of those products. **Fraction of the ceiling** = ceiling time / step time (median over "
            "rounds of the ratio; 100 % = nothing but products). The **FLOP-rate bound** is the same products' "
            "2mnk FLOPs at the measured matrix-multiply rate (small or thin products run below that rate, so the "
            "measured ceiling is the sharper bound); **product GFLOP/s** = those FLOPs / the step's time.",
            "- Cells: OOM = out of memory, timeout = over the limit per configuration, error = raised an exception, "
            "n/a = the mechanism does not support this mode (e.g. causal); details at the end.", ""]

    for mode in modes:
        out += [f"## {MODE_TITLE[mode]}", ""]
        out += ["### Time per step, ms (speed-up over vanilla): the LRA Table 2 layout", ""]
        def time_cell(r: dict[str, Any]) -> str:
            noisy = "*" if (r.get("time_spread") or 0) > config["noisy_spread"] else ""
            return f"{_num(r['time_ms'])}{noisy} ({_ratio(r['speedup_vs_vanilla'])})"

        out += [_table(["Model"] + [f"N={n}" for n in lengths],
                       [[_label(config, m)] + [_cell(index.get((m, mode, n)), time_cell)
                                               for n in lengths] for m in names]), ""]
        out += ["### Peak memory, MiB (ratio to vanilla)", ""]
        out += [_table(["Model"] + [f"N={n}" for n in lengths],
                       [[_label(config, m)] + [_cell(index.get((m, mode, n)),
                                                     lambda r: f"{_num(r['peak_mem_mb'])} ({_ratio(r['mem_ratio_vs_vanilla'])})")
                                               for n in lengths] for m in names]), ""]
        out += ["### Achieved GFLOP/s (fraction of the matrix-multiply rate) and GFLOP per step", ""]

        def flops_cell(r: dict[str, Any]) -> str:
            if r["gflops_per_s"] is None:
                return "—"
            fraction = "" if r["matmul_fraction"] is None else f" ({r['matmul_fraction']:.0%})"
            return f"{_num(r['gflops_per_s'])}{fraction}; {_num(r['flops'] / 1e9)}"

        out += [_table(["Model"] + [f"N={n}" for n in lengths],
                       [[_label(config, m)] + [_cell(index.get((m, mode, n)), flops_cell) for n in lengths]
                        for m in names]), ""]
        if config.get("ceiling"):
            out += ["### Fraction of the ceiling reached (ceiling ms; FLOP-rate bound ms; product GFLOP/s)", ""]

            def ceiling_cell(r: dict[str, Any]) -> str:
                if r.get("ceiling_fraction") is None:
                    return "—"
                return (f"{r['ceiling_fraction']:.0%} ({_num(r['ceiling_ms'])}; {_num(r.get('flop_bound_ms'))}; "
                        f"{_num(r.get('product_gflops_per_s'))})")

            out += [_table(["Model"] + [f"N={n}" for n in lengths],
                           [[_label(config, m)] + [_cell(index.get((m, mode, n)), ceiling_cell) for n in lengths]
                            for m in names]), ""]

    out += [f"## Fitted complexity: log-log slopes over the {config['slope_points']} largest lengths", ""]
    header = ["Model", "Class", "Stated", "Stated exponent"]
    for mode in modes:
        header += [f"time slope ({mode})", f"memory slope ({mode})", f"FLOPs slope ({mode})"]
    header.append("Check")
    rows = []
    for m in names:
        card = config["cards"][m]
        parsed = analysis.expected_exponent(card["complexity"])
        cells = [_label(config, m), "+".join(card["classes"]), card["complexity"], analysis.format_exponent(parsed)]
        flags = []
        for mode in modes:
            s = summary.get(m, {}).get(mode, {})
            cells += [_slope(s.get("time_slope")), _slope(s.get("mem_slope")), _slope(s.get("flops_slope"))]
            if s.get("time_exceeds_stated"):
                flags.append(f"time above stated ({mode})")
            if s.get("mem_exceeds_stated"):
                flags.append(f"memory above stated ({mode})")
            if s.get("flops_exceeds_stated"):
                flags.append(f"FLOPs above stated ({mode})")
        measured_any = any(summary.get(m, {}).get(mode, {}).get("time_slope") is not None for mode in modes)
        cells.append("; ".join(flags) if flags else ("within stated" if measured_any and parsed else "—"))
        rows.append(cells)
    out += [_table(header, rows), ""]

    out += ["## Crossover length: from which N the mechanism is faster than vanilla", ""]
    rows = []
    for m in names:
        cells = [_label(config, m)]
        for mode in modes:
            s = summary.get(m, {}).get(mode)
            if m == analysis.BASELINE:
                cells.append("baseline")
            elif not s:
                cells.append("not run")
            elif not s["statuses"].get("ok"):
                cells.append("not measured: " + ", ".join(s["statuses"]))
            else:
                cells.append(str(s["crossover_len"]) if s["crossover_len"] is not None
                             else f"none up to N={max(lengths)}")
        rows.append(cells)
    out += [_table(["Model"] + modes, rows), ""]

    if config.get("ceiling"):
        out += ["## Fraction of the ceiling: median over the lengths, per mechanism", ""]
        out += [_table(["Model"] + modes, [[_label(config, m)] + [
            "—" if (f := summary.get(m, {}).get(mode, {}).get("ceiling_fraction_median")) is None else f"{f:.0%}"
            for mode in modes] for m in names]), ""]

    failed = [r for r in result["rows"] if r["status"] != "ok"]
    out += ["## Configurations that did not run", ""]
    if failed:
        out += [_table(["Model", "N", "mode", "status", "message"],
                       [[_label(config, r["mechanism"]), str(r["seq_len"]), r["mode"], r["status"],
                         (r["error"] or "").replace("|", "\\|").replace("\n", " ")] for r in failed]), ""]
    else:
        out += ["None: every configuration ran.", ""]
    warned = [r for r in result["rows"] if r.get("warnings")]
    if warned:
        out += ["## Warnings raised during the probes", ""]
        out += [f"- {r['mechanism']} N={r['seq_len']} {r['mode']}: " + "; ".join(r["warnings"]) for r in warned] + [""]
    if config.get("notes"):
        out += ["## Notes", ""] + [f"- {note}" for note in config["notes"]] + [""]
    plots = [f for f in config.get("files", []) if f.endswith(".png")]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in plots] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- plots
def write_plots(result: dict[str, Any], out_dir: Path, notes: list[str]) -> list[str]:
    """Write `{time,memory}_{mode}.png`; returns the file names. Problems are appended to `notes`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        note = "plots not written: matplotlib is not installed (pip install 'efficient-transformers[plots]')"
        notes.append(note)
        print(f"eft bench: {note}", file=sys.stderr)
        return []
    config = result["config"]
    files = []
    for mode in config["modes"]:
        for metric, (stem, axis_label) in METRICS.items():
            series = _series(result, mode, metric)
            if not series:
                continue
            panels = _panels(config, series)
            ncols = min(3, len(panels))
            nrows = math.ceil(len(panels) / ncols)
            fig = Figure(figsize=(max(6.4, 4.6 * ncols), 3.6 * nrows + 0.4), layout="constrained")
            FigureCanvasAgg(fig)
            for i, (klass, members) in enumerate(panels):
                ax = fig.add_subplot(nrows, ncols, i + 1)
                for name in members:
                    xs, ys = series[name]
                    baseline = name == analysis.BASELINE
                    ax.plot(xs, ys, "k--" if baseline else "-", marker="o", markersize=3,
                            label=config["cards"][name]["title"], linewidth=1.2 if baseline else 1.6)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(config["lengths"], [_length_label(n) for n in config["lengths"]])
                ax.minorticks_off()
                ax.set_title(klass, fontsize=10)
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(axis_label)
                ax.grid(True, which="both", alpha=0.25)
                ax.legend(fontsize=7)
            fig.suptitle(f"{MODE_TITLE[mode]}\n{axis_label} vs N (log-log), by taxonomy class", fontsize=10)
            name = f"{stem}_{mode}.png"
            fig.savefig(out_dir / name, dpi=110)
            files.append(name)
    return files


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _series(result: dict[str, Any], mode: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name in result["config"]["mechanisms"]:
        points = sorted((r["seq_len"], r[metric]) for r in result["rows"]
                        if r["mechanism"] == name and r["mode"] == mode and r["status"] == "ok"
                        and r.get(metric) is not None and r[metric] > 0)
        if points:
            series[name] = ([n for n, _ in points], [v for _, v in points])
    return series


def _panels(config: dict[str, Any], series: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(panel title, mechanisms) per taxonomy class present; vanilla joins every panel."""
    from ..registry import TAXONOMY

    by_class: dict[str, list[str]] = {}
    for name in series:
        if name == analysis.BASELINE:
            continue
        for klass in config["cards"][name]["classes"]:
            by_class.setdefault(klass, []).append(name)
    baseline = [analysis.BASELINE] if analysis.BASELINE in series else []
    if not by_class:
        return [("Dense: " + TAXONOMY["Dense"], baseline)] if baseline else []
    order = list(TAXONOMY)
    return [(f"{k}: {TAXONOMY.get(k, k)}", baseline + by_class[k])
            for k in sorted(by_class, key=lambda k: order.index(k) if k in order else len(order))]
