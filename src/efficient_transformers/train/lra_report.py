"""The tables and the figure of `eft lra`: accuracy in LRA Table 1's layout, efficiency in Table 2's,
LRA's published numbers beside ours (marked as theirs, at their lengths), the Kendall rank correlation
between our average-accuracy ranking and theirs, and accuracy against speed (LRA's Figure 3) as a PNG.

LRA's numbers (Tay et al. 2021, ICLR, Tables 1 and 2; transcribed in SURVEY.md Part 2): accuracy on
ListOps at 2K, Text at 4K, Retrieval at 2 x 4K, Image at 1K, Pathfinder at 1K (32 x 32); speed and memory
on the byte-level Text task at 1K-4K, batch 32, TPU v3. Their averages are recomputed from the five task
numbers (the paper prints 51.39 for Sinkhorn, whose numbers average to 51.48; SURVEY.md 2(b)).

Kendall's tau (tau-b, ties counted as in scipy) is taken over the mechanisms both tables have, between
our mean test accuracy averaged over the five tasks and theirs; scipy computes it with its p-value when
installed (`pip install efficient-transformers[lra]`), else `kendall_tau_b` below (tau only).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
TASK_TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
               "pathfinder": "Pathfinder"}
#: LRA's lengths for Table 1 (tokens per example; Retrieval: per document, two documents per example)
PUBLISHED_LENGTHS = {"listops": 2000, "text": 4000, "retrieval": 4000, "image": 1024, "pathfinder": 1024}
#: LRA Table 1: test accuracy (%) on ListOps, Text, Retrieval, Image, Pathfinder, by our mechanism names
PUBLISHED_ACCURACY: dict[str, tuple[float, float, float, float, float]] = {
    "vanilla": (36.37, 64.27, 57.46, 42.44, 71.40),
    "sparse_transformer": (17.07, 63.58, 59.59, 44.24, 71.71),
    "longformer": (35.63, 62.85, 56.89, 42.22, 69.71),
    "linformer": (35.70, 53.94, 52.27, 38.56, 76.34),
    "reformer": (37.27, 56.10, 53.40, 38.07, 68.50),
    "sinkhorn": (33.67, 61.20, 53.83, 41.23, 67.45),
    "synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45),
    "bigbird": (36.05, 64.02, 59.29, 40.83, 74.87),
    "linear_transformer": (16.13, 65.90, 53.09, 42.34, 75.30),
    "performer": (18.01, 65.40, 53.82, 42.77, 77.05),
}
PUBLISHED_LOCAL_ATTENTION = (15.82, 52.98, 53.39, 41.46, 66.63)  # "Local Attention": no mechanism of ours
PUBLISHED_EFFICIENCY_LENGTHS = (1024, 2048, 3072, 4096)
#: LRA Table 2: training steps per second and peak memory (GB) on Text at 1K, 2K, 3K, 4K
PUBLISHED_STEPS_PER_S: dict[str, tuple[float, float, float, float]] = {
    "vanilla": (8.1, 4.9, 2.3, 1.4), "linformer": (9.3, 9.1, 8.5, 7.7), "reformer": (4.4, 2.2, 1.5, 1.1),
    "sinkhorn": (9.1, 7.9, 6.6, 5.3), "synthesizer": (8.7, 5.7, 6.6, 1.9), "bigbird": (7.4, 3.9, 2.7, 1.5),
    "linear_transformer": (9.1, 9.3, 8.6, 7.8), "performer": (9.5, 9.4, 8.7, 8.0),
}
PUBLISHED_MEMORY_GB: dict[str, tuple[float, float, float, float]] = {
    "vanilla": (0.85, 2.65, 5.51, 9.48), "linformer": (0.37, 0.55, 0.99, 0.99), "reformer": (0.48, 0.99, 1.53, 2.28),
    "sinkhorn": (0.47, 0.83, 1.13, 1.48), "synthesizer": (0.65, 1.98, 4.09, 6.99), "bigbird": (0.77, 1.49, 2.18, 2.88),
    "linear_transformer": (0.37, 0.57, 0.80, 1.03), "performer": (0.37, 0.59, 0.82, 1.06),
}


def published_average(name: str) -> float:
    return sum(PUBLISHED_ACCURACY[name]) / 5


# ---------------------------------------------------------------------------------------------- rank correlation


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two equally long lists (exact, O(n^2)); None when either list is constant."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: lists of different lengths {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def rank_correlation(ours: dict[str, float]) -> dict[str, Any]:
    """Kendall's tau between our averages and LRA's, over the mechanisms both have (at least 2)."""
    common = [m for m in PUBLISHED_ACCURACY if m in ours and ours[m] is not None]
    out: dict[str, Any] = {"mechanisms": common, "n": len(common), "tau": None, "p_value": None}
    if len(common) < 2:
        out["note"] = "fewer than two mechanisms in common with LRA Table 1"
        return out
    x, y = [ours[m] for m in common], [published_average(m) for m in common]
    try:
        from scipy.stats import kendalltau
    except ImportError:
        out.update(tau=kendall_tau_b(x, y), method="exact tau-b (scipy not installed: no p-value)")
        return out
    result = kendalltau(x, y)
    tau, p = float(result.statistic), float(result.pvalue)
    out.update(tau=None if math.isnan(tau) else tau, p_value=None if math.isnan(p) else p,
               method="scipy.stats.kendalltau (tau-b)")
    return out


# ---------------------------------------------------------------------------------------------- Markdown


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(suite: dict[str, Any]) -> str:
    cfg, acc = suite["config"], suite["accuracy"]
    tasks, mechs = cfg["tasks"], cfg["mechanisms"]
    seeds = cfg.get("seeds") or [cfg.get("seed", 0)]
    lines = [f"# Long Range Arena suite ({'quick' if cfg['quick'] else 'full'})", ""]
    if cfg["quick"]:
        lines += ["Quick mode: generated stand-ins of the five tasks (not the official data) at short lengths, one "
                  "small model per task trained briefly; see the settings below and `eft lra --help`.", ""]
    lines += ["## Accuracy (LRA Table 1 layout)", "",
              f"Test accuracy (%) of the best-validation checkpoint, mean ± std over {len(seeds)} seed(s) "
              f"{seeds}; the last row predicts the training set's most frequent label.", ""]
    header = ["Model"] + [TASK_TITLES.get(t, t) for t in tasks] + ["Avg"]
    lines += [_row(header), "|" + "---|" * len(header)]
    errors = []
    for m in mechs:
        cells = []
        for t in tasks:
            r = acc["results"][t][m]
            if r["status"] == "ok":
                cells.append(_pct(r["test_accuracy"], r.get("test_accuracy_std") if len(seeds) > 1 else None))
            else:
                cells.append("error")
                errors.append(f"- {t} / {m}: {r['error']}")
        lines.append(_row([m] + cells + [_pct(acc["average"].get(m))]))
    base = [acc["majority_baseline"][t]["test"] for t in tasks]
    base_avg = sum(base) / len(base) if base and all(b is not None for b in base) else None
    lines.append(_row(["majority class"] + [_pct(b) for b in base] + [_pct(base_avg)]))
    if errors:
        lines += ["", "Failed runs:", ""] + errors
    margins = acc.get("vanilla_margin") or {}
    if margins:
        lines += ["", "Vanilla against the majority class, in binomial standard errors of the test set "
                  "(SE = sqrt(p (1 - p) / n) at the majority rate p): "
                  + ", ".join(f"{TASK_TITLES.get(t, t)} {v['margin_in_se']:+.1f} SE (n = {v['test_examples']})"
                              for t, v in margins.items() if v.get("margin_in_se") is not None) + "."]
    lines += _published_accuracy_lines(suite)
    lines += _parameter_lines(suite)
    lines += ["", "## Settings per task", ""]
    for t in tasks:
        p = cfg["presets"][t]
        steps = cfg["steps"] or p["train"]["steps"]
        sizes = p["sizes"]
        lines.append(f"- {t}: length {p['max_len']}, {p['model']['depth']} layer(s), dim {p['model']['dim']}, "
                     f"{p['model']['heads']} heads, FFN x{p['model']['ff_mult']}, {p['model']['pooling']} pooling, "
                     f"{steps} steps, batch {p['train']['batch_size']}, lr {p['train']['lr']}, "
                     f"data {cfg['data'].get(t, 'generated')}"
                     + (f" ({sizes[0]} / {sizes[1]} / {sizes[2]})" if sizes[0] else "")
                     + (f", task options {p['task_options']}" if p.get("task_options") else ""))
    budgets = {m: o for m, o in (cfg.get("budgets") or {}).items() if o and m in mechs}
    if budgets:
        lines += ["", "Mechanism budgets (attention options; others at their defaults): "
                  + "; ".join(f"{m} {o}" for m, o in budgets.items()) + "."]
    if cfg.get("budgets_2d"):
        lines += ["", "On the image-shaped tasks (the pixels on their grid): "
                  + "; ".join(f"{m} {o}" for m, o in cfg["budgets_2d"].items()) + "."]
    lines += _efficiency_lines(suite)
    lines += ["", f"Wall time: {suite['wall_time_s']} s (training {suite.get('training_wall_s')} s with "
              f"{cfg.get('jobs', 1)} run(s) side by side, efficiency {suite.get('efficiency_wall_s')} s).", ""]
    return "\n".join(lines)


def _published_accuracy_lines(suite: dict[str, Any]) -> list[str]:
    cfg, acc = suite["config"], suite["accuracy"]
    mechs = [m for m in cfg["mechanisms"] if m in PUBLISHED_ACCURACY]
    if not mechs:
        return []
    lengths = ", ".join(f"{TASK_TITLES[t]} {PUBLISHED_LENGTHS[t]}" + (" x 2" if t == "retrieval" else "")
                        for t in LRA_TASKS)
    lines = ["", "### Beside LRA's published Table 1 (theirs)", "",
             f"THEIRS: LRA's numbers at their lengths ({lengths}) on the official data; ours: this run. "
             "Rank = position by Avg among the mechanisms of this table (1 = best).", ""]
    header = ["Model"] + [f"{TASK_TITLES[t]} (theirs)" for t in LRA_TASKS] + ["Avg (theirs)", "Avg (ours)",
                                                                              "rank (theirs)", "rank (ours)"]
    theirs = {m: published_average(m) for m in mechs}
    ours = {m: acc["average"].get(m) for m in mechs}
    rank_theirs = _ranks(theirs)
    rank_ours = _ranks(ours)
    lines += [_row(header), "|" + "---|" * len(header)]
    for m in mechs:
        lines.append(_row([m] + [f"{v:.2f}" for v in PUBLISHED_ACCURACY[m]] + [
            f"{theirs[m]:.2f}", _pct(ours[m]), str(rank_theirs.get(m, "-")), str(rank_ours.get(m, "-"))]))
    tau = acc.get("rank_correlation") or {}
    if tau.get("tau") is not None:
        p = f", p = {tau['p_value']:.3f}" if tau.get("p_value") is not None else ""
        lines += ["", f"Kendall's tau between our Avg ranking and LRA's over these {tau['n']} mechanisms: "
                  f"**{tau['tau']:+.3f}**{p} ({tau.get('method')})."]
    elif tau:
        lines += ["", f"Kendall's tau: not defined ({tau.get('note', 'constant ranking')})."]
    return lines


def _ranks(values: dict[str, float | None]) -> dict[str, int]:
    present = sorted((v, m) for m, v in values.items() if v is not None)
    return {m: i + 1 for i, (_, m) in enumerate(sorted(present, key=lambda vm: -vm[0]))}


def _parameter_lines(suite: dict[str, Any]) -> list[str]:
    params = suite["accuracy"].get("parameters") or {}
    if not params:
        return []
    tasks = suite["config"]["tasks"]
    lines = ["", "### Parameters", "",
             "Trainable parameters of each run, and relative to vanilla on the same task (LRA's rule: within "
             "+10%); reasons for any excess below.", ""]
    header = ["Model"] + [TASK_TITLES.get(t, t) for t in tasks]
    lines += [_row(header), "|" + "---|" * len(header)]
    notes = []
    for m in suite["config"]["mechanisms"]:
        cells = []
        for t in tasks:
            p = params.get(t, {}).get(m)
            if not p:
                cells.append("-")
                continue
            ratio = p.get("vs_vanilla")
            cells.append(f"{p['parameters']:,}" + (f" ({ratio:.2f}x)" if ratio is not None and m != "vanilla" else ""))
        lines.append(_row([m] + cells))
        excess = [t for t in tasks if (params.get(t, {}).get(m) or {}).get("vs_vanilla", 1.0) > 1.10]
        note = suite["accuracy"].get("parameter_notes", {}).get(m)
        if excess:
            notes.append(f"- {m} (> 1.10x on {', '.join(excess)}): {note or 'no reason recorded'}")
    if notes:
        lines += [""] + notes
    return lines


def _efficiency_lines(suite: dict[str, Any]) -> list[str]:
    eff = suite["efficiency"]
    lines = ["", "## Efficiency (LRA Table 2 layout)", ""]
    if eff is None:
        return lines + ["Not measured (--no-bench)."]
    bc = eff["bench_config"]
    lines += [f"Training steps per second and peak memory of one step ({bc.get('what', 'train step')}): batch "
              f"{bc['batch']}, dim {bc['dim']}, {bc.get('depth', '?')} layer(s), {bc['heads']} heads, {bc['dtype']} on "
              f"{bc.get('device_name') or bc['device']} ({bc.get('threads', '?')} thread(s)), measured after training. "
              "In brackets: relative to vanilla at the same length (speed: vanilla's time / time; memory: peak / "
              "vanilla's peak).", ""]
    n_list = eff["lengths"]
    header = ["Model"] + [f"steps/s N={n}" for n in n_list] + [f"peak MiB N={n}" for n in n_list]
    lines += [_row(header), "|" + "---|" * len(header)]
    for m, cells in eff["table"].items():
        speed = [_eff(cells.get(str(n)), "time_ms", "speedup", steps=True) for n in n_list]
        mem = [_eff(cells.get(str(n)), "peak_mem_mb", "mem_ratio") for n in n_list]
        lines.append(_row([m] + speed + mem))
    mechs = [m for m in eff["table"] if m in PUBLISHED_STEPS_PER_S]
    if mechs:
        lines += ["", "THEIRS: LRA Table 2 (Text task, 1K-4K, batch 32, 4x4 TPU v3): steps/s (x vanilla) and peak "
                  "memory GB per device.", ""]
        header = (["Model"] + [f"steps/s {n // 1024}K (theirs)" for n in PUBLISHED_EFFICIENCY_LENGTHS]
                  + [f"GB {n // 1024}K (theirs)" for n in PUBLISHED_EFFICIENCY_LENGTHS])
        lines += [_row(header), "|" + "---|" * len(header)]
        ref = PUBLISHED_STEPS_PER_S["vanilla"]
        for m in mechs:
            sp, gb = PUBLISHED_STEPS_PER_S[m], PUBLISHED_MEMORY_GB[m]
            lines.append(_row([m] + [f"{s} ({s / r:.1f}x)" for s, r in zip(sp, ref)] + [f"{g}" for g in gb]))
    return lines


def _eff(cell: dict[str, Any] | None, key: str, ratio_key: str, steps: bool = False) -> str:
    if not cell:
        return "missing"
    if cell["status"] != "ok":
        return cell["status"]
    value = cell.get(key)
    if value is None:
        text = "-"
    else:
        text = f"{1e3 / value:.3g}" if steps else f"{value:.3g}"
    ratio = cell.get(ratio_key)
    return text + (f" ({ratio:.2f}x)" if ratio is not None else "")


# ---------------------------------------------------------------------------------------------- the figure


def figure(suite: dict[str, Any], path: str | Path) -> str | None:
    """LRA Figure 3: average accuracy against training speed relative to vanilla at the longest length,
    the point's area proportional to peak memory relative to vanilla. Returns None (written) or why not."""
    eff = suite.get("efficiency")
    if eff is None:
        return "no efficiency table (--no-bench)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install efficient-transformers[lra])"
    n = str(max(eff["lengths"]))
    points = []
    for m, avg in suite["accuracy"]["average"].items():
        cell = eff["table"].get(m, {}).get(n) or {}
        if avg is None or cell.get("status") != "ok" or cell.get("speedup") is None:
            continue
        points.append((m, cell["speedup"], 100 * avg, cell.get("mem_ratio") or 1.0))
    if not points:
        return "no mechanism has both an average accuracy and a speed"
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for m, speed, accuracy, mem in points:
        ax.scatter([speed], [accuracy], s=300 * mem, alpha=0.5)
        ax.annotate(m, (speed, accuracy), fontsize=8, ha="center", va="bottom", xytext=(0, 6),
                    textcoords="offset points")
    ax.set_xlabel(f"training speed relative to vanilla at N = {n} (x)")
    ax.set_ylabel("average test accuracy over the tasks (%)")
    ax.set_title(f"eft lra{' --quick' if suite['config']['quick'] else ''}: accuracy vs speed "
                 "(area: peak memory vs vanilla)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
