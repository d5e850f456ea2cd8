"""The report of `eft search`: the Pareto front, the best configuration as an `eft train` command
line, and the JSON / Markdown / PNG outputs, all from the trial rows that `search.trial_rows` reads
back from the study (so a resumed or interrupted study reports the same way). Nothing here touches
Optuna or measures anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..formatting import aligned_table, json_safe
from .config import TrainConfig

STATUSES = ("complete", "hopeless", "constraint", "error", "interrupted")
UNIT = {"latency_ms": "ms", "peak_mem_mb": "MiB"}
CONSTRAINT_FLAG = {"latency_ms": "--max-latency-ms", "peak_mem_mb": "--max-memory-mb"}
METRIC_NAME = {"accuracy": "accuracy", "bits_per_byte": "bits per byte"}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def pareto_front(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """The complete, distinct trials no other trial beats on both objectives (at least as good on both,
    better on one), by latency."""
    pts = [r for r in rows if r["status"] == "complete" and r["duplicate_of"] is None]

    def dominates(q, p):
        at_least = (q["val_metric"] == p["val_metric"] or better(q["val_metric"], p["val_metric"], direction)) \
            and q["latency_ms"] <= p["latency_ms"]
        return at_least and (better(q["val_metric"], p["val_metric"], direction) or q["latency_ms"] < p["latency_ms"])

    front = [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]
    return sorted(front, key=lambda r: (r["latency_ms"], r["number"]))


def best_row(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The best metric among the complete trials (all within the constraints), ties by latency."""
    pts = [r for r in rows if r["status"] == "complete" and r["duplicate_of"] is None]
    if not pts:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(pts, key=lambda r: (sign * r["val_metric"], r["latency_ms"], r["number"]))


#: TrainConfig fields the printed command leaves out: the folder (its own), the progress bar, the device
#: (the user's choice for the real run), and num_test (the search skips the test split; the run reports it).
COMMAND_SKIPS = ("task", "attention", "out", "progress", "device", "num_test")


