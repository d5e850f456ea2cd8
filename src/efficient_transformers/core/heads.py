"""Head layouts shared by every layer: split, merge, and heads-last storage.

Per-head tensors are (B, H, N, d) in PyTorch's layout. A tensor of that shape may be *stored*
heads-last, i.e. as a (B, N, H, d) buffer seen through a transpose: the layer's head merge of an
output stored that way is a view (no copy), and so is the (B N, H d) operand that the q/k/v
projection's backward pass reads from a gradient stored that way. Fast paths (SDPA, kernel
attention, block-sparse attention) write their outputs and input gradients heads-last (block-sparse: the
key and value gradients of heads-first contiguous keys, its own key table, stay heads-first).
"""

from __future__ import annotations

from torch import Tensor


def heads_last(like: Tensor, n: int | None = None) -> Tensor:
    """An uninitialised (B, H, n, d) tensor like `like` (n defaults to its length), stored as (B, n, H, d)."""
    B, H, length, d = like.shape
    return like.new_empty(B, length if n is None else n, H, d).transpose(1, 2)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H d) -> (B, H, N, d), a view."""
    B, N, width = x.shape
    return x.view(B, N, heads, width // heads).transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H d); a view when `out` is stored heads-last."""
    B, H, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, H * d)
