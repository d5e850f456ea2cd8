"""bench.md and the plots rendered from a synthetic result (no measuring): every cell kind, the
noisy marker, the check flags, the crossover wording, one plot panel per taxonomy class."""

from __future__ import annotations

from efficient_transformers.bench import analysis, harness, report, runner


def synthetic_result():
    config = runner._config(["vanilla"], True, [1024, 2048, 4096], ["train"], 1, 256, 4,
                            "float32", False, "cpu", True, harness.TimingPlan(5, 3, 1.5, 30.0, 0.01),
                            runner.QUICK_EFFORT)
    # cards written here, so the test does not depend on which mechanisms are registered
    config["mechanisms"] = ["vanilla", "performer", "linformer"]
    config["cards"]["performer"] = {"title": "Performer", "classes": ["KR"], "complexity": "O(N)",
                                    "causal": True, "bidirectional": True}
    config["cards"]["linformer"] = {"title": "Linformer", "classes": ["LR"], "complexity": "O(N)",
                                    "causal": False, "bidirectional": True}
    config.update(matmul_gflops=100.0, wall_time_s=12.0, complete=True, files=["bench.json", "bench.md"])
    rows = []
    for n in (1024, 2048, 4096):
        vanilla_ms = 1e-5 * n**2
        rows.append(dict(runner._empty_row(harness.Workload("vanilla", n, "train")), time_ms=vanilla_ms,
                         time_spread=0.05, time_ratio_vs_vanilla=1.0, speedup_vs_vanilla=1.0, peak_mem_mb=0.01 * n,
                         flops=10 * n**2, gflops_per_s=10 * n**2 / vanilla_ms / 1e6, matmul_fraction=1.0))
        perf_ms = 0.05 * n
        rows.append(dict(runner._empty_row(harness.Workload("performer", n, "train")), time_ms=perf_ms,
                         time_spread=0.6 if n == 2048 else 0.1, time_ratio_vs_vanilla=perf_ms / vanilla_ms,
                         speedup_vs_vanilla=vanilla_ms / perf_ms, peak_mem_mb=1e-5 * n**2, flops=100 * n,
                         gflops_per_s=100 * n / perf_ms / 1e6))
        lin = dict(runner._empty_row(harness.Workload("linformer", n, "train")))
        runner._fail(lin, "oom" if n == 4096 else "timeout", "synthetic")
        rows.append(lin)
    result = {"config": config, "rows": rows}
    complexities = {n: c["complexity"] for n, c in config["cards"].items()}
    analysis.add_memory_ratios(rows)
    result["summary"] = analysis.summarize(rows, complexities)
    return result


def test_markdown_cells_flags_and_crossover():
    text = report.markdown(synthetic_result())
    # time: vanilla 10.5 ms at 1024; performer 51.2 ms (0.20x) at 1024, noisy at 2048, 5.12x faster at 4096
    assert "| Transformer (`vanilla`) | 10.5 (1.00×) | 41.9 (1.00×) | 168 (1.00×) |" in text
    assert "| Performer (`performer`) | 51.2 (0.20×) | 102* (0.41×) | 205 (0.82×) |" in text
    assert "| Linformer (`linformer`) | timeout | timeout | OOM |" in text
    # memory of the performer is quadratic here: the check must say so
    assert "| Performer (`performer`) | KR | O(N) | 1 | 1.00 | 2.00 | 1.00 | memory above stated (train) |" in text
    assert "| Performer (`performer`) | none up to N=4096 |" in text
    assert "| Linformer (`linformer`) | 4096 | train | oom | synthetic |" in text
    assert "| Linformer (`linformer`) | not measured: timeout, oom |" in text
    assert "| Transformer (`vanilla`) | 1.00 (100%); 0.0105 | 1.00 (100%); 0.0419 | 1.00 (100%); 0.17 |" in text


def test_plots_one_panel_per_class(tmp_path):
    notes: list[str] = []
    files = report.write_plots(synthetic_result(), tmp_path, notes)
    assert files == ["time_train.png", "memory_train.png"] and notes == []
    from PIL import Image  # matplotlib depends on pillow

    width, height = Image.open(tmp_path / "time_train.png").size
    assert width > height  # performer's KR panel only (linformer never ran): one panel, landscape
    assert report._panels(synthetic_result()["config"], {"vanilla": 1, "performer": 1, "linformer": 1}) == [
        ("LR: low rank", ["vanilla", "linformer"]), ("KR: kernels", ["vanilla", "performer"])]
