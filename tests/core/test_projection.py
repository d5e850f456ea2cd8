"""The layer's fused q/k/v projection equals nn.Linear followed by the head split, values and gradients."""

import pytest
import torch

from efficient_transformers import build_attention

B, N, DIM, H = 2, 7, 16, 4


def _plain_split(layer, x):
    qkv = torch.nn.functional.linear(x, layer.to_qkv.weight, layer.to_qkv.bias)  # (B, N, 3 dim)
    q, k, v = qkv.view(B, N, 3, H, DIM // H).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
@pytest.mark.parametrize("heads_last", [False, True])
def test_projection_matches_linear_and_split(used, heads_last):
    """Gradients arrive (B, H, N, d)-contiguous (copied once) or heads-last (read in place)."""
    torch.manual_seed(0)
    layer = build_attention("vanilla", DIM, H).double()
    x = torch.randn(B, N, DIM, dtype=torch.float64, requires_grad=True)
    shape = (B, N, H, DIM // H) if heads_last else (B, H, N, DIM // H)
    weights = [torch.randn(shape, dtype=torch.float64).transpose(1, 2) if heads_last else torch.randn(shape, dtype=torch.float64)
               for _ in range(3)]

    def loss(parts):
        return sum((parts[i] * weights[i]).sum() for i in used)

    fused = layer.project_qkv(x)
    plain = _plain_split(layer, x)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    params = [x, layer.to_qkv.weight, layer.to_qkv.bias]
    got = torch.autograd.grad(loss(fused), params)
    want = torch.autograd.grad(loss(plain), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_projection_under_bf16_autocast_gives_float32_grads():
    torch.manual_seed(0)
    layer = build_attention("vanilla", DIM, H)
    x = torch.randn(B, N, DIM, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = layer.project_qkv(x)
        assert q.dtype == torch.bfloat16
        (q.float().square().sum() + v.float().sum()).backward()
    assert x.grad.dtype == torch.float32 and layer.to_qkv.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and layer.to_qkv.weight.grad[DIM:2 * DIM].abs().sum() == 0  # k unused


@pytest.mark.parametrize("use", ["both", "first", "rest"])
def test_head_groups_are_views_with_one_gradient(use):
    """head_groups: the two groups equal the slices, and the gradient equals plain slicing's, also when
    one group is unused (its part of the gradient is zero), stored heads-last."""
    from efficient_transformers.core import head_groups

    x = torch.randn(2, 5, 7, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, H, N, d) heads-last
    first, rest = head_groups(x, 2)
    assert torch.equal(first, x[:, :2]) and torch.equal(rest, x[:, 2:])
    weights = torch.randn(2, 7, 5, 3, dtype=torch.float64)  # (B, H, N, d)

    def loss(a, b):
        terms = {"both": (a * weights[:, :2]).sum() + (b.sin() * weights[:, 2:]).sum(),
                 "first": (a * weights[:, :2]).sum(), "rest": (b.sin() * weights[:, 2:]).sum()}
        return terms[use]

    (grad,) = torch.autograd.grad(loss(first, rest), x)
    (ref,) = torch.autograd.grad(loss(x[:, :2], x[:, 2:]), x)
    torch.testing.assert_close(grad, ref, atol=0, rtol=0)
    assert grad.transpose(1, 2).is_contiguous()  # heads-last: the head merge of the gradient is a view
