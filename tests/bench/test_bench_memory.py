"""The isolated memory probe: it must see a quadratic toy's N^2 memory that vanilla's fused kernel
avoids, give the same figure whatever ran before it, and turn every failure into a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

import efficient_transformers as et
from efficient_transformers.bench import analysis, harness, memory
from efficient_transformers.bench.memory import ProbeServer

TOYS = Path(__file__).with_name("bench_toy_layers.py")
DIM, HEADS = 64, 4


@pytest.fixture(scope="module")
def server():
    with ProbeServer(threads=1) as probe_server:
        yield probe_server


def probe(server, n, *, toy=None, mode="train", timeout_s=60.0):
    work = harness.Workload(mechanism=toy or "vanilla", seq_len=n, mode=mode, dim=DIM, heads=HEADS,
                            factory=f"{TOYS}:{toy}" if toy else None)
    return server.measure(work.to_json(), timeout_s)


def test_probe_catches_quadratic_memory_that_vanilla_avoids(server):
    lengths = (512, 1024, 2048)
    toy = {n: probe(server, n, toy="quadratic") for n in lengths}
    vanilla = {n: probe(server, n) for n in lengths}
    assert all(a["status"] == "ok" for a in [*toy.values(), *vanilla.values()]), (toy, vanilla)
    toy_slope = analysis.fit_loglog_slope([(n, a["peak_mem_mb"]) for n, a in toy.items()])
    vanilla_slope = analysis.fit_loglog_slope([(n, a["peak_mem_mb"]) for n, a in vanilla.items()])
    assert toy_slope > 1.7, toy
    assert vanilla_slope < 1.3, vanilla
    # The toy keeps at least its (B, H, N, N) float32 probabilities for the backward pass.
    scores_mib = HEADS * 2048**2 * 4 / 2**20
    assert toy[2048]["peak_mem_mb"] >= scores_mib
    assert vanilla[2048]["peak_mem_mb"] < scores_mib / 4
    assert "quadratic" not in [c.name for c in et.mechanisms()]


def test_probe_is_isolated_from_previous_configurations(server):
    alone = probe(server, 512, toy="quadratic")["peak_mem_mb"]
    probe(server, 2048, toy="quadratic")  # frees 100+ MiB that a shared process would reuse
    after_big = probe(server, 512, toy="quadratic")["peak_mem_mb"]
    # In a shared process the 512 step would reuse the pages freed by the 2048 one and report almost
    # nothing; isolated, it reports its own scores again (RSS figures of a few MiB vary by +-30 %).
    scores_mib = HEADS * 512**2 * 4 / 2**20
    assert alone >= scores_mib and after_big >= scores_mib
    assert after_big == pytest.approx(alone, rel=0.4)


@pytest.mark.parametrize(
    ("toy", "status", "message"),
    [
        ("sleeper", "timeout", "limit of 2 s"),
        ("allocation_failure", "oom", "can't allocate memory"),
        ("broken", "error", "ZeroDivisionError: toy failure"),
        ("killed", "oom", "SIGKILL"),
    ],
)
def test_probe_turns_failures_into_verdicts(server, toy, status, message):
    answer = probe(server, 64, toy=toy, mode="forward", timeout_s=2.0)
    assert answer["status"] == status
    assert message in answer["error"]
    assert probe(server, 64, mode="forward")["status"] == "ok"  # the server carries on


def test_unsupported_combination_is_a_verdict_not_a_crash(server):
    work = harness.Workload(mechanism="vanilla", seq_len=64, mode="forward", options={"no_such_option": 1})
    answer = server.measure(work.to_json(), 30.0)
    assert answer["status"] == "unsupported"
    assert "no_such_option" in answer["error"] and "allowed options" in answer["error"]


def test_without_proc_the_probe_reports_no_memory_but_still_measures(monkeypatch):
    monkeypatch.setattr(memory, "PROC_STATUS", "/nonexistent/status")
    work = harness.Workload(mechanism="vanilla", seq_len=32, mode="forward", dim=DIM, heads=HEADS)
    answer = memory.measure_in_this_process(work.to_json(), threads=1)
    assert answer["status"] == "ok" and answer["peak_mem_mb"] is None
    assert "unavailable" in answer["memory_note"] and "/nonexistent/status" in answer["memory_note"]
    assert answer["first_step_ms"] > 0


def test_spawn_fallback_gives_the_same_verdicts():
    """Where fork is unavailable each configuration runs in a fresh interpreter."""
    request = {"workload": harness.Workload(mechanism="quadratic", seq_len=512, mode="train", dim=DIM, heads=HEADS,
                                            factory=f"{TOYS}:quadratic").to_json(),
               "timeout_s": 60.0, "threads": 1}
    answer = memory._spawn_and_measure(request)
    assert answer["status"] == "ok"
    assert answer["peak_mem_mb"] >= HEADS * 512**2 * 4 / 2**20


def test_the_probe_processes_load_the_native_kernels_the_parent_built(tmp_path, monkeypatch):
    """A probe has a time limit and a fresh cache directory would make it compile the native kernels
    (15-60 s on two cores) inside that limit, and a killed build left PyTorch's lock file behind for the
    next probe to wait on: the CI failure of `eft advise` under a moved XDG_CACHE_HOME. The parent
    builds (here: already has) the kernels and its probe server loads them from where they are."""
    from efficient_transformers import native

    if not native.available():  # pragma: no cover - CI has a compiler
        pytest.skip(f"no native kernels here: {native.build_error()}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # PyTorch's default extension cache moves too
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert memory._child_env()["TORCH_EXTENSIONS_DIR"] == str(Path(native.build_directory()).parent)
    work = harness.Workload(mechanism="performer", seq_len=64, mode="train", dim=32, heads=2)
    with ProbeServer(threads=1) as fresh:
        answer = fresh.measure(work.to_json(), 20.0)
    assert answer["status"] == "ok", answer
    assert not (tmp_path / "xdg" / "torch_extensions").exists()  # nothing was built there
