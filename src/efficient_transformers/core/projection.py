"""The fused input projection of an attention layer: x -> S per-head tensors in one product.

    [q | k | v] = split_heads(x W^T + b),    W: (S dim, dim), S slots (3 for q, k, v; 2 for shared-QK
                                              attention's qk and v; 1 for a value projection alone)

`project_heads(x, weight, bias, heads)` returns S views (B, H, N, d) of one (B, N, S, H, d)
product. Its backward pass is a custom `torch.autograd.Function` of S per-slot products that read
each head-split gradient where it lies. Autograd's own graph for view / permute / unbind stacks the
S gradients into one (B, N, S, dim) buffer before the two weight products: two passes over S N dim
numbers and a fresh buffer, which at long N cost a tenth of a linear-time layer's step. Here a
gradient stored heads-last ((B, N, H, d) memory, as SDPA, kernel and block-sparse attention write
them; see `core.heads`) is already the (B N, dim) operand of its slot's products and is not copied
at all; another layout is copied once. Values and gradients are those of `nn.Linear` followed by
the head split (tested); double backward is not supported. Under autocast the backward products
run in the weight's dtype (float32). The products run on `core.gemm`'s preferred backend (oneDNN
where PyTorch's MKL is clearly slower, as on AMD CPUs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import gemm


def project_heads(x: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> tuple[Tensor, ...]:
    """x (B, N, dim), weight (S dim, dim), bias (S dim,) or None -> S tensors (B, H, N, dim / H)."""
    return _FusedHeadProjection.apply(x, weight, bias, heads)


class _FusedHeadProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, heads: int):
        B, N, dim = x.shape
        slots = weight.shape[0] // dim
        fused = gemm.product(x, weight, bias).view(B, N, slots, heads, dim // heads)  # (B, N, S, H, d)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return tuple(fused.permute(2, 0, 3, 1, 4).unbind(0))  # S x (B, H, N, d), views

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, _ = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # the products in the weight's dtype, with out=
            return _FusedHeadProjection._backward(ctx, grads)

    @staticmethod
    def _backward(ctx, grads):
        x, weight = ctx.saved_tensors
        B, N, dim = x.shape
        rows = x.reshape(B * N, dim).to(weight.dtype)  # (B N, dim)
        grad_x = None
        grad_weight = weight.new_zeros(weight.shape) if ctx.needs_input_grad[1] else None  # (S dim, dim)
        needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
        grad_bias = weight.new_zeros(weight.shape[0]) if needs_bias else None
        for slot, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(weight.dtype).transpose(1, 2).reshape(B * N, dim)  # (B N, H d): a view when heads-last
            w = weight[slot * dim:(slot + 1) * dim]  # (dim, dim): this slot's rows
            if ctx.needs_input_grad[0]:  # accumulated with out= rather than addmm_, which FlopCounterMode misses
                grad_x = gemm.matmul(g, w) if grad_x is None else gemm.matmul(g, w, out=grad_x, accumulate=True)  # (B N, dim)
            if grad_weight is not None:
                gemm.matmul(g.t(), rows, out=grad_weight[slot * dim:(slot + 1) * dim])
            if grad_bias is not None:
                torch.sum(g, 0, out=grad_bias[slot * dim:(slot + 1) * dim])
        if grad_x is not None:
            grad_x = grad_x.view(B, N, dim).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
        return grad_x, grad_weight, None if grad_bias is None else grad_bias.to(ctx.bias_dtype), None
