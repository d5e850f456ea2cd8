"""The training loop in-process on tiny tasks: it learns, it measures what it claims, and a run stopped
part-way and resumed ends bit-identical to one that ran through."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et
from efficient_transformers.train import Trainer
from efficient_transformers.train.checkpoint import load_weights
from efficient_transformers.train.objective import batch_statistics


def _train(task, cfg, **kw):
    splits = task.datasets(seed=cfg.seed, num_train=kw.pop("num_train", 64))
    return Trainer(cfg, task=task, splits=splits, **kw)


def test_classifier_learns_a_task_that_needs_attention(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    cfg = make_config(tmp_path, steps=120, eval_every=40, batch_size=16, dropout=0.0, lr=5e-3, warmup=10)
    results = _train(task, cfg, num_train=256).fit()
    assert results["baseline"]["val"]["accuracy"] <= 0.7
    assert results["best"]["value"] >= 0.9, results["best"]
    assert results["test"]["accuracy"] >= 0.85
    # the reported test accuracy is that of best.safetensors, recomputed here independently
    model = et.TransformerClassifier(9, 2, 32, 1, 2, max_seq_len=12, dropout=0.0)
    load_weights(tmp_path / "best.safetensors", model)
    test = task.datasets(seed=0)["test"]
    batch = task.collate(test)
    with torch.no_grad():
        acc = (model(batch["tokens"], batch["mask"]).argmax(-1) == batch["label"]).float().mean().item()
    assert acc == pytest.approx(results["test"]["accuracy"])


def test_language_model_reports_bits_per_byte_of_the_cross_entropy(tmp_path, tiny_task, make_config):
    task = tiny_task("language_model")
    cfg = make_config(tmp_path, steps=60, eval_every=30, dropout=0.0, lr=3e-2)
    trainer = _train(task, cfg)
    results = trainer.fit()
    val = trainer.splits["val"]
    batch = task.collate(val)
    with torch.no_grad():
        ce = F.cross_entropy(trainer.model(batch["tokens"]).flatten(0, 1), batch["targets"].flatten()).item()
    final_val = [r for r in _records(tmp_path) if r["split"] == "val"][-1]
    assert final_val["bits_per_byte"] == pytest.approx(ce / math.log(2), rel=1e-5)
    assert final_val["loss"] == pytest.approx(ce, rel=1e-5)
    assert results["best"]["value"] < 1.0  # the periodic stream is learnt (uniform would be 8 bits)
    assert results["baseline"] is None and results["metric"] == "bits_per_byte"


def test_retrieval_trains_the_two_tower_model(tmp_path, tiny_task, make_config):
    task = tiny_task("retrieval")
    trainer = _train(task, make_config(tmp_path, steps=8, eval_every=8))
    assert isinstance(trainer.model, et.RetrievalModel)
    results = trainer.fit()
    assert results["val"]["accuracy"] == results["best"]["value"]
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["test"]["examples"] == 24


def test_accumulation_matches_one_large_batch(tmp_path, tiny_task, make_config, run_helpers):
    task = tiny_task("classification")
    a = _train(task, make_config(tmp_path / "a", batch_size=4, accum=3, dropout=0.0, steps=6))
    b = _train(task, make_config(tmp_path / "b", batch_size=12, accum=1, dropout=0.0, steps=6))
    c = _train(task, make_config(tmp_path / "c", batch_size=12, accum=1, dropout=0.0, steps=6, seed=1))
    a.fit(), b.fit(), c.fit()
    # same examples per step; only the order of floating-point sums differs
    run_helpers.close_parameters(a.model.state_dict(), b.model.state_dict())
    with pytest.raises(AssertionError):  # while a different data order is visibly different
        run_helpers.close_parameters(a.model.state_dict(), c.model.state_dict())


def test_bf16_autocast_trains(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    trainer = _train(task, make_config(tmp_path, bf16=True, steps=4, eval_every=4))
    seen = []
    hook = trainer.model.head[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    results = trainer.fit()
    hook.remove()
    assert torch.bfloat16 in seen
    assert math.isfinite(results["best"]["value"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_gradient_clipping_bounds_the_update(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    trainer = _train(task, make_config(tmp_path, grad_clip=1e-3, steps=1, warmup=0, dropout=0.0))
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = original(params, max_norm, *a, **k)
        norms.append((float(total), float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))))
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        trainer.fit()
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    (before, after), = norms
    assert before > 1e-2 and after == pytest.approx(1e-3, rel=1e-3)


def _records(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind,attention,options", [
    ("classification", "vanilla", {}),
    ("language_model", "vanilla", {}),
    # random features redrawn every 3 calls: the redraw counter and the draws live in buffers
    ("classification", "performer", {"nb_features": 8, "redraw_interval": 3}),
])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, tiny_task, make_config, run_helpers, kind, attention,
                                                  options):
    task = tiny_task(kind)
    # dropout on, accumulation on, checkpoints not aligned with the stop: every piece of state matters
    settings = dict(steps=14, eval_every=4, checkpoint_every=5, log_every=3, accum=2, dropout=0.2, num_train=40,
                    attention=attention, attention_options=options)
    num_train = settings.pop("num_train")
    _train(task, make_config(tmp_path / "through", **settings), num_train=num_train).fit()
    stopped = _train(task, make_config(tmp_path / "resumed", **settings), num_train=num_train).fit(stop_at=7)
    assert stopped == {"complete": False, "step": 7, "steps": 14, "out": str(tmp_path / "resumed")}
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["data_position"]["examples_consumed"] == 7 * 2 * 8
    resumed = _train(task, make_config(tmp_path / "resumed", **settings), num_train=num_train, resume=True)
    results = resumed.fit()
    assert results["complete"] and results["steps"] == 14
    run_helpers.same_tensors(tmp_path / "through", tmp_path / "resumed")
    assert run_helpers.metrics(tmp_path / "through") == run_helpers.metrics(tmp_path / "resumed")


def test_existing_run_is_never_overwritten_silently(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    _train(task, make_config(tmp_path, steps=2, eval_every=2)).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a run .*pass --resume to continue it or --overwrite"):
        _train(task, make_config(tmp_path, steps=2, eval_every=2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint .*\['lr'\]"):
        _train(task, make_config(tmp_path, steps=2, eval_every=2, lr=0.5), resume=True)
    with pytest.raises(ValueError, match=r"is at step 2, beyond --steps 1; allowed: --steps >= 2"):
        _train(task, make_config(tmp_path, steps=1, eval_every=2), resume=True)
    results = _train(task, make_config(tmp_path, steps=3, eval_every=3, seed=1), overwrite=True).fit()
    assert results["steps"] == 3 and json.loads((tmp_path / "trainer_state.json").read_text())["config"]["seed"] == 1


def test_batch_statistics_ignore_padding_in_language_models(tiny_task):
    task = tiny_task("language_model")
    torch.manual_seed(0)
    lm = et.TransformerLM(257, 16, 1, 2, max_seq_len=12)
    items = task.datasets(num_train=2)["train"]
    items = [items[0], {"tokens": items[1]["tokens"][:5], "targets": items[1]["targets"][:5]}]
    batch = task.collate(items)
    loss_sum, stats = batch_statistics(lm, batch, "language_model")
    assert stats.count == 12 + 5
    with torch.no_grad():
        manual = sum(F.cross_entropy(lm(it["tokens"][None])[0], it["targets"], reduction="sum") for it in items)
    assert float(loss_sum.detach()) == pytest.approx(float(manual), rel=1e-5)


