"""`eft search`: the search finds the dominant configuration (synthetic, deterministic costs and
accuracies), constraints skip training, an interrupted study resumes without re-running a trial, bad
input exits 2 with a message, the outputs (JSON, Markdown, PNG) are written, the printed `eft train`
command parses with the real parser, and one tiny real end-to-end search (2 trials, a few steps)."""

from __future__ import annotations

import json
import shlex

import pytest

optuna = pytest.importorskip("optuna")

from efficient_transformers import cli, registry  # noqa: E402
from efficient_transformers.tasks import get_task  # noqa: E402
from efficient_transformers.train import search, search_report  # noqa: E402
from efficient_transformers.train.command import config_from_args  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
DOMINANT = ("linear_transformer", 1, 32)  # mechanism, depth, dim: best accuracy and fastest
TINY = ["--task", "listops", "--max-len", "16", "--num-train", "32", "--num-val", "16", "--batch-size", "8",
        "--steps", "4", "--depth", "1,2", "--dim", "32,64", "--heads", "2",
        "--mechanisms", "vanilla,linformer,linear_transformer"]


def synthetic_accuracy(arch: search.Arch) -> float:
    if (arch.mechanism, arch.depth, arch.dim) == DOMINANT:
        return 0.95
    return {"vanilla": 0.6, "linformer": 0.5, "linear_transformer": 0.7}[arch.mechanism] + 0.01 * arch.depth


def synthetic_latency(arch: search.Arch) -> float:
    if (arch.mechanism, arch.depth, arch.dim) == DOMINANT:
        return 1.0
    return 2.0 * arch.depth * arch.dim / 32 + {"vanilla": 1.0, "linformer": 0.5, "linear_transformer": 0.2}[arch.mechanism]


@pytest.fixture
def synthetic(monkeypatch):
    """Replace the measurement and the training by deterministic functions of the architecture; records
    the architectures measured and trained."""
    calls = {"measured": [], "trained": [], "interrupt_at": None}

    def fake_cost(arch, run):
        calls["measured"].append(arch)
        return {"status": "ok", "error": None, "latency_ms": synthetic_latency(arch),
                "peak_mem_mb": 10.0 * arch.depth * arch.dim / 32, "latency_source": "synthetic", "spread": 0.0}

    def fake_train(arch, run, out_dir):
        if calls["interrupt_at"] is not None and len(calls["trained"]) + 1 == calls["interrupt_at"]:
            raise KeyboardInterrupt
        calls["trained"].append(arch)
        return {"status": "complete", "val_metric": synthetic_accuracy(arch), "reason": None, "check": None,
                "best_step": run.settings.steps, "parameters": 1000 * arch.depth * arch.dim,
                "config": run.train_config(arch, out_dir).to_json()}

    monkeypatch.setattr(search, "measure_cost", fake_cost)
    monkeypatch.setattr(search, "train_candidate", fake_train)
    return calls


