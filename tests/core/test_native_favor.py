"""The native FAVOR+ kernel (`efficient_transformers.native`, `native/favor.cpp`) against the portable path.

The float64 reference tests of `test_kernel_attention.py` already run through the native kernel
(bidirectional, positive features); here: that it is the kernel that runs, that it equals the portable
Python form op for op in float64 and float32 (outputs and gradients, padding, an all-padded item,
vector tails), that the switches and the build failure fall back to the portable path, and that the
ceiling recorder still sees the products."""

import shutil
import warnings

import pytest
import torch
import torch.utils.cpp_extension
from torch.utils._python_dispatch import TorchDispatchMode

import efficient_transformers as et
from efficient_transformers import native
from efficient_transformers.bench import harness, products
from efficient_transformers.core.feature_maps import PositiveRandomFeatures
from efficient_transformers.core.kernel_attention import kernel_attention, reference_kernel_attention

if shutil.which("c++") is None and shutil.which("g++") is None:  # pragma: no cover - CI has a compiler
    pytest.skip("no C++ compiler: the native kernels cannot be built here", allow_module_level=True)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.name()) if hasattr(func, "name") else str(func))
        return func(*args, **(kwargs or {}))


def native_ops(names):
    """The native FAVOR+ kernels among the ops run (not the oneDNN product, which the projections use too)."""
    return {n for n in names if n.startswith("efficient_transformers::favor")}


def inputs(dtype, batch=3, heads=2, n=50, d=8, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
            for _ in range(3)]


def padding(batch, n):
    mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # every key of the last item is padding
    return mask


def run(q, k, v, feature_map, mask, segment, causal=False, chunk=4, state=None, saved="none"):
    """Outputs and input gradients (and, causal: the final state and the incoming state's gradient)."""
    out, final = kernel_attention(q, k, v, feature_map, key_mask=mask, segment_size=segment, causal=causal,
                                  chunk_size=chunk, state=state, saved_features=saved)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    loss = (out * weights).sum()
    inputs = [q, k, v]
    if causal:
        loss = loss + (final.kv * torch.linspace(-1, 1, final.kv.numel(), dtype=out.dtype).view_as(final.kv)).sum()
        if state is not None:
            inputs.append(state.kv)
    grads = torch.autograd.grad(loss, inputs)
    return (out, *grads) + ((final.kv.detach(), final.ref) if causal else ())


def test_the_build_succeeds_where_a_compiler_exists():
    assert native.available(), f"the native kernels did not build: {native.build_error()}"


@pytest.mark.parametrize("dtype,tol,backend", [(torch.float64, 1e-12, "auto"), (torch.float32, 2e-5, "torch"),
                                               (torch.float32, 2e-5, "onednn")])
@pytest.mark.parametrize("m,segment,saved", [(20, 16, "none"), (20, 16, "all"), (35, 1024, "keys"), (64, 7, "none"),
                                             (64, 7, "keys")])  # vector tails; several / one / odd segments
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_native_equals_the_portable_path_outputs_and_gradients(dtype, tol, backend, m, segment, saved, masked, causal,
                                                               monkeypatch):
    """Bidirectional, and causal with chunks of 4 (segments rounded to a multiple: 16, 1024, 4; 50 tokens
    leave a partial last chunk), its final state and a loss on it; the kernels' float32 products on
    ATen's BLAS and on oneDNN (`core.gemm`; the portable path always runs PyTorch's); the backward pass
    recomputing the features or reading the kept key features or query and key features."""
    monkeypatch.setenv("EFT_MATMUL", backend)
    torch.manual_seed(0)
    feature_map = PositiveRandomFeatures(8, m, orthogonal=True).to(dtype)
    q, k, v = inputs(dtype)
    mask = padding(3, 50) if masked else None
    seen = OpNames()
    with seen:
        fast = run(q, k, v, feature_map, mask, segment, causal, saved=saved)
    prefix = "efficient_transformers::favor_causal_" if causal else "efficient_transformers::favor_"
    assert native_ops(seen.names) == {prefix + "forward", prefix + "backward"}
    with native.portable():
        seen = OpNames()
        with seen:
            slow = run(q, k, v, feature_map, mask, segment, causal)
        assert not native_ops(seen.names)
    if causal:  # the final reference: -inf for the all-padded item, exactly the same maxima otherwise
        torch.testing.assert_close(fast[-1], slow[-1], atol=0, rtol=1e-6)
        fast, slow = fast[:-1], slow[:-1]
    for got, expected in zip(fast, slow):
        scale = expected.abs().max()
        torch.testing.assert_close(got / scale, expected / scale, atol=tol, rtol=0)
    if masked:
        assert torch.equal(fast[0][-1], torch.zeros_like(fast[0][-1])), "an all-padded item gives zeros"
        assert torch.equal(fast[2][0][:, ~mask[0]], torch.zeros_like(fast[2][0][:, ~mask[0]])), \
            "padded keys get no gradient"