def train_command(config: dict[str, Any], out: str) -> list[str]:
    """`eft train` argv reproducing a trial's TrainConfig (fields at their defaults left out)."""
    from .command import CONFIG_FIELDS

    cfg = TrainConfig.from_json({**config, "out": out})
    default = TrainConfig(task=cfg.task, attention=cfg.attention, out=out)
    argv = ["eft", "train", "--task", cfg.task, "--attention", cfg.attention]
    for name in CONFIG_FIELDS:
        if name in COMMAND_SKIPS:
            continue
        value = getattr(cfg, name)
        if value == getattr(default, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
            continue
        argv += [flag, str(value)]
    for key, value in cfg.attention_options.items():
        argv += ["--attention-option", f"{key}={json.dumps(value)}"]
    for key, value in cfg.task_options.items():
        argv += ["--task-option", f"{key}={json.dumps(value)}"]
    return argv + ["--out", out]


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _memory_suffix(row: dict[str, Any]) -> str:
    return "" if row["peak_mem_mb"] is None else f", {row['peak_mem_mb']:.1f} MiB peak"


def _budget_text(row: dict[str, Any]) -> str:
    return "—" if not row["budget"] else f"{row['budget']['option']}={row['budget']['value']}"


def _table(rows: list[dict[str, Any]], metric: str, *, with_status: bool) -> tuple[list[str], list[list[str]]]:
    short = "val acc" if metric == "accuracy" else "val bpb"
    header = ["#", "mechanism", "budget", "depth", "dim", "heads", short, "latency ms", "peak MiB"]
    if with_status:
        header.append("status")
    body = []
    for r in rows:
        cells = [str(r["number"]), r["mechanism"], _budget_text(r), str(r["depth"]), str(r["dim"]), str(r["heads"]),
                 _metric_text(r["val_metric"], metric), _num(r["latency_ms"], 2), _num(r["peak_mem_mb"])]
        if with_status:
            status = r["status"] or "?"
            if r["duplicate_of"] is not None:
                status += f" (= #{r['duplicate_of']})"
            cells.append(status)
        body.append(cells)
    return header, body



def _md(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]


def _settings_line(report: dict[str, Any]) -> str:
    c = report["config"]
    limits = []
    if c["max_latency_ms"] is not None:
        limits.append(f"latency <= {c['max_latency_ms']:g} ms")
    if c["max_memory_mb"] is not None:
        limits.append(f"peak memory <= {c['max_memory_mb']:g} MiB")
    base = c.get("baseline") or {}
    bar = f"{base.get('kind')} {_metric_text(base.get('value'), c['metric'])}"
    if base.get("unigram_bits_per_byte") is not None:
        bar += f" (the unigram model: {base['unigram_bits_per_byte']:.3f})"
    sign = "+" if c["direction"] == "maximize" else "-"
    stop = (f"early stop at {c['early_stop_at']:g} of the steps unless beyond {bar} {sign} {c['early_stop_margin']:g}"
            if c["early_stop_at"] else f"no early stop (baseline: {bar})")
    machine = c.get("machine") or {}
    return (f"task {c['task']} at N = {c['max_len']}, {c['steps']} steps of batch {c['batch_size']} (lr {c['lr']:g}), "
            f"{c['num_train']} / {c['num_val']} generated examples, seed {c['seed']}; {stop}; "
            f"{', '.join(limits) if limits else 'no constraints'}; {c['threads']} torch thread(s) on "
            f"{machine.get('gpu') or machine.get('cpu')}")


def _summary_line(report: dict[str, Any]) -> str:
    s = report["summary"]
    parts = [f"{s[k]} {k}" for k in STATUSES if s[k]]
    dup = (f"; {s['duplicates']} proposal(s) repeated an evaluated configuration, answered from it (not counted)"
           if s["duplicates"] else "")
    return f"{s['counted']} of {s['requested']} trials: " + ", ".join(parts) + dup


def text_report(report: dict[str, Any]) -> str:
    c, metric = report["config"], report["config"]["metric"]
    out = [f"eft search: study {c['study_name']} in {c['storage']}", _settings_line(report), _summary_line(report), ""]
    if report["pareto_front"]:
        out += ["Pareto front (validation metric against training-step latency):",
                aligned_table(*_table(report["pareto_front"], metric, with_status=False)), ""]
    best = report["best"]
    if best:
        out += [f"Best within the constraints: #{best['number']} {best['label']}: validation {METRIC_NAME[metric]} "
                f"{_metric_text(best['val_metric'], metric)}, {best['latency_ms']:.2f} ms per step", "Train it:",
                "  " + best["command"]]
    return "\n".join(out)


def markdown(report: dict[str, Any]) -> str:
    c, metric = report["config"], report["config"]["metric"]
    out = ["# eft search: hardware-aware architecture search", "", f"Study `{c['study_name']}` in `{c['storage']}`: "
           f"{_settings_line(report)}.", "", f"Objectives: {' and '.join(c['objectives'])}; latency and memory: "
           f"{c['measure']}.", "", _summary_line(report) + ".", ""]
    best = report["best"]
    if best:
        out += ["## Best configuration", "", f"Trial #{best['number']}, {best['label']}: validation {METRIC_NAME[metric]} "
                f"{_metric_text(best['val_metric'], metric)}, {best['latency_ms']:.2f} ms per training step"
                f"{_memory_suffix(best)}"
                ". The best metric among the trials within the constraints, ties by latency.", "",
                "```bash", best["command"], "```", ""]
    if report["pareto_front"]:
        out += ["## Pareto front", ""] + _md(*_table(report["pareto_front"], metric, with_status=False)) + [""]
    if "search.png" in c["files"]:
        out += ["![search](search.png)", ""]
    out += ["## All trials", ""] + _md(*_table(report["trials"], metric, with_status=True)) + [""]
    reasons = [r for r in report["trials"] if r["reason"] and r["duplicate_of"] is None]
    if reasons:
        out += ["## Why trials stopped", ""] + [f"- #{r['number']} {r['label']}: {r['status']}: {r['reason']}"
                                                for r in reasons] + [""]
    space = c["space"]
    out += ["## Search space", "", f"depth {_show(space['depth'])}; dim {_show(space['dim'])}; heads "
            f"{_show(space['heads'])}; mechanisms and their budget option:", ""]
    for name, entry in space["mechanisms"].items():
        out.append(f"- {name}: " + (f"{entry['option']} in {entry['values']}" if entry["option"] else "no budget option"))
    for e in c["excluded"]:
        out.append(f"- {e['mechanism']}: excluded: {e['reason']}")
    if c["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in c["notes"]]
    return "\n".join(out) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """Latency (log) against the validation metric: complete trials by mechanism, the Pareto front
    joined, hopeless trials at their early-check value, the latency limit marked."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        report["config"]["notes"].append("search.png not written: matplotlib is not installed "
                                         "(pip install 'efficient-transformers[plots]')")
        return False
    c, metric = report["config"], report["config"]["metric"]
    rows = [r for r in report["trials"] if r["duplicate_of"] is None and r["latency_ms"]]
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scale = 100.0 if metric == "accuracy" else 1.0
    names = list(dict.fromkeys(r["mechanism"] for r in rows))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for name in names:
        done = [r for r in rows if r["mechanism"] == name and r["status"] == "complete"]
        if done:
            ax.scatter([r["latency_ms"] for r in done], [scale * r["val_metric"] for r in done], color=colors[name],
                       label=name, s=28, zorder=3)
        hopeless = [r for r in rows if r["mechanism"] == name and r["status"] == "hopeless"
                    and (r["check"] or {}).get("val_metric") is not None]
        if hopeless:
            ax.scatter([r["latency_ms"] for r in hopeless], [scale * r["check"]["val_metric"] for r in hopeless],
                       color=colors[name], marker="x", s=24, zorder=3,
                       label=f"{name} (stopped early)" if not done else None)
    front = report["pareto_front"]
    if front:
        ax.plot([r["latency_ms"] for r in front], [scale * r["val_metric"] for r in front], "k-", linewidth=1,
                drawstyle="steps-post" if metric == "accuracy" else "default", label="Pareto front", zorder=2)
    if report["best"]:
        b = report["best"]
        ax.scatter([b["latency_ms"]], [scale * b["val_metric"]], facecolors="none", edgecolors="red", s=140,
                   linewidths=1.5, label=f"best: #{b['number']}", zorder=4)
    if c["max_latency_ms"] is not None:
        ax.axvline(c["max_latency_ms"], color="tab:purple", linestyle=":", label=f"--max-latency-ms {c['max_latency_ms']:g}")
    base = (c.get("baseline") or {}).get("value")
    if base is not None:
        ax.axhline(scale * base, color="gray", linestyle="--", linewidth=1, label=c["baseline"]["kind"])
    ax.set_xscale("log")
    ax.set_xlabel("training-step latency of the stack (ms, this machine)")
    ax.set_ylabel("validation accuracy (%)" if metric == "accuracy" else "validation bits per byte")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax.set_title(f"eft search: {c['task']} at N = {c['max_len']}, {report['summary']['counted']} trials", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if write_plot(report, out / "search.png"):
        report["config"]["files"].append("search.png")
    (out / "search.md").write_text(markdown(report), encoding="utf-8")
    tmp = out / "search.json.tmp"
    tmp.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(out / "search.json")



def closest_text(entries: list[dict[str, Any]], constraints: dict[str, float], limit: int = 3) -> list[str]:
    """The entries nearest to meeting the constraints (smallest worst ratio to a limit)."""
    def worst(e):
        ratios = [e[m] / v for m, v in constraints.items() if e.get(m) is not None]
        return max(ratios) if ratios else math.inf

    lines = []
    for e in sorted(entries, key=worst)[:limit]:
        figures = [f"{e['latency_ms']:.2f} ms" if e.get("latency_ms") is not None else None,
                   f"{e['peak_mem_mb']:.1f} MiB" if e.get("peak_mem_mb") is not None else None]
        lines.append(f"  {e['label']}: {', '.join(f for f in figures if f)}")
    return lines