def storage_of(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def load(tmp_path, name: str = "search-listops"):
    return optuna.load_study(study_name=name, storage=storage_of(tmp_path))


def test_finds_the_dominant_configuration_and_writes_the_outputs(tmp_path, synthetic, capsys):
    out = tmp_path / "out"
    code = cli.main(["search", *TINY, "--trials", "40", "--storage", storage_of(tmp_path), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)  # pure JSON on stdout
    assert report["best"]["mechanism"] == DOMINANT[0]
    assert (report["best"]["depth"], report["best"]["dim"]) == DOMINANT[1:]
    assert report["best"]["val_metric"] == 0.95 and report["best"]["latency_ms"] == 1.0
    # it dominates every other trial on both objectives: the Pareto front is that configuration alone
    assert {(r["mechanism"], r["depth"], r["dim"]) for r in report["pareto_front"]} == {DOMINANT}
    # the space (12 configurations: vanilla, linformer with k=16, linear_transformer, x 2 depths x 2 dims) is
    # smaller than --trials 40: searched exhaustively, each configuration trained once, then the search ends
    size = len(search.enumerate_space(report["config"]["space"]))
    assert report["summary"]["counted"] == size == len(report["trials"]) and report["summary"]["duplicates"] == 0
    keys = [a.key() for a in synthetic["trained"]]
    assert len(keys) == len(set(keys)) == size
    assert any("searched exhaustively" in n for n in report["config"]["notes"])
    assert any(f"stopped at {size} of --trials 40" in n for n in report["config"]["notes"])
    # the space is read from the cards: linformer's budget is k (values up to the length), the others have none
    space = report["config"]["space"]["mechanisms"]
    assert space["linformer"]["option"] == "k" and max(space["linformer"]["values"]) <= 16
    assert space["vanilla"]["option"] is None
    # outputs
    saved = json.loads((out / "search.json").read_text())
    assert saved["best"]["number"] == report["best"]["number"]
    assert (out / "search.png").read_bytes()[:8] == PNG
    md = (out / "search.md").read_text()
    assert "## Pareto front" in md and report["best"]["command"] in md and "![search](search.png)" in md
    # the command line trains exactly the best trial's config with the real `eft train` parser
    argv = shlex.split(report["best"]["command"])
    assert argv[:2] == ["eft", "train"]
    config = config_from_args(cli.build_parser().parse_args(argv[1:]))
    skip = set(search_report.COMMAND_SKIPS) - {"task", "attention"}
    assert {k: v for k, v in config.to_json().items() if k not in skip} == \
        {k: v for k, v in report["best"]["config"].items() if k not in skip}


def test_constraints_skip_training_and_a_budget_nothing_meets_exits_2(tmp_path, synthetic, capsys):
    out = tmp_path / "out"
    code = cli.main(["search", *TINY, "--trials", "8", "--storage", storage_of(tmp_path), "--out", str(out),
                     "--max-latency-ms", "4.5", "--max-memory-mb", "15"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "search.json").read_text())
    over = [r for r in report["trials"] if r["status"] == "constraint"]
    assert all(r["state"] == "PRUNED" and "not trained" in r["reason"] for r in over)
    assert all(r["latency_ms"] > 4.5 or r["peak_mem_mb"] > 15 for r in over)
    trained = {a.key() for a in synthetic["trained"]}
    assert all(synthetic_latency(a) <= 4.5 and 10.0 * a.depth * a.dim / 32 <= 15 for a in synthetic["trained"])
    assert all(search.Arch(r["mechanism"], (r["budget"] or {}).get("option"), (r["budget"] or {}).get("value"),
                           r["depth"], r["dim"], r["heads"]).key() not in trained for r in over)
    assert report["best"]["latency_ms"] <= 4.5
    assert "Train it:" in captured.out and "eft train --task listops" in captured.out

    # nothing meets the limits: said before any trial, with the closest configurations, exit 2, no study made
    code = cli.main(["search", *TINY, "--trials", "4", "--storage", storage_of(tmp_path), "--study-name", "tight",
                     "--out", str(out), "--max-latency-ms", "0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no configuration can meet --max-latency-ms 0.5" in err and "the closest:" in err
    assert "linear_transformer depth 1 dim 32 heads 2: 1.00 ms" in err and "Traceback" not in err
    assert "tight" not in optuna.get_all_study_names(storage_of(tmp_path))


def test_an_interrupted_study_resumes_without_rerunning_a_trial(tmp_path, synthetic, capsys):
    args = ["search", *TINY, "--trials", "6", "--storage", storage_of(tmp_path), "--out", str(tmp_path / "out")]
    synthetic["interrupt_at"] = 3  # Ctrl-C during the third training
    assert cli.main(args) == 130
    assert "run the same command to resume" in capsys.readouterr().err
    first = load(tmp_path).get_trials()
    statuses = [t.user_attrs["status"] for t in first]
    assert statuses[-1] == "interrupted" and set(statuses[:-1]) == {"complete"}
    assert len(synthetic["trained"]) == 2 and sum(search.counted(t) for t in first) == len(first) - 1 >= 2
    finished = {t.number: (t.params, t.values, t.datetime_complete) for t in first if search.counted(t)}
    interrupted = first[-1]
    before = list(synthetic["trained"])
    # and one more left RUNNING, as by a process killed with SIGKILL
    study = load(tmp_path)
    killed = study.ask()
    search.suggest(killed, study.user_attrs[search.STUDY_ATTR]["space"])

    synthetic["interrupt_at"] = None
    resumed_args = ["search", "--task", "listops", "--trials", "6", "--storage", storage_of(tmp_path),
                    "--out", str(tmp_path / "out")]  # settings not given: taken from the study
    assert cli.main(resumed_args) == 0, capsys.readouterr().err
    trials = load(tmp_path).get_trials()
    assert sum(search.counted(t) for t in trials) == 6  # K is the total, not K more
    for number, (params, values, completed) in finished.items():  # earlier trials untouched
        assert (trials[number].params, trials[number].values, trials[number].datetime_complete) == (params, values, completed)
    again = synthetic["trained"][len(before):]
    assert not {a.key() for a in again} & {a.key() for a in before}  # no finished trial trained again
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted.number]
    assert len(retry) == 1 and retry[0].params == interrupted.params and search.counted(retry[0])
    assert trials[killed.number].user_attrs["status"] == "interrupted"
    assert [t.params for t in trials if t.user_attrs.get("retry_of") == killed.number] == [trials[killed.number].params]
    # a third run with the same K has nothing left to do
    n_trained = len(synthetic["trained"])
    assert cli.main(resumed_args) == 0
    assert len(synthetic["trained"]) == n_trained and len(load(tmp_path).get_trials()) == len(trials)
    # contradicting settings on resume are refused
    capsys.readouterr()
    assert cli.main([*resumed_args, "--steps", "5"]) == 2
    assert "--steps 5 (the study has 4)" in capsys.readouterr().err


@pytest.mark.parametrize("storage, message", [
    ("sqlite:///{tmp}/missing/dir/study.db", "does not exist"),
    ("nosuchdb://host/x", "cannot open the storage"),
    ("study.db", "is not a database URL"),
    ("sqlite:///{tmp}/garbage.db", "cannot open the storage"),
])
def test_storage_that_cannot_be_opened_exits_2(tmp_path, synthetic, capsys, storage, message):
    (tmp_path / "garbage.db").write_bytes(b"this is not an sqlite file" * 100)
    code = cli.main(["search", *TINY, "--trials", "2", "--storage", storage.format(tmp=tmp_path),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert synthetic["measured"] == []


def test_bad_input_exits_2_with_a_message(tmp_path, synthetic, capsys):
    base = ["search", "--trials", "2", "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--task", "nosuch"]) == 2
    assert "unknown task 'nosuch'; allowed tasks:" in capsys.readouterr().err
    assert cli.main([*base, "--task", "listops", "--mechanisms", "vanila"]) == 2
    assert "unknown mechanism(s) ['vanila']" in capsys.readouterr().err
    encoders_only = [c.name for c in registry.mechanisms() if not c.causal]
    if encoders_only:
        assert cli.main([*base, "--task", "byte_lm", "--mechanisms", encoders_only[0]]) == 2
        assert "needs a causal mechanism" in capsys.readouterr().err
    assert cli.main([*base, "--task", "listops", "--dim", "30", "--heads", "4"]) == 2
    assert "--heads 4 does not divide --dim 30" in capsys.readouterr().err
    for bad in (["--trials", "0"], ["--trials", "-3"], ["--trials", "two"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["search", "--task", "listops", *bad])
        assert exc.value.code == 2
        assert "--trials: expected a positive integer" in capsys.readouterr().err


def test_budget_options_are_read_from_the_card():
    def card(**options):
        return registry.Card(name="longformer", title="T", paper="p", year=2020, complexity="O(N)", classes=("FP",),
                             causal=True, bidirectional=True, decoding="kv_cache", options=options)

    windowed = search.budget_for(card(window=512, variant="x"), length=128, causal=False)
    assert windowed["option"] == "window" and windowed["values"] == [16, 32, 64, 128]  # 256 and 512 > N dropped
    assert search.budget_for(card(nb_features=100, k=64), 1024, False)["values"] == [16, 32, 64, 100, 128, 256]
    assert search.budget_for(card(chunk_size=None), 512, causal=False)["option"] is None  # causal-only knob
    assert search.budget_for(card(chunk_size=None), 512, causal=True)["values"] == [None, 32, 64, 128, 256]
    assert search.budget_for(card(variant="dense"), 512, False)["option"] is None
    assert search.budget_for(card(block_size=64), 4, False)["values"] == [4]  # all longer than N: N itself
    assert search.fitting_mechanisms("classification") == [c.name for c in registry.mechanisms() if c.bidirectional]
    assert search.fitting_mechanisms("language_model") == [c.name for c in registry.mechanisms() if c.causal]


def test_best_is_the_best_metric_with_ties_broken_by_latency():
    def row(n, acc, ms, status="complete"):
        return {"number": n, "val_metric": acc, "latency_ms": ms, "status": status, "duplicate_of": None}

    rows = [row(0, 0.8, 5.0), row(1, 0.8, 3.0), row(2, 0.7, 1.0), row(3, 0.9, 9.0, "hopeless"), row(4, 0.6, 4.0)]
    assert search.best_row(rows, "maximize")["number"] == 1
    assert [r["number"] for r in search.pareto_front(rows, "maximize")] == [2, 1]
    assert search.best_row(rows, "minimize")["number"] == 4  # bits per byte: lower is better


def test_tiny_real_search_end_to_end(tmp_path, capsys):
    """Two real trials: the bench probe and timing harness measure the stack, the Trainer trains with the
    early-stop check (a margin every trial passes) and its exact resume after the check."""
    out = tmp_path / "out"
    code = cli.main(["search", "--task", "listops", "--trials", "2", "--max-len", "16", "--num-train", "32",
                     "--num-val", "16", "--batch-size", "4", "--steps", "4", "--early-stop-at", "0.5",
                     "--early-stop-margin", "-1", "--mechanisms", "vanilla,linformer", "--depth", "1", "--dim", "16",
                     "--heads", "2", "--threads", "1", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["summary"]["counted"] == 2
    for r in report["trials"]:
        assert r["status"] == "complete" and r["latency_ms"] > 0 and r["check"]["step"] == 2
        if r["duplicate_of"] is None:
            assert (out / "trials" / "search-listops" / f"{r['number']:04d}" / "results.json").is_file()
            assert not (out / "trials" / "search-listops" / f"{r['number']:04d}" / "model.safetensors").exists()
    assert [p["status"] for p in report["config"]["preflight"]] == ["ok", "ok"]
    assert (out / "search.png").read_bytes()[:8] == PNG
    best = report["best"]
    config = config_from_args(cli.build_parser().parse_args(best["argv"][1:]))
    assert config.attention == best["mechanism"] and config.max_len == 16 and config.steps == 4
    assert config.eval_every == 2 and config.dropout == 0.0


def test_a_hopeless_trial_stops_at_the_check(tmp_path):
    task = get_task("listops")
    settings = search.new_settings(task, {"max_len": 16, "num_train": 32, "num_val": 16, "batch_size": 4, "steps": 4,
                                          "early_stop_at": 0.5, "early_stop_margin": 0.99, "threads": 1})
    run = search.SearchRun(settings, task, tmp_path, "s")
    arch = search.Arch("vanilla", None, None, 1, 16, 2)
    result = search.train_candidate(arch, run, tmp_path / "t")
    assert result["status"] == "hopeless" and result["check"]["step"] == 2
    assert "not above the majority-class baseline" in result["reason"]
    assert not (tmp_path / "t" / "results.json").exists()  # training stopped at the check
