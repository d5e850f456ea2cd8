"""Training with recurrence in several processes (`torchrun`, gloo on CPU): each process carries the
memory of its own lanes, the checkpoint holds every process's lanes in order, a stopped and resumed
2-process run repeats the uninterrupted one bit for bit (memories included), and 2 processes x batch 2
read the lanes of 1 process x batch 4 (same results up to summation order)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchrun_jobs import run_job

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux", reason="needs torchrun")


def _torchrun(nproc: int, *argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "efficient_transformers", "train", *argv]


def _start(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc) -> str:
    out, err = proc.communicate(timeout=240)
    if proc.returncode != 0:
        causes = [line for line in err.splitlines() if re.search(r"Error|error|Traceback", line)]
        pytest.fail(f"exit status {proc.returncode}; error lines:\n" + "\n".join(causes[:60]) + "\n--- tail ---\n" + err[-2000:])
    return out

# compressive with most_used: the memory holds hidden states, compressed slots and usage statistics
ARGS = ["--task", "byte_lm", "--attention", "compressive", "--segment-len", "16", "--attention-option", "mem_len=8",
        "--attention-option", "cmem_len=4", "--attention-option", "compression=most_used", "--max-len", "64",
        "--dim", "16", "--depth", "1", "--heads", "2", "--num-train", "24", "--num-val", "8", "--num-test", "8",
        "--steps", "4", "--eval-every", "2", "--log-every", "2", "--progress", "off", "--dropout", "0"]


def test_two_processes_carry_their_lanes_memories_and_resume_exactly(tmp_path, eft_command, child_env, run_helpers):
    ddp, stopped, single = tmp_path / "ddp", tmp_path / "stopped", tmp_path / "single"
    single_run = _start([*eft_command, "train", *ARGS, "--batch-size", "4", "--out", str(single)], child_env)
    run_job(_torchrun(2, *ARGS, "--batch-size", "2", "--out", str(ddp)), child_env, fresh_out=ddp)
    out = run_job(_torchrun(2, *ARGS, "--batch-size", "2", "--out", str(stopped), "--stop-at", "2"), child_env,
                  fresh_out=stopped)
    assert "stopped at step 2 of 4" in out
    with safe_open(str(stopped / "memory.safetensors"), "pt") as f:
        assert f.metadata()["lanes"] == "4" and f.metadata()["step"] == "2"
    run_job(_torchrun(2, "--resume", "--out", str(stopped), "--progress", "off"), child_env)
    _finish(single_run)

    # resumed == uninterrupted, bit for bit: weights, optimiser, metrics and the memory of all 4 lanes
    run_helpers.same_tensors(ddp, stopped)
    assert run_helpers.metrics(ddp) == run_helpers.metrics(stopped)
    a, b = load_file(str(ddp / "memory.safetensors")), load_file(str(stopped / "memory.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the 2 processes' lanes are the single process's 4 lanes, in order
    c = load_file(str(single / "memory.safetensors"))
    assert a.keys() == c.keys() and any(t.shape[0] == 4 and t.dim() == 3 for t in a.values())
    for key in a:
        assert a[key].shape == c[key].shape, key
        if a[key].dtype == torch.int64:  # usage_queries: counts, exact
            assert torch.equal(a[key], c[key]), key
        else:
            torch.testing.assert_close(a[key], c[key], atol=1e-4, rtol=1e-4)
    run_helpers.close_parameters(load_file(str(ddp / "model.safetensors")), load_file(str(single / "model.safetensors")))
    va = [r["bits_per_byte"] for r in run_helpers.metrics(ddp) if r["split"] == "val"]
    vb = [r["bits_per_byte"] for r in run_helpers.metrics(single) if r["split"] == "val"]
    assert len(va) == 2 and va == pytest.approx(vb, rel=1e-5)
    assert json.loads((ddp / "results.json").read_text())["world_size"] == 2
