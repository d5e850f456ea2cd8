"""Derived figures on synthetic rows: slopes, the stated exponent, the check, the crossover, ratios."""

from __future__ import annotations

import math
import random

import pytest

from efficient_transformers.bench import analysis


def test_slope_of_power_laws_is_their_exponent():
    lengths = [256, 512, 1024, 2048, 4096]
    assert analysis.fit_loglog_slope([(n, 3e-6 * n**2) for n in lengths]) == pytest.approx(2.0)
    assert analysis.fit_loglog_slope([(n, 0.7 * n) for n in lengths]) == pytest.approx(1.0)
    assert analysis.fit_loglog_slope([(n, 5 * n**1.5) for n in lengths], top=5) == pytest.approx(1.5)


def test_slope_uses_only_the_largest_lengths():
    # Fixed cost dominates small N: t = 10 + 1e-5 N^2. Over the top 3 the slope approaches 2.
    points = [(n, 10 + 1e-5 * n**2) for n in (64, 128, 256, 4096, 8192, 16384)]
    over_all = analysis.fit_loglog_slope(points, top=6)
    over_top3 = analysis.fit_loglog_slope(points, top=3)
    assert over_top3 == pytest.approx(
        analysis.fit_loglog_slope([(n, v) for n, v in points if n >= 4096], top=3))
    assert over_all < 1.5 < 1.9 < over_top3 < 2.0


def test_slope_is_robust_to_small_noise_and_skips_missing_values():
    rng = random.Random(0)
    lengths = [1024, 2048, 4096, 8192]
    noisy = [(n, n**2 * (1 + rng.uniform(-0.05, 0.05))) for n in lengths]
    assert analysis.fit_loglog_slope(noisy, top=4) == pytest.approx(2.0, abs=0.1)
    assert analysis.fit_loglog_slope([(1024, None), (2048, 0.0), (4096, 5.0), (8192, 10.0)]) == pytest.approx(1.0)
    assert analysis.fit_loglog_slope([(1024, 5.0), (2048, None)]) is None
    assert analysis.fit_loglog_slope([]) is None


@pytest.mark.parametrize(
    ("complexity", "expected"),
    [
        ("O(N^2)", (2.0, False)), ("O(N²)", (2.0, False)), ("O(N)", (1.0, False)), ("O(N log N)", (1.0, True)),
        ("O(N√N)", (1.5, False)), ("O(kN)", (1.0, False)), ("O(N·m)", (1.0, False)), ("O(n(k+m))", (1.0, False)),
        ("O(N_g² + N·N_g)", (1.0, False)), ("O(N_c²)", (2.0, False)), ("O(n^1.5·d)", (1.5, False)),
        ("O(n²/k)", (2.0, False)), ("O(sqrt(N) N)", (1.5, False)),
        ("O(B²)", None), ("O(layers × segment length)", None), ("linear", None), ("O(N log N", None),
    ],
)
def test_stated_exponent_is_read_from_the_card(complexity, expected):
    assert analysis.expected_exponent(complexity) == expected


def test_check_flags_slopes_above_the_stated_complexity():
    linear, n_log_n = (1.0, False), (1.0, True)
    assert analysis.exceeds_stated(1.9, linear) is True  # quadratic in disguise
    assert analysis.exceeds_stated(1.25, linear) is False
    assert analysis.exceeds_stated(1.4, n_log_n) is False and analysis.exceeds_stated(1.5, n_log_n) is True
    assert analysis.exceeds_stated(1.1, (2.0, False)) is False  # better than stated is fine
    assert analysis.exceeds_stated(None, linear) is None and analysis.exceeds_stated(1.0, None) is None
    assert analysis.exceeds_stated(1.4, linear, analysis.TIME_SLOPE_TOLERANCE) is False  # time is judged looser


def row(n, status="ok", ratio=None, mechanism="m", mode="train", **extra):
    return {"mechanism": mechanism, "seq_len": n, "mode": mode, "status": status,
            "time_ratio_vs_vanilla": ratio, **extra}


