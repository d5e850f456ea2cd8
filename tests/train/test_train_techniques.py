"""The trainer's side of the survey's orthogonal techniques: fp16 with a gradient scaler (skipped steps
counted), the model-level options in run configs, knowledge distillation (`eft distill`), fine-tuning
from a run with adapters or LoRA (`--init-from --adapters`), `eft eval [--int8]`, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import efficient_transformers as et
from efficient_transformers.cli import main
from efficient_transformers.models.adapters import load_adapters
from efficient_transformers.train import Trainer
from efficient_transformers.train import trainer as trainer_module
from efficient_transformers.train.evaluate import evaluate_run
from efficient_transformers.train.objective import Distillation, batch_statistics
from efficient_transformers.train.transfer import read_run

SIZES = dict(num_train=64, num_val=24, num_test=24)


def _train(task, cfg, **kw):
    splits = task.datasets(seed=cfg.seed, num_train=64)
    return Trainer(cfg, task=task, splits=splits, **kw)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, name: str = "best.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(out / name))


# ---------------------------------------------------------------------------------------------- fp16
def test_fp16_trains_without_nan_and_counts_skipped_steps(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    results = _train(task, make_config(tmp_path / "a", fp16=True, steps=8, eval_every=8, lr=5e-3, **SIZES)).fit()
    train_lines = [r for r in _records(tmp_path / "a") if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_lines)
    assert all("skipped_steps" in r and r["loss_scale"] > 0 for r in train_lines)
    assert results["skipped_steps"] == train_lines[-1]["skipped_steps_total"] == sum(r["skipped_steps"] for r in train_lines)
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "a").values())
    assert results["test"]["loss"] is not None and results["test"]["loss"] == results["test"]["loss"]


def test_fp16_overflowing_steps_are_skipped_and_leave_the_weights_alone(tmp_path, tiny_task, make_config, monkeypatch):
    monkeypatch.setattr(trainer_module, "FP16_INIT_SCALE", 2.0**40)  # float16 gradients overflow at first
    task = tiny_task("classification")
    trainer = _train(task, make_config(tmp_path, fp16=True, steps=2, eval_every=2, log_every=1, dropout=0.0, **SIZES))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    results = trainer.fit()
    assert results["skipped_steps"] == 2
    assert [r["skipped_steps"] for r in _records(tmp_path) if r["split"] == "train"] == [1, 1]
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "skipped = no update"
    assert trainer.scaler.get_scale() == 2.0**38


def test_fp16_resume_is_bit_identical(tmp_path, tiny_task, make_config, run_helpers, monkeypatch):
    monkeypatch.setattr(trainer_module, "FP16_INIT_SCALE", 2.0**22)  # a few skips early: the scaler state matters
    task = tiny_task("classification")
    kw = dict(fp16=True, steps=6, eval_every=3, checkpoint_every=2, **SIZES)
    full = _train(task, make_config(tmp_path / "full", **kw)).fit()
    _train(task, make_config(tmp_path / "part", **kw)).fit(stop_at=4)
    resumed = _train(task, make_config(tmp_path / "part", **kw), resume=True).fit()
    run_helpers.same_tensors(tmp_path / "full", tmp_path / "part")
    assert run_helpers.metrics(tmp_path / "full") == run_helpers.metrics(tmp_path / "part")
    assert full["skipped_steps"] == resumed["skipped_steps"] > 0


def test_model_techniques_travel_in_the_run_config(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    cfg = make_config(tmp_path, steps=4, eval_every=4, share="all", reversible=True, ff_chunks=2, embedding_dim=8)
    trainer = _train(task, cfg)
    assert {k: trainer.model_spec[k] for k in ("share", "reversible", "ff_chunks", "embedding_dim")} == \
        {"share": "all", "reversible": True, "ff_chunks": 2, "embedding_dim": 8}
    assert trainer.model.encoder.stack.blocks[0] is trainer.model.encoder.stack.blocks[-1] or cfg.depth == 1
    results = trainer.fit()
    assert results["test"]["accuracy"] is not None
    plain = _train(task, make_config(tmp_path / "plain", steps=1))
    assert "share" not in plain.model_spec, "defaults are left out of the stored model config"


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_objective_is_the_kl_and_label_mix():
    torch.manual_seed(0)
    student = et.TransformerClassifier(9, 3, dim=16, depth=1, heads=2, max_seq_len=8)
    teacher = et.TransformerClassifier(9, 3, dim=16, depth=2, heads=2, max_seq_len=8)
    batch = {"tokens": torch.randint(1, 9, (4, 6)), "mask": torch.ones(4, 6, dtype=torch.bool),
             "label": torch.tensor([0, 1, 2, 1])}
    tau, alpha = 3.0, 0.7
    objective, stats = batch_statistics(student, batch, "classification", Distillation(teacher, tau, alpha))
    s, t = student(batch["tokens"]), teacher(batch["tokens"]).detach()
    pt = F.softmax(t / tau, -1)
    kl = (pt * (pt.log() - F.log_softmax(s / tau, -1))).sum()
    ce = F.cross_entropy(s, batch["label"], reduction="sum")
    torch.testing.assert_close(objective, alpha * tau**2 * kl + (1 - alpha) * ce)
    assert stats.loss_sum == pytest.approx(float(ce.detach()), rel=1e-5)
    assert stats.aux_sums["distill_kl"] == pytest.approx(float(kl.detach()) / 4, rel=1e-4)
    same, _ = batch_statistics(student, batch, "classification", Distillation(student, tau, 1.0))
    assert abs(float(same.detach())) < 1e-5, "a student equal to its teacher has nothing to learn from it"


def test_distill_trains_a_student_of_another_mechanism_from_every_other_teacher_layer(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    _train(task, make_config(tmp_path / "teacher", depth=2, steps=2, eval_every=2)).fit()
    others = [c.name for c in et.mechanisms() if c.bidirectional and c.name != "vanilla"]
    for attention, depth in (("vanilla", 1), (others[0] if others else "vanilla", 1)):
        out = tmp_path / f"student-{attention}"
        cfg = make_config(out, attention=attention, depth=depth, steps=2, eval_every=2, teacher=str(tmp_path / "teacher"),
                          distill_alpha=0.9, distill_temperature=4.0,
                          attention_options=et.card(attention).small_options(False))
        trainer = _train(task, cfg)
        init = trainer.transfer["distilbert_init"]
        assert init["teacher_layers"] == [0] and init["tensors_copied"] > 0
        teacher = trainer.distill.teacher.state_dict()
        student = trainer.model.state_dict()
        assert torch.equal(student["encoder.embed.tokens.weight"], teacher["encoder.embed.tokens.weight"])
        assert torch.equal(student["encoder.stack.blocks.0.ff.net.0.weight"], teacher["encoder.stack.blocks.0.ff.net.0.weight"])
        results = trainer.fit()
        assert results["distillation"]["temperature"] == 4.0 and results["distillation"]["alpha"] == 0.9
        assert all("aux/distill_kl" in r for r in _records(out) if r["split"] == "train")
        assert not any(p.requires_grad for p in trainer.distill.teacher.parameters())
    # resume works for a distilled run
    cfg = make_config(tmp_path / "resumed", steps=4, eval_every=2, teacher=str(tmp_path / "teacher"))
    _train(task, cfg).fit(stop_at=2)
    assert _train(task, cfg, resume=True).fit()["complete"]


def test_bad_teachers_are_refused_before_anything_is_written(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    _train(task, make_config(tmp_path / "teacher", steps=2, eval_every=2)).fit()
    bad = [
        (dict(teacher=str(tmp_path / "missing")), "no such run folder"),
        (dict(teacher=str(tmp_path / "teacher"), task="other"), "trained on task 'tiny'.*student's task is 'other'"),
        (dict(teacher=str(tmp_path)), "not a run folder"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            _train(task, make_config(tmp_path / "student", steps=2, **overrides))
    lm = tiny_task("language_model")  # another vocabulary (257) and model class
    with pytest.raises(ValueError, match="the teacher is a TransformerClassifier, the student a TransformerLM"):
        _train(lm, make_config(tmp_path / "student", steps=2, teacher=str(tmp_path / "teacher")))
    assert not (tmp_path / "student").exists()


def test_eft_distill_cli_takes_the_teachers_data_and_refuses_bad_input(tmp_path, capsys):
    tiny = ["--task", "listops", "--max-len", "32", "--num-train", "32", "--num-val", "8", "--num-test", "8",
            "--batch-size", "8", "--steps", "2", "--eval-every", "2", "--dim", "16", "--heads", "2", "--progress", "off"]
    assert main(["train", *tiny, "--attention", "vanilla", "--depth", "2", "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    code = main(["distill", "--teacher", str(tmp_path / "t"), "--attention", "vanilla", "--out", str(tmp_path / "s"),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads(out)
    saved = json.loads((tmp_path / "s" / "trainer_state.json").read_text())["config"]
    assert saved["depth"] == 1 and saved["dim"] == 16 and saved["max_len"] == 32 and saved["num_train"] == 32
    assert results["distilbert_init"]["teacher_layers"] == [0]
    for argv, message in (
        (["--attention", "vanilla", "--teacher", str(tmp_path / "nope")], "no such run folder"),
        (["--attention", "vanilla"], "missing required option --teacher"),
        (["--attention", "vanilla", "--teacher", str(tmp_path / "t"), "--task", "text"], "--task 'text' differs"),
        (["--attention", "vanilla", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s")], "already holds a run"),
        (["--attention", "vanilla", "--teacher", str(tmp_path / "t"), "--alpha", "2"], "distill_alpha must be a number in"),
    ):
        assert main(["distill", *argv]) == 2
        _, err = capsys.readouterr()
        assert message in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("spec", ["houlsby:4", "lora:2"])
def test_fine_tuning_with_adapters_trains_a_small_part_and_saves_it_apart(spec, tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    _train(task, make_config(tmp_path / "base", task="tiny_a", depth=2, steps=2, eval_every=2, share="ffn")).fit()
    base_best = _weights(tmp_path / "base")
    cfg = make_config(tmp_path / "tuned", task="tiny_b", depth=2, steps=3, eval_every=3, share="ffn",
                      init_from=str(tmp_path / "base"), adapters=spec)
    trainer = _train(task, cfg)
    assert trainer.transfer["init_from"]["head_reinitialised"], "another task: a new head"
    results = trainer.fit()
    assert 0 < results["trainable_fraction"] < 0.5 and results["trainable_parameters"] < results["parameters"]
    tuned = _weights(tmp_path / "tuned")
    frozen = [k for k in base_best if not k.startswith("head.") and "norm" not in k]
    key = {"houlsby:4": lambda k: k, "lora:2": lambda k: k.replace("to_qkv.", "to_qkv.base.").replace("to_out.", "to_out.base.")}[spec]
    assert all(torch.equal(base_best[k], tuned[key(k)]) for k in frozen), "the base stays frozen"
    adapters = tmp_path / "tuned" / "adapters.safetensors"
    small = load_file(str(adapters))
    assert sum(t.numel() for t in small.values()) == results["trainable_parameters"]
    # the adapter file onto the base model gives the fine-tuned best model
    base_model = read_run(tmp_path / "base", "base")
    from efficient_transformers.train.transfer import load_run_model

    model = load_run_model(base_model)
    model.head = trainer.model.head.__class__(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, torch.nn.Linear)
                                                else type(m)() for m in trainer.model.head])
    load_adapters(model, spec, small)
    best = load_run_model(read_run(tmp_path / "tuned", "tuned"))
    batch = task.collate(trainer.splits["test"][:8])
    assert torch.equal(model(batch["tokens"], batch["mask"]), best(batch["tokens"], batch["mask"]))


def test_init_from_cli_takes_the_base_architecture_and_refuses_bad_input(tmp_path, capsys):
    tiny = ["--task", "listops", "--max-len", "32", "--num-train", "32", "--num-val", "8", "--num-test", "8",
            "--batch-size", "8", "--steps", "2", "--eval-every", "2", "--progress", "off"]
    assert main(["train", *tiny, "--attention", "vanilla", "--dim", "16", "--heads", "2", "--depth", "2",
                 "--share", "attention", "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert main(["train", *tiny, "--init-from", str(tmp_path / "base"), "--adapters", "houlsby:2",
                 "--out", str(tmp_path / "tuned"), "--json"]) == 0
    results = json.loads(capsys.readouterr()[0])
    assert results["attention"] == "vanilla" and results["config"]["share"] == "attention"
    assert results["config"]["dim"] == 16 and results["trainable_fraction"] < 1
    for argv, message in (
        ([*tiny, "--init-from", str(tmp_path / "base"), "--adapters", "houlsby:0"], "the size must be an int >= 1"),
        ([*tiny, "--init-from", str(tmp_path / "base"), "--adapters", "prefix:3"], "unknown adapter kind 'prefix'"),
        ([*tiny, "--attention", "vanilla", "--adapters", "lora:4"], "give --init-from RUN_DIR"),
        ([*tiny, "--init-from", str(tmp_path / "base"), "--dim", "32"], "dim=32 differs from the base run's dim=16"),
        ([*tiny, "--init-from", str(tmp_path / "none")], "no such run folder"),
        ([*tiny, "--attention", "vanilla", "--share", "some"], "unknown weight sharing share='some'"),
        ([*tiny, "--attention", "vanilla", "--embedding-dim", "999"], "embedding_dim must be None or an int in [1, dim=128]"),
        ([*tiny, "--attention", "vanilla", "--ff-chunks", "0"], "ff_chunks must be an int >= 1"),
        ([*tiny, "--attention", "vanilla", "--fp16", "--bf16"], "bf16 and fp16 contradict each other"),
    ):
        assert main(["train", *argv, "--out", str(tmp_path / "bad")]) == 2
        _, err = capsys.readouterr()
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- eval
def test_eval_reports_float32_and_int8_side_by_side(tmp_path, tiny_task, make_config):
    task = tiny_task("classification")
    cfg = make_config(tmp_path / "run", steps=6, eval_every=3, dropout=0.0, **SIZES)
    results = Trainer(cfg, task=task).fit()
    info = read_run(tmp_path / "run", "eval")
    plain = evaluate_run(info, task=task, repeats=2)
    assert set(plain["models"]) == {"float32"}
    assert plain["models"]["float32"]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    both = evaluate_run(info, int8=True, task=task, repeats=2)
    f, q = both["models"]["float32"], both["models"]["int8"]
    assert q["size_mb"] < 0.5 * f["size_mb"] and q["cpu_latency_ms"] > 0 and f["cpu_latency_ms"] > 0
    assert both["int8_vs_float32"]["accuracy_delta"] == pytest.approx(q["accuracy"] - f["accuracy"])
    assert abs(both["int8_vs_float32"]["accuracy_delta"]) <= 0.25


def test_eft_eval_cli_writes_json_and_markdown_and_refuses_bad_input(tmp_path, capsys):
    tiny = ["--task", "listops", "--attention", "vanilla", "--max-len", "32", "--num-train", "32", "--num-val", "8",
            "--num-test", "8", "--batch-size", "8", "--steps", "2", "--eval-every", "2", "--dim", "16", "--heads", "2",
            "--depth", "1", "--progress", "off", "--out", str(tmp_path / "run")]
    assert main(["train", *tiny]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--int8", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr()[0])
    assert result == json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "| int8 |" in (tmp_path / "run" / "eval.md").read_text()
    assert result["models"]["float32"]["accuracy"] == json.loads((tmp_path / "run" / "results.json").read_text())["test"]["accuracy"]
    for argv, message in (([str(tmp_path / "nope")], "no such run folder"),
                          ([str(tmp_path / "run"), "--int8", "--device", "cuda"], "allowed: --device cpu"),
                          ([str(tmp_path / "run"), "--repeats", "0"], "--repeats must be an int >= 1")):
        assert main(["eval", *argv]) == 2
        _, err = capsys.readouterr()
        assert message in err and "Traceback" not in err, err
