"""`eft bench` end to end on a tiny configuration, the JSON schema, bad arguments, the unsupported,
given-up and interrupted paths."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest

from efficient_transformers import cli, registry
from efficient_transformers.bench import runner

ROW_KEYS = {"mechanism", "seq_len", "mode", "batch", "dim", "heads", "time_ms", "peak_mem_mb", "flops", "status",
            "error", "time_ratio_vs_vanilla", "speedup_vs_vanilla", "mem_ratio_vs_vanilla", "gflops_per_s",
            "matmul_fraction", "time_samples_ms", "rounds", "inner"}
SUMMARY_KEYS = {"time_slope", "mem_slope", "flops_slope", "crossover_len", "stated_complexity", "stated_exponent",
                "time_exceeds_stated", "mem_exceeds_stated", "slope_lengths"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tmp"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["bench", "--mechanisms", "vanilla", "--lengths", "64,128", "--mode", "forward",
                         "--out", str(out), "--json", "--repeats", "3", "--quick"])
    return code, out, stdout.getvalue()


def test_cli_writes_json_markdown_and_plots(tiny_run):
    code, out, stdout = tiny_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "memory_forward.png", "time_forward.png"]
    for png in ("memory_forward.png", "time_forward.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "bench.json").read_text())
    assert json.loads(stdout) == result  # --json prints the same object


def test_json_schema_and_values(tiny_run):
    result = json.loads((tiny_run[1] / "bench.json").read_text())
    assert set(result) == {"config", "rows", "summary"}
    config = result["config"]
    assert config["mechanisms"] == ["vanilla"] and config["lengths"] == [64, 128] and config["modes"] == ["forward"]
    assert (config["dim"], config["heads"], config["batch"], config["dtype"]) == (256, 4, 1, "float32")
    assert config["complete"] is True and config["interrupted"] is False and config["matmul_gflops"] > 0
    assert config["files"] == ["bench.json", "bench.md", "time_forward.png", "memory_forward.png"]
    assert [(r["mechanism"], r["seq_len"], r["mode"]) for r in result["rows"]] == [("vanilla", 64, "forward"),
                                                                                   ("vanilla", 128, "forward")]
    for r in result["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["status"] == "ok" and r["error"] is None
        assert r["time_ms"] > 0 and r["rounds"] == 3 and len(r["time_samples_ms"]) == 3
        assert min(r["time_samples_ms"]) <= r["time_ms"] <= max(r["time_samples_ms"])
        assert r["time_ratio_vs_vanilla"] == 1.0 and r["mem_ratio_vs_vanilla"] == 1.0
        assert r["peak_mem_mb"] > 0
        n = r["seq_len"]
        assert r["flops"] == 2 * n * 256 * 4 * 256 + 4 * 4 * n * n * 64  # projections + fused attention
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["time_ms"] / 1e6)
        assert r["matmul_fraction"] == pytest.approx(r["gflops_per_s"] / config["matmul_gflops"])
    summary = result["summary"]["vanilla"]["forward"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["crossover_len"] is None and summary["slope_lengths"] == [64, 128]
    assert summary["flops_slope"] > 1.0 and summary["stated_complexity"] == "O(N^2)"


def test_markdown_report_states_config_and_tables(tiny_run):
    text = (tiny_run[1] / "bench.md").read_text()
    for expected in ("## Configuration", "| batch, dim, heads (head dim) | 1, 256, 4 (64) |", "float32",
                     "LRA Table 2 layout", "| Model | N=64 | N=128 |", "(1.00×)", "## Fitted complexity",
                     "O(N^2)", "## Crossover length", "| Transformer (`vanilla`) | baseline |",
                     "smallest measured N from which", "GFLOP/s", "![time_forward](time_forward.png)"):
        assert expected in text, expected


def test_bad_arguments_name_the_bad_value(capsys, tmp_path):
    assert cli.main(["bench", "--mechanisms", "nosuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "registered" in err and "vanilla" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--lengths", "64,abc"])
    assert "'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--mode", "forward,backward"])
    assert "backward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--threads", "0"])
    err = capsys.readouterr().err
    assert "'0'" in err and "'auto'" in err
    for kwargs, words in [({"modes": ()}, "mode"), ({"dim": 30, "heads": 4}, "heads=4 does not divide dim=30"),
                          ({"dtype": "int8"}, "int8"), ({"device": "tpu"}, "tpu"), ({"lengths": (0, 64)}, "lengths"),
                          ({"timeout_s": -1}, "timeout_s")]:
        with pytest.raises(ValueError, match=words):
            runner.run_benchmark(out_dir=tmp_path, **kwargs)


def test_busy_machine_means_more_load_than_half_the_cpus(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    assert runner.machine_is_busy(2.5) and not runner.machine_is_busy(1.5) and not runner.machine_is_busy(None)


def _encoder_only_registry(monkeypatch):
    """vanilla's card made encoder-only, for the causal=True path (nothing is registered)."""
    card = registry.card("vanilla")
    encoder_only = dataclasses.replace(card, causal=False, decoding="none")
    monkeypatch.setattr(runner.registry, "mechanisms", lambda: [encoder_only])
    monkeypatch.setattr(runner.registry, "mechanism_names", lambda: ["vanilla"])


