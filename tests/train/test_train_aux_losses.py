"""The trainer adds the attention layers' auxiliary losses with their weights and logs each one."""

from __future__ import annotations

import json

import pytest
import torch

from efficient_transformers.train import Trainer
from efficient_transformers.train.objective import batch_statistics


def test_the_trainer_adds_weighted_aux_losses_and_logs_them(aux_reporting_vanilla, tmp_path, tiny_task, make_config):
    """(aux_reporting_vanilla: vanilla layers report their values' mean square with weight 0.25.)"""
    task = tiny_task("classification")
    cfg = make_config(tmp_path, steps=4, eval_every=2, log_every=2, dropout=0.0)
    trainer = Trainer(cfg, task=task, splits=task.datasets(seed=0))
    batch = task.collate([trainer.splits["train"][i] for i in range(4)])
    objective, stats = batch_statistics(trainer.model, batch, task.kind)
    energy = trainer.model.aux_losses()["value_energy"].value.detach()
    torch.testing.assert_close(objective, torch.tensor(stats.loss_sum) + 0.25 * energy * stats.count)
    assert stats.aux_sums == {"value_energy": pytest.approx(energy.item())}
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["split"] == "train"]
    assert train_lines and all(line["aux/value_energy"] > 0 for line in train_lines)
    assert all("aux/value_energy" in line for line in lines if line["split"] in ("val", "test"))
