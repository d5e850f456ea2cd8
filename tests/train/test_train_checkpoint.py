"""Checkpoint files: pickle-free round trips, atomic writes and the journaled commit / recovery."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.train import checkpoint as ckpt

TRAIN_SRC = Path(et.__file__).parent / "train"


def _trained_adamw() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW([{"params": [model[0].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_state_round_trips_exactly_and_resumes_identically(tmp_path):
    model, opt = _trained_adamw()
    path = tmp_path / "optimizer.safetensors"
    ckpt.atomic_write_bytes(path, ckpt.tree_to_bytes(opt.state_dict(), {"step": "3"}))
    loaded, meta = ckpt.load_tree(path)
    assert meta["step"] == "3"
    original = opt.state_dict()
    assert loaded["param_groups"] == original["param_groups"]  # ints, floats, tuples (betas), bools, None
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    assert set(loaded["state"]) == set(original["state"]) == {0, 1, 2, 3}  # integer keys restored
    for idx, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(loaded["state"][idx][key], value), (idx, key)

    # a copy restored from the file takes the very same next step
    model2, opt2 = _trained_adamw()
    opt2.load_state_dict(loaded)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_tree_skeleton_rejects_unknown_types():
    with pytest.raises(TypeError, match="set"):
        ckpt.flatten_tree({"a": {1, 2}})


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=11, dim=8, depth=1, heads=2, max_seq_len=16)
    path = tmp_path / "model.safetensors"
    ckpt.atomic_write_bytes(path, ckpt.weights_to_bytes(lm, {"step": "0"}))
    meta = ckpt.read_metadata(path)
    assert json.loads(meta["aliases"]) == {"head.weight": "embed.tokens.weight"}
    torch.manual_seed(1)
    other = et.TransformerLM(vocab_size=11, dim=8, depth=1, heads=2, max_seq_len=16)
    assert not torch.equal(other.embed.tokens.weight, lm.embed.tokens.weight)
    ckpt.load_weights(path, other)
    for (name, a), (_, b) in zip(lm.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert other.head.weight.data_ptr() == other.embed.tokens.weight.data_ptr()  # still tied


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    ckpt.atomic_write_bytes(path, ckpt.weights_to_bytes(torch.nn.Linear(3, 2)))
    with pytest.raises(ckpt.CheckpointError, match=r"w\.safetensors.*do not fit"):
        ckpt.load_weights(path, torch.nn.Linear(3, 4))
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError, match=r"bad\.safetensors: expected a safetensors file"):
        ckpt.read_metadata(garbage)


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.json"
    ckpt.atomic_write_json(target, {"a": 1, "rng": [1, 2, 3]})
    ckpt.atomic_write_json(target, {"a": 2, "rng": list(range(300))})
    assert json.loads(target.read_text()) == {"a": 2, "rng": list(range(300))}
    assert "[0, 1, 2," in target.read_text()  # number lists stay on one line
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _write_tagged(out: Path, name: str, step: int, pending: bool = False) -> None:
    data = ckpt.weights_to_bytes(torch.nn.Linear(2, 2), {"step": str(step)})
    if pending:
        ckpt.stage(out, name, data)
    else:
        ckpt.atomic_write_bytes(out / name, data)


def _state(step: int, files: dict) -> dict:
    return {"format": ckpt.STATE_FORMAT, "step": step, "files": files}


def test_recover_rolls_forward_a_commit_interrupted_before_the_renames(tmp_path):
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 5)
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 10, pending=True)
    ckpt.atomic_write_json(tmp_path / ckpt.STATE_FILE, _state(10, {ckpt.MODEL_FILE: 10}))  # killed right here
    state = ckpt.recover(tmp_path)
    assert state["step"] == 10
    assert ckpt.file_tag(tmp_path / ckpt.MODEL_FILE) == 10
    assert not list(tmp_path.glob("*.pending"))


def test_recover_discards_an_uncommitted_checkpoint(tmp_path):
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 5)
    ckpt.atomic_write_json(tmp_path / ckpt.STATE_FILE, _state(5, {ckpt.MODEL_FILE: 5}))
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 10, pending=True)  # killed before the commit
    assert ckpt.recover(tmp_path)["step"] == 5
    assert ckpt.file_tag(tmp_path / ckpt.MODEL_FILE) == 5
    assert not list(tmp_path.glob("*.pending"))


def test_recover_removes_the_temporary_file_of_a_write_killed_midway(tmp_path):
    """A SIGKILL inside `atomic_write_bytes` leaves its `.NAME.XXXX.tmp`; the committed files stay, the
    orphan goes (seen in the SIGKILL test: the kill landed inside the state file's write)."""
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 5)
    ckpt.atomic_write_json(tmp_path / ckpt.STATE_FILE, _state(5, {ckpt.MODEL_FILE: 5}))
    orphan = tmp_path / f".{ckpt.STATE_FILE}.abc123.tmp"
    orphan.write_text('{"format": ')  # half a state file
    assert ckpt.recover(tmp_path)["step"] == 5
    assert not orphan.exists() and ckpt.file_tag(tmp_path / ckpt.MODEL_FILE) == 5


def test_recover_refuses_a_folder_changed_outside_the_trainer(tmp_path):
    _write_tagged(tmp_path, ckpt.MODEL_FILE, 7)
    ckpt.atomic_write_json(tmp_path / ckpt.STATE_FILE, _state(5, {ckpt.MODEL_FILE: 5}))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: expected the checkpoint of step 5.*found step 7"):
        ckpt.recover(tmp_path)
    (tmp_path / ckpt.STATE_FILE).write_text("{ not json")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.json: line 1"):
        ckpt.recover(tmp_path)


def test_training_code_never_uses_pickle():
    pattern = re.compile(r"\btorch\.(save|load)\(|\bimport pickle\b|\bpickle\.|all_gather_object|broadcast_object")
    offenders = [f"{p.name}:{i}" for p in TRAIN_SRC.glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
