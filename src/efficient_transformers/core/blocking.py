"""Padding and blocking primitives shared by blocked, chunked and bucketed mechanisms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to_multiple(x: Tensor, multiple: int, *, dim: int = -2, value: float = 0.0) -> tuple[Tensor, int]:
    """Pad `x` along `dim` (default the sequence axis of (..., N, d)) up to a multiple; returns (x, pad)."""
    n = x.shape[dim]
    pad = round_up(n, multiple) - n
    if pad == 0:
        return x, 0
    dim = dim % x.dim()
    widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, widths, value=value), pad


def pad_mask_to_multiple(mask: Tensor | None, n: int, multiple: int, batch: int, device) -> Tensor:
    """A (B, N_padded) key mask: the given mask (or all True) followed by False for the padding."""
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    padded, _ = pad_to_multiple(mask, multiple, dim=1, value=False)
    return padded


def split_blocks(x: Tensor, block: int) -> Tensor:
    """(..., N, d) with N a multiple of `block` -> (..., N // block, block, d)."""
    *lead, n, d = x.shape
    return x.reshape(*lead, n // block, block, d)


def merge_blocks(x: Tensor) -> Tensor:
    """(..., nb, block, d) -> (..., nb * block, d)."""
    *lead, nb, block, d = x.shape
    return x.reshape(*lead, nb * block, d)
