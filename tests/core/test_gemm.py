"""`core.gemm`: the library's float32 products on PyTorch's BLAS or on oneDNN compute the same products."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from efficient_transformers import build_attention, native
from efficient_transformers.core import gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_usable(torch.float32), reason="oneDNN is not built into this PyTorch")


def test_the_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv("EFT_MATMUL", "mkl")
    with pytest.raises(ValueError, match="EFT_MATMUL='mkl' is not a matrix-multiply backend; allowed: auto, torch, onednn"):
        gemm.prefers_onednn(torch.float32)
    monkeypatch.setenv("EFT_MATMUL", "torch")
    assert not gemm.prefers_onednn(torch.float32)
    monkeypatch.setenv("EFT_MATMUL", "onednn")
    assert gemm.prefers_onednn(torch.float32) == gemm.onednn_usable(torch.float32)
    assert not gemm.prefers_onednn(torch.float64) and not gemm.prefers_onednn(torch.bfloat16)  # float32 only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.prefers_onednn(torch.float32)  # autocast decides the products' dtype


@needs_onednn
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_onednn_matmul_writes_or_adds_the_product_into_strided_outputs(portable, accumulate, batched):
    g = torch.Generator().manual_seed(0)
    lead = (3,) if batched else ()
    a = torch.randn(*lead, 40, 29, generator=g)[..., :37, :]  # rows of a wider buffer
    b = torch.randn(*lead, 23, 37, generator=g).transpose(-1, -2)[..., :29, :]  # transposed, sliced
    wide = torch.randn(*lead, 37, 50, generator=g)
    out = wide[..., 5:28]  # (.., 37, 23) inside a wider buffer
    before = wide.clone()
    with native.portable() if portable else contextlib.nullcontext():
        gemm.onednn_matmul(a, b, out, accumulate)
    expected = (before[..., 5:28] if accumulate else 0) + a.double() @ b.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(wide[..., :5], before[..., :5]) and torch.equal(wide[..., 28:], before[..., 28:])


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_values_and_gradients_are_those_of_f_linear(backend, bias, monkeypatch):
    monkeypatch.setenv("EFT_MATMUL", backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 24, generator=g, requires_grad=True)
    w = torch.randn(20, 24, generator=g, requires_grad=True)
    b = torch.randn(20, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(2, 33, 20, generator=g)
    inputs = [x, w] + ([b] if bias else [])
    got = gemm.linear(x, w, b)
    got_grads = torch.autograd.grad(got, inputs, grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    want = F.linear(x64, w64, b64)
    want_grads = torch.autograd.grad(want, [x64, w64] + ([b64] if bias else []), grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(got_grads, want_grads):
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(gemm.linear(x, w, b), got.detach())  # the no-grad path: the same values


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_a_float32_layer_matches_its_float64_copy_on_either_backend(backend, monkeypatch):
    """Projections (fused q/k/v and output) and their gradients, float32 against float64."""
    monkeypatch.setenv("EFT_MATMUL", backend)
    torch.manual_seed(0)
    layer = build_attention("vanilla", 32, 4)
    layer64 = build_attention("vanilla", 32, 4).double()
    layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 19, 32)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    y32, y64 = layer(x32), layer64(x64)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
    y32.square().sum().backward()
    y64.square().sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for (name, p32), p64 in zip(layer.named_parameters(), layer64.parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_is_a_rule_on_the_cpu_not_a_timing(monkeypatch):
    """Every process of a run (a training run and its resumption) must choose the same products."""
    monkeypatch.delenv("EFT_MATMUL", raising=False)
    expected = (gemm.onednn_usable(torch.float32) and torch.backends.mkl.is_available()
                and torch.backends.cpu.get_cpu_capability() == "AVX512" and gemm.cpu_vendor() not in ("GenuineIntel", ""))
    assert gemm.prefers_onednn(torch.float32) == expected


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_batched_matmul_values_with_transposed_overlapping_and_unmergeable_operands(backend, monkeypatch):
    """out = a @ b over (2, 3, ...) batches: transposed operands, an overlapping strided view (a band of key
    blocks read in place), and leading dimensions that do not merge into one (PyTorch's product then)."""
    monkeypatch.setenv("EFT_MATMUL", backend)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 5, 7, generator=g)
    b = torch.randn(2, 3, 11, 7, generator=g).transpose(-1, -2)  # (2, 3, 7, 11), transposed
    table = torch.randn(40, 7, generator=g)
    band = table.as_strided((2, 3, 11, 7), (6 * 7, 2 * 7, 7, 1))  # overlapping windows of the table's rows
    unmergeable = torch.randn(3, 2, 5, 7, generator=g).transpose(0, 1)  # (2, 3, 5, 7), leading dims swapped
    for left, right in [(a, b), (a, band.transpose(-1, -2)), (unmergeable, b)]:
        out = torch.full((2, 3, 5, 11), float("nan"))
        assert gemm.batched_matmul(left, right, out) is out
        torch.testing.assert_close(out.double(), left.double() @ right.double(), rtol=1e-5, atol=1e-5)
    with native.portable():  # the recorder's view: PyTorch's product, which it counts
        out = torch.empty(2, 3, 5, 11)
        torch.testing.assert_close(gemm.batched_matmul(a, b, out), a @ b)