@pytest.mark.parametrize("chunk", [32, 160])
def test_causal_scores_saved_or_recomputed_equal_the_portable_path(chunk):
    """Chunks up to 128 save their weighted within-chunk scores for the backward pass (N C numbers per
    head); larger chunks recompute them. Both give the portable path's outputs and gradients."""
    torch.manual_seed(0)
    feature_map = PositiveRandomFeatures(8, 24, orthogonal=True).double()
    q, k, v = inputs(torch.float64, batch=2, n=330)  # 330 tokens: a partial last chunk either way
    mask = padding(2, 330)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fast = run(q, k, v, feature_map, mask, 320, causal=True, chunk=chunk)
    score_shape = (2, 2, -(-330 // chunk), chunk, chunk)
    assert (score_shape in saved) == (chunk <= 128), saved
    with native.portable():
        slow = run(q, k, v, feature_map, mask, 320, causal=True, chunk=chunk)
    for got, expected in zip(fast[:-1], slow[:-1]):
        scale = expected.abs().max()
        torch.testing.assert_close(got / scale, expected / scale, atol=1e-12, rtol=0)


def test_the_causal_kernel_rejects_saved_scores_of_the_wrong_shape():
    """The op checks its scores buffer: empty (recompute) or (B, H, ceil(N / C), C, C)."""
    torch.manual_seed(0)
    feature_map = PositiveRandomFeatures(8, 24, orthogonal=True)
    q, k, v = inputs(torch.float32, batch=1, n=10)
    kernel_attention(q, k, v, feature_map, causal=True, chunk_size=4)  # builds the kernels
    B, H, n, d = q.shape
    m, C = 24, 4
    f32 = dict(dtype=torch.float32)
    args = [q.detach(), k.detach(), v.detach(), None, torch.zeros(B, H, d + 1, m), torch.full((B, H), float("-inf")),
            feature_map.scaled_omega(torch.float32), 1e-6, C, 8, torch.empty(B, n, H, d).transpose(1, 2),
            torch.empty(B, H, n), torch.empty(B, H, 2, d + 1, m), torch.empty(B, H, 2),
            torch.empty(B, H, d + 1, m), torch.empty(B, H), torch.empty(B, H, n, **f32),
            torch.empty(B, H, n, dtype=torch.int64), torch.empty(B, H, n, **f32),
            torch.empty(B, H, n, dtype=torch.int64), torch.empty(B, H, n, **f32)]
    with pytest.raises(RuntimeError, match=r"saved_scores must be empty or a contiguous \(B, H, ceil\(N / C\), C, C\)"):
        torch.ops.efficient_transformers.favor_causal_forward(*args, torch.empty(B, H, 2, C, C), torch.empty(0), torch.empty(0), False)  # 3 chunks of 4
    torch.ops.efficient_transformers.favor_causal_forward(*args, torch.empty(B, H, 3, C, C), torch.empty(0), torch.empty(0), False)  # the right shape runs
    with pytest.raises(RuntimeError, match=r"saved_keys must be empty or a contiguous \(B, H, ceil\(N / C\) C, m\)"):
        torch.ops.efficient_transformers.favor_causal_forward(*args, torch.empty(B, H, 3, C, C), torch.empty(0),
                                                              torch.empty(B, H, n, m), False)  # N, not 12 rows
    torch.ops.efficient_transformers.favor_causal_forward(*args, torch.empty(B, H, 3, C, C), torch.empty(B, H, 12, m),
                                                          torch.empty(B, H, 12, m), False)


def test_the_bidirectional_kernel_rejects_kept_features_of_the_wrong_shape():
    """The op checks its feature buffers: empty (recompute) or (B, H, N, m), contiguous."""
    torch.manual_seed(0)
    feature_map = PositiveRandomFeatures(8, 24, orthogonal=True)
    q, k, v = inputs(torch.float32, batch=1, n=10)
    kernel_attention(q, k, v, feature_map)  # builds the kernels
    B, H, n, d = q.shape
    m = 24
    args = [q.detach(), k.detach(), v.detach(), None, feature_map.scaled_omega(torch.float32), 1e-6, 8,
            torch.empty(B, n, H, d).transpose(1, 2), torch.empty(B, H, n), torch.empty(B, H, d + 1, m),
            torch.empty(B, H), torch.empty(B, H, n), torch.empty(B, H, n, dtype=torch.int64), torch.empty(B, H, n),
            torch.empty(B, H, n, dtype=torch.int64), torch.empty(B, H, n)]
    with pytest.raises(RuntimeError, match=r"key_features must be empty or a contiguous \(B, H, N, m\)"):
        torch.ops.efficient_transformers.favor_forward(*args, torch.empty(0), torch.empty(B, H, n, m + 1), False)
    with pytest.raises(RuntimeError, match=r"query_features must be empty or a contiguous \(B, H, N, m\)"):
        torch.ops.efficient_transformers.favor_forward(*args, torch.empty(B, H, m, n).transpose(-1, -2),
                                                       torch.empty(0), False)  # not contiguous
    torch.ops.efficient_transformers.favor_forward(*args, torch.empty(B, H, n, m), torch.empty(B, H, n, m), False)


def test_large_inputs_and_tied_row_maxima_stay_finite():
    """Magnitudes whose features overflow float32 unstabilised (outputs agree with the portable path; the
    gradients are ill-conditioned in float32 at this scale in both paths, so only finiteness is asked),
    and rows whose projections all tie (q = k = 0: the epsilon term's gradient goes to the first maximal
    feature, a subgradient of the max)."""
    torch.manual_seed(1)
    feature_map = PositiveRandomFeatures(8, 32, orthogonal=True)
    q, k, v = inputs(torch.float32, scale=60.0, seed=2)
    with torch.no_grad():
        q[:, :, :3] = 0.0  # P = 0 for every feature: a 32-way tie
        k[:, :, :3] = 0.0
    fast = run(q, k, v, feature_map, None, 16)
    with native.portable():
        slow = run(q, k, v, feature_map, None, 16)
    assert all(torch.isfinite(t).all() for t in fast)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5 * slow[0].abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_native_causal_state_continuation_and_its_gradient(dtype, tol):
    """Decoding from a carried state (relative to its reference): the native scan equals the portable one,
    including the gradient that flows into the incoming state."""
    feature_map = PositiveRandomFeatures(8, 24, orthogonal=True).to(dtype)
    q, k, v = inputs(dtype, n=30)
    with torch.no_grad():
        _, state = kernel_attention(*(t[:, :, :11] for t in (q, k, v)), feature_map, causal=True, chunk_size=4)
    results = []
    for portable in (False, True):
        start = type(state)(state.kv.clone().requires_grad_(), state.ref.clone(), state.length)
        with native.portable() if portable else torch.enable_grad():
            results.append(run(*(t[:, :, 11:] for t in (q, k, v)), feature_map, None, 8, True, 4, start))
    for got, expected in zip(*results):
        scale = expected.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(got / scale, expected / scale, atol=tol, rtol=0)


def test_threads_do_not_change_the_result_beyond_rounding():
    feature_map = PositiveRandomFeatures(8, 40, orthogonal=True).double()
    q, k, v = inputs(torch.float64, n=300)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, v, feature_map, padding(3, 300), 64)
        torch.set_num_threads(2)
        two = run(q, k, v, feature_map, padding(3, 300), 64)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_the_performer_layer_runs_native_only_where_it_applies():
    x = torch.randn(2, 40, 32)
    cases = {("positive", False): True, ("positive", True): True, ("hyperbolic", False): False,
             ("hyperbolic", True): False, ("relu", False): False}
    for (features, causal), expected in cases.items():
        layer = et.build_attention("performer", dim=32, heads=2, causal=causal, nb_features=16, features=features)
        seen = OpNames()
        with seen:
            layer(x)
        assert bool(native_ops(seen.names)) == expected, (features, causal)


def test_a_map_that_redefines_its_parts_runs_the_portable_path():
    class Scaled(PositiveRandomFeatures):
        def projection(self, x):
            return 0.5 * super().projection(x)

    feature_map = Scaled(8, 16, orthogonal=True).double()
    assert not feature_map.native_favor and PositiveRandomFeatures(8, 16, orthogonal=True).native_favor
    q, k, v = inputs(torch.float64)
    seen = OpNames()
    with seen:
        out, _ = kernel_attention(q, k, v, feature_map)
    assert not native_ops(seen.names)
    reference = reference_kernel_attention(feature_map(q), feature_map(k), v)  # the redefined map, naively
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=1e-10)


