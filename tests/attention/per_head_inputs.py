"""Per-head test inputs shared by the mechanism tests (imported by name: pytest puts this folder on
sys.path): float64 q, k, v that require gradients, and a padding mask with right padding and holes."""

import torch


def qkv(batch: int, n: int, seed: int = 1, *, heads: int = 2, head_dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]


def padding(batch: int, n: int, seed: int = 2) -> torch.Tensor:
    """Item 0 all real, item 1 right-padded by a third, item 2 random holes (its first token real)."""
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, n - n // 3:] = False
    if batch > 2:
        mask[2] = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.3
        mask[2, 0] = True
    return mask
