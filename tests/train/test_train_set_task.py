"""`eft train` on the set task (max_of_set): the task decides the model (the SetTransformer), a tiny
run learns far past the constant baseline, a stopped and resumed run is bit-identical, `eft eval`
reads the run, and options the model cannot honour are refused with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from efficient_transformers.cli import main
from efficient_transformers.models.set_transformer import SAB, SetTransformer
from efficient_transformers.tasks import get_task
from efficient_transformers.train import TrainConfig, Trainer
from efficient_transformers.train.checkpoint import load_weights

TINY = ["--task", "max_of_set", "--dim", "32", "--depth", "1", "--heads", "4", "--ff-mult", "1",
        "--num-train", "400", "--num-val", "100", "--num-test", "100", "--batch-size", "32"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: one thread is fastest, and the machine is shared
    yield
    torch.set_num_threads(threads)


def _eft(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_tiny_run_trains_the_set_transformer_past_the_constant_baseline(tmp_path, capsys, one_thread):
    code, out, err = _eft(capsys, "train", *TINY, "--steps", 60, "--eval-every", 30, "--lr", 5e-3,
                          "--attention-option", "num_inducing=4", "--out", tmp_path, "--json")
    assert code == 0, err
    results = json.loads(out)
    assert results["attention"] == "set_transformer" and results["metric"] == "mae"  # the task's default
    spec = results["model_config"]
    assert spec == {"class": "SetTransformer", "in_features": 1, "out_features": 1, "dim": 32, "heads": 4, "depth": 1,
                    "encoder": "isab", "num_seeds": 1, "ff_mult": 1, "max_seq_len": 10, "num_inducing": 4}
    assert results["config"]["pooling"] == "pma" and results["config"]["dropout"] == 0.0
    # the baseline is the median of the training targets, scored on the test split
    splits = get_task("max_of_set").datasets(seed=0, num_train=400, num_val=100, num_test=100)
    median = float(np.median(splits["train"].targets.astype(np.float64)))
    baseline = results["baseline"]["test"]
    assert baseline["prediction"] == pytest.approx(median)
    assert baseline["mae"] == pytest.approx(np.abs(splits["test"].targets - median).mean(), rel=1e-6)
    assert baseline["mae"] > 0.4
    assert results["test"]["mae"] < 0.4 * baseline["mae"], (results["test"], baseline)  # 0.10 vs 0.55 here
    # the reported test MAE is that of best.safetensors, recomputed here independently
    model = SetTransformer(1, 1, dim=32, heads=4, depth=1, num_inducing=4, ff_mult=1)
    load_weights(tmp_path / "best.safetensors", model)
    batch = get_task("max_of_set").collate(list(splits["test"]))
    with torch.no_grad():
        mae = (model(batch["x"], batch["mask"])[:, 0, 0] - batch["target"]).abs().mean().item()
    assert mae == pytest.approx(results["test"]["mae"], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["mae"] for r in records) and "accuracy" not in records[0]
    # eft eval reads the run back (the SetTransformer, continuous inputs for its latency)
    code, out, err = _eft(capsys, "eval", tmp_path, "--json", "--repeats", 1)
    assert code == 0, err
    assert json.loads(out)["models"]["float32"]["mae"] == pytest.approx(results["test"]["mae"], rel=1e-5)


def _config(out, **overrides):
    base = dict(task="max_of_set", attention="set_transformer", out=str(out), steps=8, dim=16, depth=1, heads=2,
                ff_mult=1, batch_size=8, accum=2, eval_every=3, checkpoint_every=5, log_every=2, lr=3e-3,
                dropout=0.0, pooling="pma", num_train=48, num_val=8, num_test=8, progress="off", device="cpu",
                attention_options={"num_inducing": 3})
    return TrainConfig(**{**base, **overrides})


def test_stopped_and_resumed_run_is_bit_identical(tmp_path, run_helpers, one_thread):
    Trainer(_config(tmp_path / "through")).fit()
    stopped = Trainer(_config(tmp_path / "resumed")).fit(stop_at=4)
    assert stopped["complete"] is False and stopped["step"] == 4
    results = Trainer(_config(tmp_path / "resumed"), resume=True).fit()
    assert results["complete"] and results["steps"] == 8
    run_helpers.same_tensors(tmp_path / "through", tmp_path / "resumed")
    assert run_helpers.metrics(tmp_path / "through") == run_helpers.metrics(tmp_path / "resumed")


def test_vanilla_gives_the_sab_encoder_and_features_size_the_input(tmp_path, one_thread):
    trainer = Trainer(_config(tmp_path, attention="vanilla", attention_options={}, task_options={"features": 3},
                              steps=2))
    assert isinstance(trainer.model, SetTransformer) and isinstance(trainer.model.encoder[0], SAB)
    assert trainer.model.embed.in_features == 3 and trainer.model_spec["encoder"] == "sab"
    assert trainer.fit()["test"]["mae"] is not None


@pytest.mark.parametrize("extra,message", [
    (["--attention", "performer"], "task 'max_of_set' trains the SetTransformer model, whose encoder is ISAB "
                                   "(--attention set_transformer) or SAB (--attention vanilla); got 'performer'"),
    (["--attention", "nope"], "unknown attention mechanism 'nope'"),
    (["--dropout", "0.1"], "which has no dropout; got dropout=0.1; allowed: 0"),
    (["--pooling", "mean"], "which pools by PMA; got pooling='mean'; allowed: 'pma'"),
    (["--reversible"], "does not take reversible=True (a token-model feature); allowed: False"),
    (["--share", "all"], "does not take share='all'"),
    (["--attention-option", "num_inducing=0"], "set_transformer: num_inducing"),
    (["--attention-option", "window=4"], "set_transformer: unknown option(s) ['window'] for the SetTransformer's "
                                         "ISAB encoder; allowed options: ['num_inducing']"),
    (["--attention", "vanilla", "--attention-option", "backend=\"math\""], "allowed options: none"),
    (["--task-option", "min_size=20"], "max_of_set: min_size=20 exceeds max_len=10"),
])
def test_what_the_set_model_cannot_honour_is_refused(tmp_path, capsys, extra, message):
    code, out, err = _eft(capsys, "train", *TINY, "--steps", 2, "--out", tmp_path / "run", *extra)
    assert code == 2 and out == ""
    assert message in err and err.startswith("eft train: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_eft_search_refuses_a_set_task(tmp_path, capsys):
    pytest.importorskip("optuna")
    code, out, err = _eft(capsys, "search", "--task", "max_of_set", "--trials", 1, "--out", tmp_path / "study")
    assert code == 2 and "task 'max_of_set' (set_regression) trains a fixed model" in err, err
