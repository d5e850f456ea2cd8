"""Data parallel through `torchrun` (gloo on CPU): two processes write one run folder, agree with one
process at twice the batch, and resume bit-identically."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from torchrun_jobs import run_job

TINY = ["--task", "listops", "--attention", "vanilla", "--max-len", "48", "--dim", "32", "--depth", "1",
        "--heads", "2", "--num-train", "96", "--num-val", "16", "--num-test", "16", "--steps", "8",
        "--eval-every", "4", "--log-every", "2", "--progress", "off"]

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux", reason="needs torchrun")


def _torchrun(nproc: int, *argv: str, command: str = "train") -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", "efficient_transformers", command, *argv]


def _start(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc) -> str:
    out, err = proc.communicate(timeout=240)
    if proc.returncode != 0:  # the ranks' own error lines first: torchrun's summary alone names only a signal
        causes = [line for line in err.splitlines() if re.search(r"Error|error|terminate|what\(\)|Traceback", line)]
        pytest.fail(f"exit status {proc.returncode}; error lines:\n" + "\n".join(causes[:60]) + "\n--- tail ---\n" + err[-2000:])
    return out


def test_two_processes_match_one_process_and_resume_exactly(tmp_path, eft_command, child_env, run_helpers):
    ddp, single, stopped = tmp_path / "ddp", tmp_path / "single", tmp_path / "stopped"
    # 2 processes x batch 4 (with dropout), the same again stopped at step 3, and 1 process x batch 8
    # without dropout against a dropout-free 2-process twin. One torchrun job at a time (the
    # single-process run beside them): concurrent jobs on 2 cores once lost a rank to SIGABRT
    ddp_nodrop = tmp_path / "ddp_nodrop"
    single_run = _start([*eft_command, "train", *TINY, "--batch-size", "8", "--dropout", "0", "--out", str(single)], child_env)
    outputs = [run_job(cmd, child_env, fresh_out=out) for cmd, out in (
        (_torchrun(2, *TINY, "--batch-size", "4", "--dropout", "0.1", "--out", str(ddp)), ddp),
        (_torchrun(2, *TINY, "--batch-size", "4", "--dropout", "0.1", "--out", str(stopped), "--stop-at", "3"), stopped),
        (_torchrun(2, *TINY, "--batch-size", "4", "--dropout", "0", "--out", str(ddp_nodrop)), ddp_nodrop),
    )]
    _finish(single_run)
    assert "stopped at step 3 of 8" in outputs[1]
    resumed = run_job(_torchrun(2, "--resume", "--out", str(stopped), "--progress", "off"), child_env)
    assert "listops/vanilla: 8 steps" in resumed

    # one folder, written once (rank 0 only), same layout as a single-process run
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    records = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) == 7  # train 2, 4, 6, 8; val 4, 8; test 8
    assert json.loads((ddp / "results.json").read_text())["world_size"] == 2
    state = json.loads((ddp / "trainer_state.json").read_text())
    rank0, rank1 = state["rng"]["torch_cpu"]
    assert rank0 != rank1  # each process has its own dropout stream, and both are saved

    # resumed 2-process run == uninterrupted 2-process run, bit for bit
    run_helpers.same_tensors(ddp, stopped)
    assert run_helpers.metrics(ddp) == run_helpers.metrics(stopped)

    # 2 processes x batch 4 == 1 process x batch 8 up to summation order
    a, b = load_file(str(ddp_nodrop / "model.safetensors")), load_file(str(single / "model.safetensors"))
    run_helpers.close_parameters(a, b)
    va = [r for r in run_helpers.metrics(ddp_nodrop) if r["split"] == "val"]
    vb = [r for r in run_helpers.metrics(single) if r["split"] == "val"]
    assert [r["loss"] for r in va] == pytest.approx([r["loss"] for r in vb], rel=1e-4)
    assert [r["examples"] for r in va] == [16, 16]


def test_distillation_runs_data_parallel(tmp_path, eft_command, child_env):
    """`eft distill` is a trainer run like any other: two processes train the student from one teacher."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    _finish(_start([*eft_command, "train", *TINY, "--depth", "2", "--batch-size", "8", "--out", str(teacher)], child_env))
    run_job(_torchrun(2, "--teacher", str(teacher), "--attention", "linear_transformer", "--steps", "4",
                      "--batch-size", "4", "--eval-every", "2", "--log-every", "2", "--progress", "off",
                      "--out", str(student), command="distill"), child_env, fresh_out=student)
    results = json.loads((student / "results.json").read_text())
    assert results["world_size"] == 2
    train = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == [2, 4]
    assert all(r["aux/distill_kl"] >= 0 for r in train if r["split"] == "train")
