"""`eft lra`: the suite's plan, its accuracy table with the majority baseline, the efficiency table built
from the benchmark's rows, and failed runs reported rather than hidden."""

from __future__ import annotations

import json

import pytest

from efficient_transformers.cli import main
from efficient_transformers.train import lra
from efficient_transformers.train.trainer import Trainer

SMALL = ["lra", "--quick", "--tasks", "listops", "--mechanisms", "vanilla", "--steps", "2"]


def _fake_bench(calls):
    def run_benchmark(*, mechanisms, lengths, modes, out_dir, quick):
        calls.append(dict(mechanisms=mechanisms, lengths=lengths, modes=modes, out_dir=out_dir, quick=quick))
        rows = []
        for m, scale in (("vanilla", 1.0), ("performer", 0.5), ("linear_transformer", None)):
            for n in lengths:
                ok = scale is not None
                rows.append({"mechanism": m, "seq_len": n, "mode": "train", "status": "ok" if ok else "oom",
                             "time_ms": n * scale if ok else None, "peak_mem_mb": n / 8 * scale if ok else None})
        rows.append({"mechanism": "vanilla", "seq_len": lengths[0], "mode": "forward", "status": "ok",
                     "time_ms": 1e9, "peak_mem_mb": 1e9})  # other modes are ignored
        return {"config": {"batch": 1, "dim": 256, "heads": 4, "dtype": "float32", "device": "cpu",
                           "device_name": "test cpu"}, "rows": rows, "summary": {}}
    return run_benchmark


def test_quick_suite_writes_accuracy_and_efficiency_tables(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(lra, "_load_benchmark", lambda: _fake_bench(calls))
    code = main([*SMALL, "--mechanisms", "vanilla,performer,linear_transformer", "--bench-lengths", "64,128",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert calls == [dict(mechanisms=["vanilla", "performer", "linear_transformer"], lengths=[64, 128],
                          modes=("train",), out_dir=str(tmp_path / "bench"), quick=True)]
    suite = json.loads((tmp_path / "lra.json").read_text())
    runs = suite["accuracy"]["results"]["listops"]
    assert set(runs) == {"vanilla", "performer", "linear_transformer"}
    for mechanism, r in runs.items():
        results = json.loads((tmp_path / "runs" / "listops" / mechanism / "results.json").read_text())
        assert r["test_accuracy"] == results["test"]["accuracy"] and r["steps"] == 2
    base = suite["accuracy"]["majority_baseline"]["listops"]["test"]
    assert 0.0 < base < 0.5
    table = suite["efficiency"]["table"]
    assert table["performer"]["128"] == {"status": "ok", "time_ms": 64.0, "peak_mem_mb": 8.0, "speedup": 2.0,
                                         "mem_ratio": 0.5}
    assert table["linear_transformer"]["64"] == {"status": "oom"}
    md = (tmp_path / "lra.md").read_text()
    assert md in out
    assert f"| majority class | {100 * base:.2f} | {100 * base:.2f} |" in md
    assert f"| vanilla | {100 * runs['vanilla']['test_accuracy']:.2f} |" in md
    assert "| performer | 32 (2.00x) | 64 (2.00x) | 4 (0.50x) | 8 (0.50x) |" in md
    assert "listops: length 128, 1 layer(s), dim 32, 2 heads, 2 steps" in md

    # the folder now holds runs: a second suite refuses, --resume keeps the finished runs as they are
    before = (tmp_path / "runs" / "listops" / "vanilla" / "model.safetensors").read_bytes()
    assert main([*SMALL, "--no-bench", "--out", str(tmp_path)]) == 2
    assert "already holds runs" in capsys.readouterr().err
    assert main([*SMALL, "--no-bench", "--resume", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "runs" / "listops" / "vanilla" / "model.safetensors").read_bytes() == before


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    original = Trainer.fit

    def fit(self, *args, **kwargs):
        if self.config.attention == "performer":
            raise RuntimeError("boom in performer")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    code = main([*SMALL, "--mechanisms", "vanilla,performer", "--no-bench", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "eft lra: listops/performer failed: RuntimeError: boom in performer" in captured.err
    runs = json.loads((tmp_path / "lra.json").read_text())["accuracy"]["results"]["listops"]
    assert runs["performer"]["status"] == "error" and runs["vanilla"]["status"] == "ok"
    assert "| performer | error | - |" in captured.out and "- listops / performer: RuntimeError: boom" in captured.out
    assert "Not measured (--no-bench)." in captured.out


@pytest.mark.parametrize("argv,message", [
    (["--mechanisms", "vanilla,nope"], "unknown mechanism(s) ['nope']; allowed: ['vanilla'"),
    (["--tasks", "listops,byte_lm"], "unknown task(s) ['byte_lm']; allowed: ['listops', 'text'"),
    (["--data", "listops=/x"], "--quick generates its data; --data is for the full suite"),
    (["--bench-lengths", "64,x"], "--bench-lengths '64,x': expected comma-separated positive ints"),
    (["--no-bench", "--bench-lengths", "64"], "--no-bench and --bench-lengths contradict"),
])
def test_bad_suite_arguments(tmp_path, capsys, argv, message):
    assert main(["lra", "--quick", *argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eft lra: error: ") and message in err, err
    assert not (tmp_path / "s").exists()


def test_presets_cover_every_lra_task_with_the_stated_lengths():
    assert set(lra.QUICK) == set(lra.FULL) == set(lra.LRA_TASKS)
    assert {t: s.max_len for t, s in lra.FULL.items()} == {
        "listops": 2000, "text": 1000, "retrieval": 4000, "image": 1024, "pathfinder": 1024}
    assert max(s.max_len for s in lra.QUICK.values()) <= 256
