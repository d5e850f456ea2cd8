"""Seeded randomness that travels with the weights: random features, hash rotations, random blocks.

A `SeededDraws` module holds two int64 buffers, a `seed` (taken from PyTorch's global generator at
construction, so `torch.manual_seed(s)` before building a layer makes it reproducible) and a
`draws` count. Every random quantity a mechanism uses comes from

    generator(*index) = torch.Generator seeded with mix(seed, draws, *index)

where `index` names *what* is drawn (a query-block number, a hash round, a head), never the length
of the current call. So a mechanism that draws, say, BigBird's random key blocks for query block i
from `generator(i)` gets the same blocks at every sequence length and in every decoding step, and
decoding equals the full forward. `redraw()` moves to the next draw (Performer's periodic feature
redraw); both buffers are in the `state_dict`, so a saved layer reloads with the same draws.

`mix` is SplitMix64 over the words (seed, draws, index...): distinct indices give unrelated
streams, and the result fits a non-negative int63 seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*words: int) -> int:
    """One non-negative 63-bit seed from integer words (order matters)."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (int(w) & _MASK64))
    return h >> 1


class SeededDraws(nn.Module):
    """The seed and draw count of a mechanism's randomness, as buffers (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        seed = int(torch.randint(0, 2**62, (1,)))  # from the global RNG: torch.manual_seed controls it
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draws", torch.tensor(0, dtype=torch.int64))

    def generator(self, *index: int) -> torch.Generator:
        """A CPU generator for the current draw and `index` (what is drawn: a block, a round, a head)."""
        return torch.Generator().manual_seed(mix_seed(int(self.seed), int(self.draws), *index))

    def randperm(self, n: int, *index: int, device=None) -> Tensor:
        """A random permutation of range(n) (long) for the current draw and `index`."""
        return torch.randperm(n, generator=self.generator(*index)).to(device)

    @torch.no_grad()
    def redraw(self) -> None:
        """Move to the next draw: every `generator(...)` now gives a new stream."""
        self.draws += 1

    def extra_repr(self) -> str:
        return f"draws={int(self.draws)}"