def test_switches_and_a_failed_build_fall_back_to_the_portable_path(monkeypatch):
    layer = et.build_attention("performer", dim=32, heads=2, nb_features=16)
    x = torch.randn(2, 40, 32)
    reference = layer(x)
    monkeypatch.setenv("EFT_NATIVE", "0")
    assert not native.available() and not native.enabled()
    seen = OpNames()
    with seen:
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    assert not native_ops(seen.names)
    monkeypatch.delenv("EFT_NATIVE")
    monkeypatch.setattr(native, "_STATE", {"built": None, "error": None, "directory": None})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
    assert any("could not be built" in str(w.message) and "c++: not found" in str(w.message) for w in caught)
    assert "c++: not found" in native.build_error()
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)


def test_the_ceiling_recorder_and_the_flop_count_see_the_portable_products():
    """Native kernels multiply inside C++: recording runs the portable path, so the ceiling keeps every
    product (2 N m H times d for the two feature projections and their two gradients, times d + 1 for the
    six products with [V, 1], plus the projections) and the FLOP count agrees."""
    work = harness.Workload("performer", 256, "train", dim=32, heads=2, options={"nb_features": 16})
    step = harness.make_step(harness.build_layer(work), work)
    step()
    recorded = products.record_products(step)
    n, m, d, heads, dim = 256, 16, 16, 2, 32
    attention = 2 * n * m * heads * (4 * d + 6 * (d + 1))
    projections = 3 * (2 * n * dim * 4 * dim)  # q, k, v and output projections, forward and backward
    assert recorded.flops == attention + projections
    assert harness.count_flops(step) == recorded.flops + recorded.recomputed_flops


def test_a_lock_file_left_by_a_killed_build_does_not_hang_the_next_one():
    """PyTorch's builder waits forever on a lock file whose builder was killed; `native` builds under a
    lock of its own and removes such a file (in a fresh process, which loads the built library)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    assert native.available()
    directory = Path(native.build_directory())
    (directory / "lock").write_text("")  # as a build killed by a probe's time limit leaves it
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(directory.parent))
    done = subprocess.run([sys.executable, "-c", "from efficient_transformers import native; "
                           "print(native.available(), native.build_directory())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", str(directory)], done.stderr[-2000:]
    assert not (directory / "lock").exists()
