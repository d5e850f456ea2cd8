"""Training with recurrence (--segment-len): contiguous lanes whose memory belongs to the text that
follows, the memory carried between micro-batches, exact resume with the memory in the checkpoint,
evaluation of the split as streams, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from efficient_transformers.tasks.base import WindowDataset
from efficient_transformers.train import Trainer
from efficient_transformers.train.recurrence import StreamLanes, memory_from_tree, memory_to_tree

XL = {"mem_len": 6, "same_length": False}


def byte_stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(97, 110, n).astype(np.uint8)


def splits(window=12):
    return {"train": WindowDataset(byte_stream(700), window), "val": WindowDataset(byte_stream(200, 1), window),
            "test": WindowDataset(byte_stream(200, 2), window)}


def test_lanes_are_contiguous_streams_so_the_memory_belongs_to_what_follows():
    stream = np.arange(103) % 251
    lanes = StreamLanes(stream, lanes=4, segment_len=5)  # 25 bytes a lane: 5 segments
    assert (lanes.lane_len, lanes.segments) == (25, 5)
    previous = None
    for i in range(7):
        batch, restart = lanes.segment(i)
        assert batch["tokens"].shape == (4, 5) and restart == (i % 5 == 0)
        torch.testing.assert_close(batch["targets"][:, :-1], batch["tokens"][:, 1:])
        assert torch.equal(batch["tokens"][:, 0] - 1, torch.tensor([b * 25 + (i % 5) * 5 for b in range(4)]))
        if previous is not None and not restart:
            assert torch.equal(batch["tokens"][:, 0], previous["targets"][:, -1])  # the text right after
        previous = batch


def test_training_carries_the_memory_and_resumes_exactly(tmp_path, tiny_task, make_config, run_helpers):
    task = tiny_task("language_model")
    settings = dict(attention="transformer_xl", attention_options=XL, segment_len=8, steps=10, eval_every=4,
                    checkpoint_every=3, log_every=2, accum=2, batch_size=4, dropout=0.1, lr=3e-3)
    through = Trainer(make_config(tmp_path / "through", **settings), task=task, splits=splits())
    seen = []
    plain = through.recurrence.carrying  # record the memory each micro-batch starts from
    through.recurrence.carrying = lambda m: (seen.append(None if through.recurrence.memory is None
                                                         else through.recurrence.memory[0].length), plain(m))[1]
    results = through.fit()
    lanes = through.recurrence.train.segments  # 700 bytes / 4 lanes / 8 = 21 segments a lane
    # micro-batches 0..7 continue one stream; the validation at step 4 reads with a memory of its own,
    # and training goes on from its memory (micro-batch 8 starts at byte 64 of every lane)
    assert seen[:10] == [None, 8, 16, 24, 32, 40, 48, 56, None, 64] and lanes == 21
    assert results["complete"] and results["test"]["bits_per_byte"] is not None
    stopped = Trainer(make_config(tmp_path / "resumed", **settings), task=task, splits=splits()).fit(stop_at=5)
    assert stopped["complete"] is False
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert "memory.safetensors" in state["files"]
    saved = load_file(str(tmp_path / "resumed" / "memory.safetensors"))
    assert saved and all(t.shape[1] == 6 for name, t in saved.items() if name.endswith("hidden"))
    Trainer(make_config(tmp_path / "resumed", **settings), task=task, splits=splits(), resume=True).fit()
    run_helpers.same_tensors(tmp_path / "through", tmp_path / "resumed")
    assert run_helpers.metrics(tmp_path / "through") == run_helpers.metrics(tmp_path / "resumed")
    a = load_file(str(tmp_path / "through" / "memory.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "memory.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_reads_the_split_as_streams_with_the_memory(tmp_path, tiny_task, make_config):
    task = tiny_task("language_model")
    trainer = Trainer(make_config(tmp_path, attention="transformer_xl", attention_options=XL, segment_len=8,
                                  steps=1, batch_size=4, eval_batch_size=3), task=task, splits=splits())
    result = trainer.evaluate("val")
    # by hand: 3 lanes of 66 bytes, 8 segments of 8, the memory carried
    model = trainer.model.eval()
    stream = torch.from_numpy(splits()["val"].stream[:16 * 12 + 1].astype(np.int64)) + 1
    lanes = torch.stack([stream[b * 64: b * 64 + 65] for b in range(3)])  # (3, 65)
    memory, loss, count = None, 0.0, 0
    with torch.no_grad():
        for j in range(8):
            tokens, targets = lanes[:, j * 8: j * 8 + 8], lanes[:, j * 8 + 1: j * 8 + 9]
            logits, memory = model(tokens, memory=memory, return_state=True)
            loss += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            count += targets.numel()
    assert result["loss"] == pytest.approx(loss / count, rel=1e-6)


def test_memory_round_trips_through_a_tree():
    from efficient_transformers.attention.compressive import CompressiveMemory
    from efficient_transformers.attention.transformer_xl import XLMemory

    memory = [XLMemory(torch.randn(2, 3, 4), None, 9, keys=torch.randn(2, 1, 3, 4)),
              CompressiveMemory(torch.randn(2, 1, 4), torch.tensor([[True], [False]]), torch.randn(2, 2, 4), None, 5)]
    back = memory_from_tree(memory_to_tree(memory), torch.device("cpu"))
    assert torch.equal(back[0].hidden, memory[0].hidden) and back[0].keys is None and back[0].length == 9
    assert torch.equal(back[1].compressed, memory[1].compressed) and torch.equal(back[1].key_mask, memory[1].key_mask)
    used = CompressiveMemory(torch.randn(2, 1, 4), None, torch.randn(2, 2, 4), None, 5, torch.rand(2, 1),
                             torch.tensor([[3], [2]]))  # compression="most_used": the usage statistics too
    back = memory_from_tree(memory_to_tree([used]), torch.device("cpu"))[0]
    assert torch.equal(back.usage, used.usage) and torch.equal(back.usage_queries, used.usage_queries)
    assert back.usage_queries.dtype == torch.int64


def test_segment_len_is_refused_where_it_means_nothing(tmp_path, tiny_task, make_config):
    lm = tiny_task("language_model")
    with pytest.raises(ValueError, match=r"--segment-len 8: 'vanilla' carries no recurrent memory; allowed: "
                                         r"--attention transformer_xl or compressive"):
        Trainer(make_config(tmp_path, attention="vanilla", segment_len=8), task=lm, splits=splits())
    with pytest.raises(ValueError, match=r"--segment-len 8: segment-level recurrence trains language models"):
        classification = tiny_task("classification")
        Trainer(make_config(tmp_path, attention="vanilla", segment_len=8), task=classification,
                splits=classification.datasets())
    with pytest.raises(ValueError, match=r"segment_len must be an int >= 1, got 0"):
        make_config(tmp_path, attention="transformer_xl", segment_len=0)
    with pytest.raises(ValueError, match=r"the train split \(701 bytes\) is too short"):
        Trainer(make_config(tmp_path, attention="transformer_xl", segment_len=400, batch_size=4), task=lm,
                splits={**splits(), "train": WindowDataset(byte_stream(701), 700)})
