"""Head layouts shared by every layer: split, merge, and heads-last storage.

Per-head tensors are (B, H, N, d) in PyTorch's layout. A tensor of that shape may be *stored*
heads-last, i.e. as a (B, N, H, d) buffer seen through a transpose: the layer's head merge of an
output stored that way is a view (no copy), and so is the (B N, H d) operand that the q/k/v
projection's backward pass reads from a gradient stored that way. Fast paths (SDPA, kernel
attention, block-sparse attention) write their outputs and input gradients heads-last (block-sparse: the
key and value gradients of heads-first contiguous keys, its own key table, stay heads-first).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import buffer_pool


def heads_last(like: Tensor, n: int | None = None) -> Tensor:
    """An uninitialised (B, H, n, d) tensor like `like` (n defaults to its length), stored as (B, n, H, d)."""
    B, H, length, d = like.shape
    return buffer_pool.empty((B, length if n is None else n, H, d), like.dtype, like.device).transpose(1, 2)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H d) -> (B, H, N, d), a view."""
    B, N, width = x.shape
    return x.view(B, N, heads, width // heads).transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H d); a view when `out` is stored heads-last."""
    B, H, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, H * d)


def head_groups(x: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """(B, H, N, d) -> its heads [:first] and [first:], views, for layers whose head groups attend
    differently (Routing's local and routing heads). Plain slicing would make autograd build a zero-filled
    full-size gradient per group and add them (three full-size buffers per tensor); here the
    backward pass writes both groups' gradients into one heads-last tensor."""
    return _HeadGroups.apply(x, first)


class _HeadGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, first):
        ctx.first, ctx.shape, ctx.dtype = first, x.shape, x.dtype
        return x[:, :first], x[:, first:]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_first, grad_rest):
        B, H, N, d = ctx.shape
        grad = torch.empty(B, N, H, d, dtype=ctx.dtype,
                           device=(grad_first if grad_first is not None else grad_rest).device).transpose(1, 2)
        for part, grad_part in ((grad[:, :ctx.first], grad_first), (grad[:, ctx.first:], grad_rest)):
            if grad_part is None:
                part.zero_()
            else:
                part.copy_(grad_part)
        return grad, None
