"""`eft advise`: the ranking follows the measured numbers it is given (synthetic bench JSON), the
budget, the crossover estimate, the cache (reuse, invalidation by torch version, machine, threads),
bad input (exit 2 with a message, never a traceback), and one tiny real run: pure JSON, PNG written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from efficient_transformers import cli, native
from efficient_transformers.bench import advise, analysis, harness, runner

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_bench(times: dict[str, dict[int, float | str]], mems: dict[str, float] | None = None, *,
                    mode: str = "train", causal: bool = False, device_name: str | None = None) -> dict:
    """An `eft bench` result with the given times (ms per mechanism and N; a string is a failure status)
    and peak memories (MiB, the same at every N), measured 'on this machine' unless device_name says else."""
    names = list(times)
    lengths = sorted({n for per in times.values() for n in per})
    plan = harness.TimingPlan(5, 3, 1.0, 30.0, 0.01)
    config = runner._config(["vanilla"], False, lengths, [mode], 1, 256, 4, "float32", causal, "cpu", True, plan,
                            runner.QUICK_EFFORT)
    config["mechanisms"] = names
    for name in names:
        config["cards"].setdefault(name, {"title": name, "classes": ["KR"], "complexity": "O(N)", "causal": True,
                                          "bidirectional": True})
    config.update(complete=True, device_name=device_name or config["device_name"])
    rows = []
    for name in names:
        for n in lengths:
            row = runner._empty_row(harness.Workload(name, n, mode, causal=causal))
            value = times[name].get(n)
            if isinstance(value, str):
                runner._fail(row, value, f"synthetic {value} at N={n}")
            else:
                ref = times["vanilla"][n]
                row.update(time_ms=value, time_ratio_vs_vanilla=value / ref if isinstance(ref, float) else None,
                           peak_mem_mb=(mems or {}).get(name, 10.0), time_spread=0.01)
                row["speedup_vs_vanilla"] = 1 / row["time_ratio_vs_vanilla"] if row["time_ratio_vs_vanilla"] else None
            rows.append(row)
    analysis.add_memory_ratios(rows)
    return {"config": config, "rows": rows,
            "summary": analysis.summarize(rows, {n: c["complexity"] for n, c in config["cards"].items()})}


QUADRATIC_VS_LINEAR = {
    "vanilla": {512: 10.0, 1024: 40.0},             # ~ N^2
    "linear_transformer": {512: 20.0, 1024: 40.0 * 0.5},  # ~ N: ratio 2 at 512, 0.5 at 1024
    "performer": {512: 30.0, 1024: 60.0},           # ~ N, but slower: ratio 3 at 512, 1.5 at 1024
}


def settings(**kw) -> advise.Settings:
    return advise.Settings(**{"length": 1024, **kw})


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------------------------------- ranking
def test_ranking_follows_the_measured_times():
    bench = synthetic_bench(QUADRATIC_VS_LINEAR, {"vanilla": 12.0, "linear_transformer": 6.0, "performer": 30.0})
    advice = advise.advise(bench, settings())
    assert [e["mechanism"] for e in advice["ranking"]] == ["linear_transformer", "vanilla", "performer"]
    best = advice["ranking"][0]
    assert best["rank"] == 1 and best["speedup_vs_vanilla"] == pytest.approx(2.0)
    assert best["mem_ratio_vs_vanilla"] == pytest.approx(0.5)
    # ratio 2 at 512, 0.5 at 1024: slope -2 in log-log, so the ratio is 1 at N = 512 * sqrt(2)
    assert best["crossover"]["estimate"] == round(512 * math.sqrt(2))
    assert best["crossover"]["measured"] == 1024 and not best["crossover"]["extrapolated"]
    text = advice["recommendation"]["text"]
    assert advice["recommendation"]["mechanism"] == "linear_transformer"
    assert "linear_transformer is 2.00× faster than exact attention" in text and "20.00 ms vs 40.00 ms" in text
    assert f"Below N ≈ {round(512 * math.sqrt(2))} use exact attention" in text
    # performer: ratio 3 -> 1.5 (slope -1), extrapolated crossover at 1024 * 1.5
    assert advice["ranking"][2]["crossover"]["estimate"] == 1536 and advice["ranking"][2]["crossover"]["extrapolated"]

    slower = {**QUADRATIC_VS_LINEAR, "linear_transformer": {512: 20.0, 1024: 80.0}}  # the same times flip the order
    only = advise.advise(bench, settings(mechanisms=("vanilla", "performer")))
    assert [e["mechanism"] for e in only["ranking"]] == ["vanilla", "performer"] and not only["excluded"]

    advice = advise.advise(synthetic_bench(slower), settings())
    assert [e["mechanism"] for e in advice["ranking"]] == ["vanilla", "performer", "linear_transformer"]
    assert advice["ranking"][2]["crossover"]["text"] == "none"
    text = advice["recommendation"]["text"]
    assert "exact attention (vanilla) is the fastest here: 40.00 ms" in text
    assert "The fastest alternative, performer, takes 1.50× as long" in text and "N ≈ 1536" in text


def test_mode_and_inference_pick_the_forward_rows():
    bench = synthetic_bench(QUADRATIC_VS_LINEAR, mode="forward")
    advice = advise.advise(bench, settings(mode="inference"))
    assert advice["ranking"][0]["mechanism"] == "linear_transformer"
    with pytest.raises(advise.AdviseError, match="no mechanism can take N = 1024"):
        advise.advise(bench, settings(mode="train"))  # no train rows: nothing measured in that mode


def test_budget_filters_and_a_budget_nothing_meets_shows_the_closest():
    bench = synthetic_bench(QUADRATIC_VS_LINEAR, {"vanilla": 12.0, "linear_transformer": 64.0, "performer": 30.0})
    advice = advise.advise(bench, settings(), max_memory_mb=32)
    assert [e["mechanism"] for e in advice["ranking"]] == ["vanilla", "performer"]
    (over,) = [e for e in advice["excluded"] if e["status"] == "over budget"]
    assert over["mechanism"] == "linear_transformer" and "64.0 MiB > the budget of 32 MiB" in over["reason"]
    assert "Over the budget of 32 MiB: linear_transformer (64.0 MiB)" in advice["recommendation"]["text"]
    with pytest.raises(advise.AdviseError) as err:
        advise.advise(bench, settings(), max_memory_mb=5)
    message = str(err.value)
    assert "no mechanism fits the budget of 5 MiB" in message and "the closest" in message
    assert message.index("vanilla: 12.0 MiB") < message.index("performer: 30.0 MiB")  # closest first


def test_failures_at_n_are_excluded_with_their_reason():
    times = {"vanilla": {512: 10.0, 1024: "oom"}, "linear_transformer": {512: 20.0, 1024: 25.0},
             "linformer": {512: "unsupported", 1024: "unsupported"}}
    advice = advise.advise(synthetic_bench(times, causal=True), settings(causal=True))
    assert [e["mechanism"] for e in advice["ranking"]] == ["linear_transformer"]
    excluded = {e["mechanism"]: e for e in advice["excluded"]}
    assert excluded["vanilla"]["status"] == "oom" and excluded["linformer"]["status"] == "unsupported"
    assert "exact attention did not run (oom" in advice["recommendation"]["text"]
    assert "It decodes with a constant-size recurrent state" in advice["recommendation"]["text"]


def test_a_length_nothing_can_take_lists_every_reason(tmp_path, capsys):
    times = {"vanilla": {512: 10.0, 1024: "oom"}, "linear_transformer": {512: 20.0, 1024: "timeout"}}
    path = write(tmp_path, "bench.json", synthetic_bench(times))
    code = cli.main(["advise", "--length", "1024", "--bench", path, "--mechanisms", "vanilla,linear_transformer",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no mechanism can take N = 1024" in err
    assert "vanilla: oom: synthetic oom at N=1024" in err and "linear_transformer: timeout" in err
    assert "Traceback" not in err


def test_lra_accuracy_joins_the_table(tmp_path, capsys):
    lra = {"config": {"tasks": ["listops", "text"]}, "accuracy": {"results": {
        "listops": {"vanilla": {"status": "ok", "test_accuracy": 0.4},
                    "linear_transformer": {"status": "ok", "test_accuracy": 0.3}},
        "text": {"vanilla": {"status": "ok", "test_accuracy": 0.6},
                 "linear_transformer": {"status": "error", "error": "boom"}}}}}
    bench = write(tmp_path, "bench.json", synthetic_bench(QUADRATIC_VS_LINEAR))
    assert cli.main(["advise", "--length", "1024", "--bench", bench, "--lra", write(tmp_path, "lra.json", lra),
                     "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "LRA acc. %" in out and "| 50.0 " in out and "30.0 (1/2 tasks)" in out
    assert "averages 30.0% test accuracy (exact attention 50.0%)" in out


# ---------------------------------------------------------------------------------------- bad input
def test_bench_files_of_another_schema_or_machine_are_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    lra_like = write(tmp_path, "lra.json", {"config": {}, "accuracy": {"results": {}}})
    assert cli.main(["advise", "--length", "1024", "--bench", lra_like, *out]) == 2
    assert "is not an `eft bench` result" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cli.main(["advise", "--length", "1024", "--bench", str(broken), *out]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert cli.main(["advise", "--length", "1024", "--bench", str(tmp_path / "missing.json"), *out]) == 2
    assert "cannot read the bench file" in capsys.readouterr().err
    elsewhere = write(tmp_path, "other.json", synthetic_bench(QUADRATIC_VS_LINEAR, device_name="Other CPU (64 logical CPUs)"))
    assert cli.main(["advise", "--length", "1024", "--bench", elsewhere, *out]) == 2
    err = capsys.readouterr().err
    assert "measured on another machine" in err and "'Other CPU (64 logical CPUs)'" in err and "--any-machine" in err
    assert cli.main(["advise", "--length", "1024", "--bench", elsewhere, "--any-machine", *out]) == 0
    assert cli.main(["advise", "--length", "1024", "--lra", write(tmp_path, "b.json", {"rows": []}), *out]) == 2
    assert "is not an `eft lra` result" in capsys.readouterr().err


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(["advise", "--length", "64", "--mechanisms", "vanilla,nosuch", *out]) == 2
    err = capsys.readouterr().err
    assert "unknown mechanism(s) ['nosuch']" in err and "registered" in err
    assert cli.main(["advise", "--length", "64", "--dim", "30", "--heads", "4", *out]) == 2
    assert "--heads 4 does not divide --dim 30" in capsys.readouterr().err
    for bad in (["--length", "0"], ["--length", "abc"], ["--length", "64", "--max-memory-mb", "-1"],
                ["--length", "64", "--mode", "decode"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["advise", *bad])
        assert exit_.value.code == 2
    assert not (tmp_path / "cache").exists()  # nothing was measured


# ---------------------------------------------------------------------------------------- the cache
@pytest.fixture
def fake_benchmark(monkeypatch):
    """run_benchmark replaced by one that writes a synthetic result; counts the measurements."""
    calls = []

    def fake(*, out_dir, lengths, modes, **kwargs):
        calls.append({"lengths": list(lengths), "modes": list(modes), **kwargs})
        times = {"vanilla": {n: 1e-4 * n * n for n in lengths}, "linear_transformer": {n: 0.05 * n for n in lengths}}
        result = synthetic_bench(times, mode=modes[0], causal=kwargs["causal"])
        (out_dir / "bench.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(advise, "run_benchmark", fake)
    return calls


def test_cache_is_reused_and_invalidated_by_the_key(tmp_path, monkeypatch, fake_benchmark):
    root = tmp_path / "cache"
    s = settings(length=256, mechanisms=("vanilla", "linear_transformer"))
    quiet = {"say": lambda text: None}
    result, source = advise.measure(s, cache_dir=root, threads=1, **quiet)
    assert source["kind"] == "measured" and fake_benchmark[0]["lengths"] == [128, 256]
    assert fake_benchmark[0]["mechanisms"] == ["vanilla", "linear_transformer"]
    again, source = advise.measure(s, cache_dir=root, threads=1, **quiet)
    assert source["kind"] == "cache" and len(fake_benchmark) == 1 and again == result
    stored = json.loads((root / source["path"].split("/")[-2] / "key.json").read_text())
    assert stored["torch"] == advise.torch_version() and stored["threads"] == 1 and stored["machine"]["cpu"]

    monkeypatch.setattr(advise, "torch_version", lambda: "9.9.9")
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "measured"
    assert len(fake_benchmark) == 2
    monkeypatch.setattr(advise, "machine_key", lambda device="cpu": {"cpu": "another CPU (128 logical CPUs)"})
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "measured"
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "cache"
    assert len(fake_benchmark) == 3
    for changed in (settings(length=512, mechanisms=s.mechanisms), settings(length=256, causal=True,
                                                                             mechanisms=s.mechanisms)):
        assert advise.measure(changed, cache_dir=root, threads=1, **quiet)[1]["kind"] == "measured"
    threads = torch.get_num_threads()
    assert advise.measure(s, cache_dir=root, threads=2, **quiet)[1]["kind"] == "measured"  # another thread count
    assert torch.get_num_threads() == threads  # measuring leaves the caller's thread count as it was
    assert advise.measure(s, cache_dir=root, threads=1, refresh=True, **quiet)[1]["kind"] == "measured"
    assert len(fake_benchmark) == 7
    monkeypatch.setenv("EFT_MATMUL", "torch")  # another code path: measured again, then cached under its key
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "measured"
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "cache"
    monkeypatch.setattr(advise, "source_digest", lambda: "changed code")
    assert advise.measure(s, cache_dir=root, threads=1, **quiet)[1]["kind"] == "measured"
    assert len(fake_benchmark) == 9


def test_the_source_digest_follows_the_package_files(tmp_path, monkeypatch):
    digest = advise.source_digest()
    assert digest == advise.source_digest() and len(digest) == 16
    package = tmp_path / "efficient_transformers"
    (package / "bench").mkdir(parents=True)
    fake_module = package / "bench" / "advise.py"
    fake_module.write_text("")
    (package / "core.py").write_text("a = 1\n")
    monkeypatch.setattr(advise, "__file__", str(fake_module))
    before = advise.source_digest()
    (package / "core.py").write_text("a = 2\n")
    assert advise.source_digest() != before


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(advise.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert advise.cache_root() == tmp_path / "xdg" / "efficient-transformers" / "advise"
    monkeypatch.setenv(advise.CACHE_ENV, str(tmp_path / "eft"))
    assert advise.cache_root() == tmp_path / "eft" / "advise"
    assert advise.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert advise.neighbour_lengths(1024) == [512, 1024] and advise.neighbour_lengths(1) == [1, 2]


def test_cli_measures_once_then_reuses_and_falls_back_when_a_bench_file_does_not_cover(tmp_path, monkeypatch,
                                                                                       capsys, fake_benchmark):
    monkeypatch.setenv(advise.CACHE_ENV, str(tmp_path / "cache"))
    args = ["advise", "--length", "256", "--mechanisms", "linear_transformer", "--threads", "1",
            "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    assert "measuring 2 mechanism(s) at N = 128, 256 (train)" in capsys.readouterr().err
    assert cli.main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    assert "using the measurement cached" in captured.err and len(fake_benchmark) == 1
    assert json.loads(captured.out)["source"]["kind"] == "cache"
    data = synthetic_bench(QUADRATIC_VS_LINEAR)
    data["config"]["dim"] = 64
    other = write(tmp_path, "dim64.json", data)
    assert cli.main(args + ["--bench", other]) == 0
    assert "does not cover this setting (it was measured with dim=64, not 256); measuring instead" in \
        capsys.readouterr().err
    assert len(fake_benchmark) == 1  # ... and the cache answered


# ---------------------------------------------------------------------------------------- a real run
def test_tiny_real_run_prints_pure_json_and_writes_the_png(tmp_path, monkeypatch, capsys):
    native.available()  # built or loaded now: XDG_CACHE_HOME, moved below, also locates PyTorch's extension cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(advise.CACHE_ENV, raising=False)
    out = tmp_path / "out"
    args = ["advise", "--length", "64", "--dim", "16", "--heads", "2", "--mechanisms", "vanilla,linear_transformer",
            "--repeats", "2", "--threads", "1", "--causal", "--json", "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    advice = json.loads(captured.out)  # nothing but the JSON on stdout
    assert {e["mechanism"] for e in advice["ranking"]} == {"vanilla", "linear_transformer"}
    assert advice["source"]["kind"] == "measured" and advice["source"]["lengths"] == [32, 64]
    assert all(e["time_ms"] > 0 and e["peak_mem_mb"] is not None for e in advice["ranking"])
    assert advice["settings"]["causal"] is True and advice["recommendation"]["text"]
    assert sorted(p.name for p in out.iterdir()) == ["advise.json", "advise.md", "advise.png"]
    assert (out / "advise.png").read_bytes()[:8] == PNG
    assert json.loads((out / "advise.json").read_text()) == advice
    assert "## Recommendation" in (out / "advise.md").read_text()
    cached = list((tmp_path / "xdg" / "efficient-transformers" / "advise").iterdir())
    assert len(cached) == 1 and (cached[0] / "key.json").is_file()
    assert cli.main(args[:-3] + ["--out", str(out)]) == 0  # text mode, from the cache
    captured = capsys.readouterr()
    assert "using the measurement cached" in captured.err and "Recommendation:" in captured.out