def base(n, status="ok"):
    return row(n, status, 1.0, mechanism="vanilla")


@pytest.mark.parametrize(
    ("ratios", "baseline_status", "expected"),
    [
        ({512: 1.5, 1024: 0.9, 2048: 0.5, 4096: 0.3}, {}, 1024),
        ({512: 0.8, 1024: 1.1, 2048: 0.5, 4096: 0.3}, {}, 2048),  # a dip back above 1 resets it
        ({512: 0.8, 1024: 0.7}, {}, 512),  # faster everywhere measured
        ({512: 1.5, 1024: 1.2, 2048: 1.01}, {}, None),  # never faster
        ({512: 1.5, 1024: 0.9, 2048: 0.8, 4096: "oom"}, {}, None),  # fails where vanilla runs: not faster
        ({512: 1.5, 1024: 0.9, 2048: None, 4096: None}, {2048: "oom", 4096: "timeout"}, 1024),  # runs where vanilla cannot
        ({512: 1.5, 1024: 0.9, 2048: "oom"}, {2048: "oom"}, 1024),  # neither ran at 2048: no evidence
    ],
)
def test_crossover_length(ratios, baseline_status, expected):
    rows = [row(n, "ok", r) if not isinstance(r, str) else row(n, r) for n, r in ratios.items()]
    baseline = [base(n, baseline_status.get(n, "ok")) for n in ratios]
    assert analysis.crossover_length(list(reversed(rows)), baseline) == expected


def test_summary_and_memory_ratios_from_synthetic_rows():
    lengths = (1024, 2048, 4096)
    rows = []
    for n in lengths:
        rows.append(row(n, ratio=1.0, mechanism="vanilla", time_ms=1e-6 * n**2, peak_mem_mb=1e-3 * n, flops=4 * n**2))
        rows.append(row(n, ratio=(2e-3 * n) / (1e-6 * n**2), mechanism="performer", time_ms=2e-3 * n,
                        peak_mem_mb=3e-3 * n, flops=40 * n))
        rows.append(row(n, ratio=1.5, mechanism="fake_linear", time_ms=1.5e-6 * n**2, peak_mem_mb=1e-5 * n**2,
                        flops=4 * n**2))
    analysis.add_memory_ratios(rows)
    assert [r["mem_ratio_vs_vanilla"] for r in rows if r["mechanism"] == "performer"] == [pytest.approx(3.0)] * 3
    summary = analysis.summarize(rows, {"vanilla": "O(N^2)", "performer": "O(N)", "fake_linear": "O(N)"})
    assert set(summary) == {"vanilla", "performer", "fake_linear"}
    perf = summary["performer"]["train"]
    assert perf["time_slope"] == pytest.approx(1.0) and perf["mem_slope"] == pytest.approx(1.0)
    assert perf["flops_slope"] == pytest.approx(1.0)
    # t_perf / t_vanilla = 2000 / n: 1.95 at 1024, 0.98 at 2048, 0.49 at 4096: crossover 2048.
    assert perf["crossover_len"] == 2048
    assert perf["time_exceeds_stated"] is False and perf["mem_exceeds_stated"] is False
    assert perf["slope_lengths"] == list(lengths) and perf["max_len_run"] == 4096
    fake = summary["fake_linear"]["train"]
    assert fake["time_slope"] == pytest.approx(2.0) and fake["time_exceeds_stated"] is True
    assert fake["mem_exceeds_stated"] is True and fake["flops_exceeds_stated"] is True
    assert fake["crossover_len"] is None and perf["flops_exceeds_stated"] is False
    assert summary["vanilla"]["train"]["crossover_len"] is None
    assert summary["vanilla"]["train"]["time_slope"] == pytest.approx(2.0)
    assert summary["vanilla"]["train"]["stated_exponent"] == 2.0
    assert math.isclose(summary["performer"]["train"]["mem_ratio_at_max_len"], 3.0)
