"""The DDP tests' job runner retries the known gloo teardown abort once, and nothing else."""

import contextlib
import sys

import pytest
from torchrun_jobs import TEARDOWN_ABORT, run_job

SCRIPT = """
import pathlib, sys
marker = pathlib.Path(sys.argv[1]) / "tried"
if {always} or not marker.exists():
    marker.touch()
    sys.stderr.write("{message}\\n  exitcode  : -6 (pid: 1)  (SIGABRT)\\n")
    sys.exit(1)
print("done")
"""


def _job(tmp_path, always=False, message=TEARDOWN_ABORT):
    return [sys.executable, "-c", SCRIPT.format(always=always, message=message), str(tmp_path)]


def test_one_teardown_abort_is_run_again(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "partial").touch()
    with pytest.warns(UserWarning, match="gloo teardown abort"):
        assert run_job(_job(tmp_path), {}, fresh_out=out).strip() == "done"
    assert not out.exists()  # the retry starts from scratch


@pytest.mark.parametrize("always,message", [(True, TEARDOWN_ABORT), (False, "RuntimeError: a real failure")])
def test_a_second_abort_or_another_failure_fails(tmp_path, always, message):
    with pytest.raises(pytest.fail.Exception, match="exit status 1"), pytest.warns() if always else contextlib.nullcontext():
        run_job(_job(tmp_path, always, message), {})

