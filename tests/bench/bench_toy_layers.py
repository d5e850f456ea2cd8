"""Toy attention layers for the benchmark's own tests, built through `Workload.factory`
("path/to/this/file.py:function"): the memory probe imports this file by path inside its child
process, so none of these ever enters the global registry.

- `quadratic`: attention through an explicit (B, H, N, N) score matrix, kept for the backward pass:
  peak memory grows ~N^2 (what the probe must catch), unlike vanilla's fused kernel (~N).
- `sleeper`, `allocation_failure`, `broken`, `killed`: one failure each, for the probe's verdicts.
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
from torch import nn


class QuadraticToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, N, N): the quadratic part
        out = scores.softmax(dim=-1) @ v  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


def quadratic(dim: int, heads: int, causal: bool = False) -> nn.Module:
    return QuadraticToyAttention(dim, heads)


class _Failing(nn.Module):
    def __init__(self, dim: int, action) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 16:  # the probe's small warm-up step (N = 16) passes
            self.action()
        return self.proj(x)


def sleeper(dim: int, heads: int, causal: bool = False) -> nn.Module:
    return _Failing(dim, lambda: time.sleep(60))


def _allocation_failure() -> None:
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1099511627776 bytes.")


def allocation_failure(dim: int, heads: int, causal: bool = False) -> nn.Module:
    return _Failing(dim, _allocation_failure)


def _broken() -> None:
    raise ZeroDivisionError("toy failure for the probe test")


def broken(dim: int, heads: int, causal: bool = False) -> nn.Module:
    return _Failing(dim, _broken)


def killed(dim: int, heads: int, causal: bool = False) -> nn.Module:
    return _Failing(dim, lambda: os.kill(os.getpid(), signal.SIGKILL))
