"""`eft lra`: the suite's plan, the accuracy table (mean over seeds, the majority baseline, LRA's numbers
beside ours, Kendall's tau, parameters against vanilla), the efficiency table, resuming an interrupted
suite, runs side by side in worker processes, failed runs reported rather than hidden, and the quick
preset's mechanism budgets building and running at the suite's lengths. Tiny presets keep it fast."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch
from safetensors.torch import load_file

from efficient_transformers.cli import main
from efficient_transformers.registry import mechanisms as registered
from efficient_transformers.tasks import get_task
from efficient_transformers.train import lra, lra_report
from efficient_transformers.train.trainer import Trainer

TINY_MODEL = dict(dim=16, depth=1, heads=2, ff_mult=2, pooling="mean", dropout=0.0)
TINY_TRAIN = dict(steps=4, batch_size=8, lr=3e-3, weight_decay=0.01, warmup=1, eval_every=2)
SMALL = ["lra", "--quick", "--tasks", "listops", "--jobs", "1"]


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    """Every quick task at a tiny size (the real preset is measured in /work/notes/lra.md, not here)."""
    sizes = (48, 16, 24)
    tiny = {t: lra.SuiteTask(64 if t == "text" else 48, TINY_MODEL, TINY_TRAIN, sizes=sizes)
            for t in ("listops", "text", "retrieval")}
    tiny["image"] = lra.SuiteTask(64, TINY_MODEL, TINY_TRAIN, task_options={"pool": 4}, sizes=sizes)
    tiny["pathfinder"] = lra.SuiteTask(256, TINY_MODEL, TINY_TRAIN, task_options={"size": 16}, sizes=sizes)
    for task, spec in tiny.items():
        monkeypatch.setitem(lra.QUICK, task, spec)


def _fake_efficiency(calls):
    def measure(mechanisms, lengths, model, batch, budgets, *, quick, progress=None):
        calls.append(dict(mechanisms=mechanisms, lengths=lengths, batch=batch, budgets=budgets, quick=quick))
        table = {}
        for m, scale in (("vanilla", 1.0), ("performer", 0.5), ("linear_transformer", None)):
            table[m] = {str(n): ({"status": "ok", "time_ms": n * scale, "peak_mem_mb": n / 8 * scale,
                                  "speedup": 1 / scale, "mem_ratio": scale} if scale else {"status": "oom"})
                        for n in lengths}
        return {"mode": "train", "lengths": lengths, "table": table,
                "bench_config": {"batch": batch, "dim": model["dim"], "depth": model["depth"], "heads": model["heads"],
                                 "dtype": "float32", "device": "cpu", "device_name": "test cpu", "threads": 1}}
    return measure


def test_quick_suite_writes_the_tables_theirs_beside_ours_and_the_figure(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(lra, "_efficiency_measurer", lambda: _fake_efficiency(calls))
    mechs = "vanilla,performer,linear_transformer"
    code = main([*SMALL, "--mechanisms", mechs, "--bench-lengths", "64,128", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert calls[0]["lengths"] == [64, 128] and calls[0]["budgets"]["performer"] == lra.QUICK_BUDGET["performer"]
    suite = json.loads((tmp_path / "lra.json").read_text())
    runs = suite["accuracy"]["results"]["listops"]
    assert set(runs) == set(mechs.split(","))
    for mechanism, r in runs.items():
        results = json.loads((tmp_path / "runs" / "listops" / mechanism / "s0" / "results.json").read_text())
        assert r["test_accuracy"] == results["test"]["accuracy"] and r["steps"] == 4
        assert results["config"]["attention_options"] == lra.budget_for(mechanism, quick=True)
    assert suite["config"]["presets"]["listops"]["sizes"] == [48, 16, 24]
    base = suite["accuracy"]["majority_baseline"]["listops"]
    assert 0.0 < base["test"] < 0.6 and base["test_examples"] == 24
    margin = suite["accuracy"]["vanilla_margin"]["listops"]
    se = (base["test"] * (1 - base["test"]) / 24) ** 0.5
    assert margin["se"] == pytest.approx(se) and margin["margin_in_se"] == pytest.approx(
        (runs["vanilla"]["test_accuracy"] - base["test"]) / se)
    assert suite["accuracy"]["parameters"]["listops"]["vanilla"]["vs_vanilla"] == 1.0
    tau = suite["accuracy"]["rank_correlation"]
    assert tau["mechanisms"] == ["vanilla", "linear_transformer", "performer"] and tau["n"] == 3
    md = (tmp_path / "lra.md").read_text()
    assert md in out
    assert "| Model | ListOps | Avg |" in md
    assert f"| majority class | {100 * base['test']:.2f} | {100 * base['test']:.2f} |" in md
    assert f"| vanilla | {100 * runs['vanilla']['test_accuracy']:.2f} |" in md
    assert "| vanilla | 36.37 | 64.27 | 57.46 | 42.44 | 71.40 | 54.39 |" in md  # theirs, marked as theirs
    assert "ListOps (theirs)" in md and "Kendall's tau" in md
    assert "| performer | 31.2 (2.00x) | 15.6 (2.00x) | 4 (0.50x) | 8 (0.50x) |" in md  # steps/s = 1000 / ms
    assert "| linear_transformer | oom | oom | oom | oom |" in md
    assert "| performer | 9.5 (1.2x) | 9.4 (1.9x) | 8.7 (3.8x) | 8.0 (5.7x) |" in md
    assert "listops: length 48, 1 layer(s), dim 16, 2 heads" in md
    assert (tmp_path / "lra.png").read_bytes().startswith(b"\x89PNG")

    # the folder now holds runs: a second suite refuses, --resume keeps the finished runs as they are
    before = (tmp_path / "runs" / "listops" / "vanilla" / "s0" / "model.safetensors").read_bytes()
    assert main([*SMALL, "--no-bench", "--out", str(tmp_path)]) == 2
    assert "already holds runs" in capsys.readouterr().err
    assert main([*SMALL, "--no-bench", "--resume", "--out", str(tmp_path), "--mechanisms", mechs]) == 0
    assert (tmp_path / "runs" / "listops" / "vanilla" / "s0" / "model.safetensors").read_bytes() == before


def test_seeds_give_the_mean_and_std_over_runs_on_the_same_data(tmp_path):
    assert main([*SMALL, "--mechanisms", "vanilla", "--seeds", "3", "--seed", "5", "--no-bench",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "lra.json").read_text())["accuracy"]["results"]["listops"]["vanilla"]
    tests = [json.loads((tmp_path / "runs" / "listops" / "vanilla" / f"s{s}" / "results.json").read_text())["test"]["accuracy"]
             for s in (5, 6, 7)]
    assert r["seeds"] == [5, 6, 7] and [p["seed"] for p in r["per_seed"]] == [5, 6, 7]
    assert r["test_accuracy"] == pytest.approx(statistics.fmean(tests))
    assert r["test_accuracy_std"] == pytest.approx(statistics.stdev(tests))
    assert "mean ± std over 3 seed(s) [5, 6, 7]" in (tmp_path / "lra.md").read_text()


def test_an_interrupted_suite_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    """Interrupt the second run after its checkpoint at step 2: the first run is kept as it is, the second
    resumes from its checkpoint, and the tables equal those of a suite that was never interrupted."""
    args = [*SMALL, "--mechanisms", "vanilla,performer", "--no-bench"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    original = Trainer.fit
    constructed = []
    init = Trainer.__init__

    def spy_init(self, config, **kwargs):
        constructed.append((config.attention, kwargs.get("resume")))
        init(self, config, **kwargs)

    def interrupted_fit(self, stop_at=None):
        if self.config.attention == "performer":
            original(self, stop_at=2)  # the checkpoint at step 2 is written, then Ctrl-C arrives
            raise KeyboardInterrupt
        return original(self, stop_at=stop_at)

    monkeypatch.setattr(Trainer, "fit", interrupted_fit)
    out = tmp_path / "interrupted"
    assert main([*args, "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err and not (out / "lra.json").exists()
    kept = (out / "runs" / "listops" / "vanilla" / "s0" / "results.json").read_bytes()
    state = json.loads((out / "runs" / "listops" / "performer" / "s0" / "trainer_state.json").read_text())
    assert state["step"] == 2

    monkeypatch.setattr(Trainer, "fit", original)
    monkeypatch.setattr(Trainer, "__init__", spy_init)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert constructed == [("performer", True)]  # vanilla kept, performer resumed from its checkpoint
    assert (out / "runs" / "listops" / "vanilla" / "s0" / "results.json").read_bytes() == kept
    resumed = json.loads((out / "lra.json").read_text())["accuracy"]["results"]["listops"]
    straight = json.loads((tmp_path / "straight" / "lra.json").read_text())["accuracy"]["results"]["listops"]
    for m in ("vanilla", "performer"):
        assert resumed[m]["test_accuracy"] == straight[m]["test_accuracy"]
        assert resumed[m]["val_accuracy"] == straight[m]["val_accuracy"]
        a = load_file(out / "runs" / "listops" / m / "s0" / "best.safetensors")
        b = load_file(tmp_path / "straight" / "runs" / "listops" / m / "s0" / "best.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_side_by_side_in_worker_processes(tmp_path):
    assert main(["lra", "--quick", "--tasks", "listops,text", "--mechanisms", "vanilla", "--jobs", "2", "--no-bench",
                 "--out", str(tmp_path)]) == 0
    suite = json.loads((tmp_path / "lra.json").read_text())
    assert suite["config"]["jobs"] == 2
    for task in ("listops", "text"):
        r = suite["accuracy"]["results"][task]["vanilla"]
        assert r["status"] == "ok" and r["per_seed"][0]["load_avg"] and r["steps"] == 4


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
    assert "eft lra: listops/performer (seed 0) failed: RuntimeError: boom in performer" in captured.err
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
    (["--seeds", "0"], "--seeds must be a positive int, got 0"),
    (["--jobs", "0"], "--jobs must be a positive int, got 0"),
])
def test_bad_suite_arguments(tmp_path, capsys, argv, message):
    assert main(["lra", "--quick", *argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eft lra: error: ") and message in err, err
    assert not (tmp_path / "s").exists()


def test_the_real_presets_cover_every_task_with_large_enough_test_sets(monkeypatch):
    monkeypatch.undo()  # the real presets, not the tiny ones
    assert set(lra.QUICK) == set(lra.FULL) == set(lra.LRA_TASKS)
    assert {t: s.max_len for t, s in lra.FULL.items()} == {
        "listops": 2000, "text": 1000, "retrieval": 4000, "image": 1024, "pathfinder": 1024}
    for spec in lra.QUICK.values():
        assert spec.max_len <= 256 and spec.sizes[2] >= 1000 and spec.why  # SE <= 1.6 points at p = 0.5
        assert spec.model == lra.QUICK["listops"].model  # one model for the whole quick suite


def test_every_budget_names_real_options_and_runs_at_the_quick_lengths(monkeypatch):
    """Each registered encoder, with its quick budget, builds and runs forward and backward at every
    quick task's length (N = max_len; mean pooling adds no token), and stays within its budget's intent:
    no option is unknown to the mechanism."""
    monkeypatch.undo()
    from efficient_transformers.models.blocks import TransformerStack

    cards = {c.name: c for c in registered()}
    for name, options in lra.QUICK_BUDGET.items():
        if name in cards:
            assert set(options) <= set(cards[name].options), (name, set(options) - set(cards[name].options))
    shaped = {t: lra._is_shaped(t, s) for t, s in lra.QUICK.items()}
    assert shaped == {"listops": False, "text": False, "retrieval": False, "image": True, "pathfinder": True}
    shapes = {t: get_task(t).data_shape(dict(s.task_options)) if shaped[t] else None for t, s in lra.QUICK.items()}
    settings = sorted({(s.max_len, shapes[t]) for t, s in lra.QUICK.items()}, key=lambda x: (x[0], x[1] is not None))
    longest = max(n for n, _ in settings)  # the shortest, the longest and every grid (128 lies between)
    settings = [x for i, x in enumerate(settings) if i == 0 or x[0] == longest or x[1] is not None]
    for name in [c.name for c in cards.values() if c.bidirectional]:
        for n, shape in settings:
            torch.manual_seed(0)
            grid = shape is not None
            stack = TransformerStack(16, 1, 2, attention=name, attention_options=lra.budget_for(name, True, grid),
                                     max_seq_len=n, ff_mult=2, data_shape=shape)
            x = torch.randn(1, n, 16, requires_grad=True)
            y = stack(x)
            y.square().mean().backward()
            assert y.shape == (1, n, 16) and torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (name, n, grid)


def test_kendall_tau_and_lra_published_averages():
    rng = random.Random(0)
    scipy_stats = pytest.importorskip("scipy.stats")
    for _ in range(20):
        x = [rng.choice([1, 2, 3, 4, 5]) for _ in range(9)]
        y = [rng.choice([1, 2, 3]) for _ in range(9)]
        expected = scipy_stats.kendalltau(x, y).statistic
        assert lra_report.kendall_tau_b(x, y) == pytest.approx(expected, abs=1e-12)
    assert lra_report.kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert lra_report.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert lra_report.kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    # the paper's Avg column, recomputed from the five tasks (Sinkhorn: 51.48, the paper prints 51.39)
    for name, avg in {"vanilla": 54.39, "bigbird": 55.01, "performer": 51.41, "linformer": 51.36,
                      "sinkhorn": 51.48}.items():
        assert lra_report.published_average(name) == pytest.approx(avg, abs=0.006)
    same = lra_report.rank_correlation({m: lra_report.published_average(m) for m in lra_report.PUBLISHED_ACCURACY})
    assert same["tau"] == pytest.approx(1.0) and same["n"] == 10


def test_every_mechanism_with_more_parameters_than_vanilla_says_why(monkeypatch):
    """LRA's rule: parameter counts within +10 % of vanilla's, or a reason in PARAMETER_NOTES. Checked on
    one layer at the quick size and budget (the rest of the model is the same for all)."""
    monkeypatch.undo()
    from efficient_transformers.models.blocks import TransformerStack

    def count(name):
        stack = TransformerStack(64, 1, 2, attention=name, attention_options=lra.budget_for(name, True),
                                 max_seq_len=256, ff_mult=2)
        return sum(p.numel() for p in stack.parameters())

    vanilla = count("vanilla")
    excess = {c.name for c in registered() if c.bidirectional and count(c.name) > vanilla}
    assert excess, "no mechanism has extra parameters: the check would not notice a missing reason"
    assert excess <= set(lra.PARAMETER_NOTES), sorted(excess - set(lra.PARAMETER_NOTES))
