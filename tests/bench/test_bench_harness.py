"""The timing harness on a fake clock (exact, no sleeping), the FLOP count against the analytic
count and failure classification (the progress bar: tests/test_progress.py)."""

from __future__ import annotations

import types

import pytest
import torch

from efficient_transformers.bench import harness


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def plan(**overrides):
    values = dict(repeats=5, min_rounds=3, budget_s=1.0, timeout_s=100.0, sample_min_s=0.01)
    return harness.TimingPlan(**{**values, **overrides})


def test_interleaved_timing_rotates_pairs_and_records_failures(clock):
    calls: list[str] = []

    def step(name: str, seconds: float, fail_on_call: int | None = None):
        count = {"n": 0}

        def run():
            count["n"] += 1
            if fail_on_call is not None and count["n"] >= fail_on_call:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            calls.append(name)
            clock.now += seconds

        return run

    steps = {"vanilla": step("vanilla", 0.004), "fast": step("fast", 0.001), "flaky": step("flaky", 0.002, 4)}
    result = harness.time_interleaved(steps, plan())
    # inner steps make a sample of >= 10 ms: 3 x 4 ms, 10 x 1 ms.
    assert result.inner == {"vanilla": 3, "fast": 10, "flaky": 5}
    assert result.samples["vanilla"] == [pytest.approx(0.004)] * 5
    assert result.samples["fast"] == [pytest.approx(0.001)] * 5
    assert harness.paired_ratio(result.samples["fast"], result.samples["vanilla"]) == pytest.approx(0.25)
    # flaky failed during its first timed sample: recorded, never retried, the others went on.
    assert result.samples["flaky"] == [None] * 5
    assert harness.classify_failure(result.failures["flaky"])[0] == "oom"
    # Round r starts with mechanism r mod 3; flaky, failed in round 0, is skipped from then on.
    timed = [c for c in calls[6:] if c != "flaky"]  # after 2 warm-up calls each
    starts, position = [], 0
    for r in range(5):
        starts.append(timed[position])
        position += result.inner["vanilla"] + result.inner["fast"]
    assert starts == ["vanilla", "fast", "vanilla", "vanilla", "fast"]


def test_rounds_shrink_for_slow_steps_within_the_limit():
    assert plan().inner_and_rounds(0.001) == (10, 5)
    assert plan().inner_and_rounds(0.3) == (1, 3)  # budget 1 s allows 3 rounds: min_rounds
    assert plan().inner_and_rounds(2.0) == (1, 3)  # over budget, still min_rounds while the limit allows
    assert plan(timeout_s=5.0).inner_and_rounds(2.0) == (1, 1)  # 5 s limit: warm-up + 1 round
    assert plan(repeats=2, min_rounds=2).inner_and_rounds(1e-4) == (100, 2)


def test_paired_ratio_uses_rounds_where_both_ran():
    assert harness.paired_ratio([1.0, None, 3.0, 8.0], [2.0, 2.0, 2.0, None]) == pytest.approx(1.0)
    assert harness.paired_ratio([None], [1.0]) is None
    assert harness.median_of([None, 3.0, 1.0, 2.0]) == 2.0


@pytest.mark.parametrize("n", [1, 48])
def test_flop_count_matches_the_analytic_count(n):
    dim, heads = 32, 2
    forward = harness.Workload(mechanism="vanilla", seq_len=n, mode="forward", dim=dim, heads=heads)
    train = harness.Workload(mechanism="vanilla", seq_len=n, mode="train", dim=dim, heads=heads)
    projections = 2 * n * dim * 3 * dim + 2 * n * dim * dim
    attention = 4 * heads * n * n * (dim // heads)  # QK^T and PV: 2 products of 2 B H N N d
    assert harness.count_flops(harness.make_step(harness.build_layer(forward), forward)) == projections + attention
    # backward: 2 products per linear, 5 for attention (scores recomputed)
    assert harness.count_flops(harness.make_step(harness.build_layer(train), train)) == 3 * projections + attention * 7 // 2


def test_train_step_produces_gradients_and_forward_step_does_not():
    work = harness.Workload(mechanism="vanilla", seq_len=8, mode="train", dim=16, heads=2)
    layer = harness.build_layer(work)
    harness.make_step(layer, work)()
    assert layer.training and all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    work = harness.Workload(mechanism="vanilla", seq_len=8, mode="forward", dim=16, heads=2, dtype="bfloat16")
    layer = harness.build_layer(work)
    harness.make_step(layer, work)()
    assert not layer.training and all(p.grad is None for p in layer.parameters())
    assert next(layer.parameters()).dtype == torch.bfloat16


def test_failure_classification():
    assert harness.classify_failure(MemoryError())[0] == "oom"
    assert harness.classify_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))[0] == "oom"
    status, message = harness.classify_failure(ValueError("bad\nsecond line"))
    assert status == "error" and message == "ValueError: bad second line"
    assert harness.classify_failure(harness.UnsupportedWorkload("x: causal=True is not supported")) == (
        "unsupported", "x: causal=True is not supported")


def test_workload_round_trips_through_json_and_rejects_bad_factories():
    work = harness.Workload(mechanism="vanilla", seq_len=64, mode="train", options={"backend": "math"})
    assert harness.Workload.from_json(work.to_json()) == work
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        harness.load_factory("not_a_factory")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        harness.load_factory(f"{__file__}:nope")


def test_a_known_slow_step_time_replaces_the_timed_warm_up_call(clock):
    calls, counted = [], []

    def slow():
        calls.append(clock.now)
        clock.now += 2.0

    def count_on_first_call(name, step):
        counted.append(name)
        step()

    result = harness.time_interleaved({"vanilla": slow}, plan(), first_call=count_on_first_call,
                                      estimates_s={"vanilla": 2.0})
    assert counted == ["vanilla"]
    assert len(calls) == 1 + 3  # the first call only, then min_rounds samples of 1 step
    assert result.inner == {"vanilla": 1} and result.samples["vanilla"] == [2.0, 2.0, 2.0]
    calls.clear()
    harness.time_interleaved({"vanilla": slow}, plan(), estimates_s={"vanilla": 0.1})
    assert len(calls) == 2 + 3  # a fast estimate is not trusted: a timed warm-up call plans the rounds


class _ProjectInside(torch.autograd.Function):
    """A module called inside a custom Function on a view of a non-leaf input (as a chunked kernel scan
    calls its feature map on a chunk of k): upstream FlopCounterMode's module tracker fails on it."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module(x[:, :8])  # a view made with grad off: requires_grad, but no grad_fn

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.weight, None


def test_flop_count_survives_modules_inside_autograd_functions():
    proj = torch.nn.Linear(8, 4, bias=False)
    leaf = torch.randn(16, 8, requires_grad=True)

    def step():
        _ProjectInside.apply(leaf * 2, proj).sum().backward()

    # forward 2*16*8*4 in the module, backward one product of the same size
    assert harness.count_flops(step) == 2 * (2 * 16 * 8 * 4)