@needs_onednn
def test_auto_keeps_small_batched_products_on_pytorch_and_takes_large_ones_to_onednn(monkeypatch):
    """A oneDNN call costs about 20 us more than a bmm: "auto" decides by the product's size (a rule on
    the shape), "onednn" takes every batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    if not native.available():
        pytest.skip(f"no native kernels here: {native.build_error()}")
    monkeypatch.setattr(gemm, "mkl_is_throttled", lambda: True)  # "auto" prefers oneDNN, as on the AMD EPYC
    small = torch.randn(2, 16, 16), torch.randn(2, 16, 16), torch.empty(2, 16, 16)  # 16 kFLOP
    large = torch.randn(4, 64, 64), torch.randn(4, 64, 256), torch.empty(4, 64, 256)  # 8.4 MFLOP
    for backend, expected in [("auto", (False, True)), ("onednn", (True, True))]:
        monkeypatch.setenv("EFT_MATMUL", backend)
        for (a, b, out), on_onednn in zip((small, large), expected):
            seen = OpNames()
            with seen:
                gemm.batched_matmul(a, b, out)
            assert ("efficient_transformers.onednn_matmul_out.default" in seen.names) == on_onednn, (backend, a.shape)
            torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("shapes", [((7, 9), (9, 5)), ((2, 3, 7, 9), (9, 5)), ((3, 7, 9), (2, 1, 9, 5)),
                                    ((2, 3, 7, 9), (1, 3, 9, 5))])
def test_product_with_grad_is_matmul_with_broadcasting_values_and_gradients(backend, shapes, monkeypatch):
    """`product_with_grad` against float64 `torch.matmul`: 2-D operands, a 2-D operand against a batch,
    broadcast leading dimensions (whose gradients are summed back), a transposed operand."""
    monkeypatch.setenv("EFT_MATMUL", backend)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(*shapes[0], generator=g, requires_grad=True)
    b_t = torch.randn(*shapes[1][:-2], shapes[1][-1], shapes[1][-2], generator=g, requires_grad=True)
    b = b_t.transpose(-1, -2)  # (..., 9, 5), a transposed view
    got = gemm.product_with_grad(a, b)
    upstream = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad(got, (a, b_t), upstream)
    a64, b64 = a.detach().double().requires_grad_(), b_t.detach().double().requires_grad_()
    want = torch.matmul(a64, b64.transpose(-1, -2))
    want_grads = torch.autograd.grad(want, (a64, b64), upstream.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(grads, want_grads):
        assert g_got.shape == g_want.shape
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(gemm.product_with_grad(a, b), got.detach())  # the no-grad path