def test_unsupported_mode_is_listed_not_run(monkeypatch, tmp_path):
    _encoder_only_registry(monkeypatch)
    result = runner.run_benchmark(lengths=(32,), modes=("forward",), causal=True, out_dir=tmp_path,
                                  quick=True, progress=False)
    (only,) = result["rows"]
    assert only["status"] == "unsupported" and only["time_ms"] is None
    assert "causal=True is not supported" in only["error"] and "allowed: causal=False" in only["error"]
    assert "n/a" in (tmp_path / "bench.md").read_text()


class FakeServer:
    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def measure(self, work_json, timeout_s, **_):
        self.requests.append(work_json["seq_len"])
        return self.answers[work_json["seq_len"]]


def test_out_of_time_at_n_is_not_retried_at_larger_n(tmp_path):
    config = runner._config(["vanilla"], False, [32, 64, 128], ["train"], 1, 16, 2, "float32", False, "cpu",
                            True, runner.harness.TimingPlan(3, 3, 1.0, 5.0, 0.01), runner.QUICK_EFFORT)
    bench = runner._Benchmark(config, runner.harness.TimingPlan(3, 3, 1.0, 5.0, 0.01), tmp_path, progress=False)
    server = FakeServer({32: {"status": "error", "error": "boom"}, 64: {"status": "timeout", "error": "limit 5 s"}})
    rows = [bench._block(server, n, "train")[0] for n in (32, 64, 128)]
    assert server.requests == [32, 64]  # an error does not stop larger N; a timeout does
    assert [r["status"] for r in rows] == ["error", "timeout", "timeout"]
    assert rows[2]["error"] == "not run: timeout at N=64 (limit 5 s)"


def test_interrupt_leaves_partial_results(monkeypatch, tmp_path):
    real = runner.harness.time_interleaved
    calls = {"n": 0}

    def interrupted_on_second_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner.harness, "time_interleaved", interrupted_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(mechanisms=["vanilla"], lengths=(32, 64), modes=("forward",), dim=32, heads=2,
                             repeats=1, quick=True, out_dir=tmp_path, progress=False)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["config"]["interrupted"] is True and result["config"]["complete"] is False
    assert [(r["seq_len"], r["status"]) for r in result["rows"]] == [(32, "ok")]
    assert "interrupted" in (tmp_path / "bench.md").read_text()


def test_a_probe_peak_over_half_the_available_memory_is_not_timed_in_process(monkeypatch, tmp_path):
    config = runner._config(["vanilla"], False, [32, 64], ["train"], 1, 16, 2, "float32", False, "cpu",
                            True, runner.harness.TimingPlan(3, 3, 1.0, 5.0, 0.01), runner.QUICK_EFFORT)
    bench = runner._Benchmark(config, runner.harness.TimingPlan(3, 3, 1.0, 5.0, 0.01), tmp_path, progress=False)
    monkeypatch.setattr(runner, "_available_memory_mb", lambda: 1000.0)
    real = runner.harness.time_interleaved

    def nothing_timed(steps, *args, **kwargs):
        assert not steps, f"timed in process: {list(steps)}"
        return real(steps, *args, **kwargs)

    monkeypatch.setattr(runner.harness, "time_interleaved", nothing_timed)
    server = FakeServer({32: {"status": "ok", "peak_mem_mb": 600.0, "first_step_ms": 1.0}})
    rows = [bench._block(server, n, "train")[0] for n in (32, 64)]
    assert server.requests == [32]  # given up for larger N too
    assert [r["status"] for r in rows] == ["oom", "oom"] and rows[0]["peak_mem_mb"] == 600.0
    assert "600 MiB" in rows[0]["error"] and "50%" in rows[0]["error"] and "1000 MiB available" in rows[0]["error"]


def test_available_memory_is_read_from_proc_meminfo():
    available = runner._available_memory_mb()
    assert available is None or 0 < available < 1 << 30
