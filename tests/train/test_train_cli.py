"""`eft train` end to end on the real ListOps task: output layout, clean errors for bad input, and exact
resume after the process is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from efficient_transformers.cli import main
from efficient_transformers.train.command import parse_key_values

TINY = ["--task", "listops", "--attention", "vanilla", "--max-len", "48", "--dim", "32", "--depth", "1",
        "--heads", "2", "--num-train", "96", "--num-val", "16", "--num-test", "16", "--batch-size", "8"]


def _eft(capsys, *argv):
    code = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_the_documented_output_folder(tmp_path, capsys):
    code, out, err = _eft(capsys, *TINY, "--steps", 6, "--eval-every", 3, "--log-every", 2, "--out", tmp_path,
                          "--attention-option", "backend=\"math\"", "--json")
    assert code == 0, err
    assert err == ""  # no progress bar in a pipe
    results = json.loads(out)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.safetensors", "metrics.jsonl", "model.safetensors", "optimizer.safetensors",
                     "results.json", "trainer_state.json"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (2, "train"), (3, "val"), (4, "train"), (6, "train"), (6, "val"), (6, "test")]
    for r in records:
        assert {"step", "split", "loss", "accuracy", "elapsed"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
    assert all("lr" in r for r in records if r["split"] != "test")
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["attention_options"] == {"backend": "math"}
    assert state["best"]["step"] in (3, 6) and len(state["rng"]["torch_cpu"][0]) > 0
    assert results["test"]["accuracy"] == records[-1]["accuracy"]
    assert results["baseline"]["test"]["accuracy"] is not None


@pytest.mark.parametrize("argv,message", [
    (["--task", "nope", "--attention", "vanilla"], "unknown task 'nope'; allowed tasks: ['listops'"),
    (["--task", "listops", "--attention", "nope"], "unknown attention mechanism 'nope'; registered: ['vanilla'"),
    (["--task", "listops"], "missing required option(s) --attention"),
    ([*TINY, "--attention-option", "window"], "--attention-option 'window': expected KEY=VALUE"),
    ([*TINY, "--attention-option", "window=4"], "vanilla: unknown option(s) ['window']; allowed options: ['backend']"),
    ([*TINY, "--task-option", "depth=3"], "unknown option 'depth' for task 'listops'"),
    ([*TINY, "--heads", "3"], "heads=3 does not divide dim=32"),
    ([*TINY, "--device", "tpu"], "unknown device 'tpu'"),
    ([*TINY, "--resume"], "--resume needs --out"),
])
def test_bad_input_is_one_clear_line_and_exit_status_2(tmp_path, capsys, argv, message):
    code, out, err = _eft(capsys, *argv, *([] if "--resume" in argv else ["--out", tmp_path / "run"]))
    assert code == 2
    assert err.startswith("eft train: error: ") and message in err, err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "run").exists()  # nothing written


def _listops_files(folder, bad_line: str | None = None, missing: str | None = None):
    folder.mkdir()
    rows = ["Source\tTarget", "( ( [MAX 4 ) 9 ] )\t9", "( ( [MIN 4 ) 9 ] )\t4", "( ( [SM 4 ) 9 ] )\t3"]
    for split in ("train", "val", "test"):
        if split == missing:
            continue
        lines = rows + ([bad_line] if bad_line and split == "train" else [])
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_malformed_data_file_names_file_line_and_expectation(tmp_path, capsys):
    data = _listops_files(tmp_path / "data", bad_line="( ( [MAX 4 ) 9 ] )\tseven")
    code, _, err = _eft(capsys, *TINY, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert f"{data / 'basic_train.tsv'}:5: expected a Target digit 0-9, got 'seven'" in err
    assert not (tmp_path / "run").exists()


def test_missing_data_file_is_named(tmp_path, capsys):
    data = _listops_files(tmp_path / "data", missing="val")
    code, _, err = _eft(capsys, *TINY, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and str(data / "basic_val.tsv") in err and "not found" in err


def test_official_files_train(tmp_path, capsys):
    data = _listops_files(tmp_path / "data")
    code, out, err = _eft(capsys, *TINY, "--data", data, "--steps", 2, "--eval-every", 2, "--out", tmp_path / "run")
    assert code == 0, err
    assert "listops/vanilla: 2 steps; best val accuracy" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val"]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0) and results["test"]["examples"] == 3


def test_existing_run_is_kept_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert _eft(capsys, *TINY, "--steps", 2, "--eval-every", 2, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = _eft(capsys, *TINY, "--steps", 2, "--eval-every", 2, "--out", out)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    code, _, err = _eft(capsys, "--resume", "--out", out, "--lr", "0.5")
    assert code == 2 and "lr: checkpoint 0.001 vs given 0.5" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, out_text, err = _eft(capsys, "--resume", "--out", out, "--steps", 4)  # longer: allowed
    assert code == 0, err
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4


def test_key_value_options_parse_json_values():
    assert parse_key_values(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=text", "f="], "--x") == {
        "a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "text", "f": ""}
    with pytest.raises(ValueError, match="--x 'a' is given twice"):
        parse_key_values(["a=1", "a=2"], "--x")


def test_sigkill_then_resume_is_bit_identical(tmp_path, eft_command, child_env, run_helpers):
    args = [*eft_command, "train", *TINY, "--steps", "120", "--checkpoint-every", "10", "--eval-every", "40",
            "--log-every", "5", "--progress", "off"]
    killed, through = tmp_path / "killed", tmp_path / "through"
    victim = subprocess.Popen([*args, "--out", str(killed)], env=child_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    reference = subprocess.Popen([*args, "--out", str(through)], env=child_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "trainer_state.json").exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(0.05)  # land somewhere after the first checkpoint, likely inside a later one
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()
    step_at_kill = json.loads((killed / "trainer_state.json").read_text())["step"]
    assert 10 <= step_at_kill < 120, f"the run was not interrupted (step {step_at_kill})"
    resumed = subprocess.run([*eft_command, "train", "--resume", "--out", str(killed), "--progress", "off"],
                             env=child_env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    run_helpers.same_tensors(through, killed)
    assert run_helpers.metrics(through) == run_helpers.metrics(killed)
    assert not list(killed.glob("*.pending")) and not list(killed.glob(".*.tmp"))
