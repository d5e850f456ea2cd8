"""Absolute positional encodings: sinusoidal (Vaswani et al. 2017), learned, or none."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

POSITIONAL_KINDS = ("sinusoidal", "learned", "none")


class SinusoidalPositions(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(...); no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, n: int, offset: int = 0, *, device=None, dtype=torch.float32) -> Tensor:
        pos = torch.arange(offset, offset + n, device=self.inv_freq.device, dtype=torch.float32)  # (N,)
        angles = pos[:, None] * self.inv_freq[None, :]  # (N, dim/2)
        pe = torch.zeros(n, self.dim, device=self.inv_freq.device)  # (N, dim)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles[:, : self.dim // 2])
        return pe.to(dtype)


class LearnedPositions(nn.Module):
    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.table = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, n: int, offset: int = 0, *, device=None, dtype=torch.float32) -> Tensor:
        if offset + n > self.max_seq_len:
            raise ValueError(f"learned positions: position {offset + n - 1} is beyond max_seq_len={self.max_seq_len}")
        return self.table.weight[offset : offset + n].to(dtype)  # (N, dim)


def build_positions(kind: str, dim: int, max_seq_len: int) -> nn.Module | None:
    if kind == "sinusoidal":
        return SinusoidalPositions(dim)
    if kind == "learned":
        return LearnedPositions(dim, max_seq_len)
    if kind == "none":
        return None
    raise ValueError(f"unknown positional encoding {kind!r}; allowed: {list(POSITIONAL_KINDS)}")
