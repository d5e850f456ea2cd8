"""Decoding state carried by causal mechanisms between generation steps.

- `KVCache`: dense and pattern mechanisms keep the keys and values that can still be attended
  (all of them for vanilla; only the last `window` for local patterns).
- `PositionedKVCache`: pattern mechanisms whose attendable keys are not a contiguous suffix (strided,
  summary, global keys) keep each cached key's absolute position and drop what no future query can
  reach (`keep`).
- `History`: mechanisms without a cheaper incremental form keep q, k, v of every past token and
  recompute; their card says decoding="recompute".
Kernel and recurrence mechanisms define their own small state classes next to them.

Every state knows `length`, the number of tokens consumed so far (the absolute position of the next one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _cat_mask(old: Tensor | None, new: Tensor | None, old_len: int, new_len: int, batch: int, device) -> Tensor | None:
    if old is None and new is None:
        return None
    if old is None:
        old = torch.ones(batch, old_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(batch, new_len, dtype=torch.bool, device=device)
    return torch.cat([old, new], dim=1)  # (B, old_len + new_len)


@dataclass
class KVCache:
    k: Tensor  # (B, H, n, d)
    v: Tensor  # (B, H, n, d)
    key_mask: Tensor | None  # (B, n) or None when nothing is padded
    length: int  # tokens consumed so far (>= n when the cache is windowed)

    @staticmethod
    def extend(state: "KVCache | None", k: Tensor, v: Tensor, key_mask: Tensor | None) -> "KVCache":
        """The cache after appending k, v (B, H, n_new, d); the full key set to attend is its k, v."""
        if state is None:
            return KVCache(k, v, key_mask, k.shape[-2])
        mask = _cat_mask(state.key_mask, key_mask, state.k.shape[-2], k.shape[-2], k.shape[0], k.device)
        return KVCache(
            torch.cat([state.k, k], dim=-2), torch.cat([state.v, v], dim=-2), mask, state.length + k.shape[-2]
        )

    def last(self, window: int) -> "KVCache":
        """Keep only the last `window` keys (those that future queries can still reach)."""
        if self.k.shape[-2] <= window:
            return self
        mask = None if self.key_mask is None else self.key_mask[:, -window:]
        return KVCache(self.k[..., -window:, :], self.v[..., -window:, :], mask, self.length)


@dataclass
class History:
    q: Tensor  # (B, H, n, d)
    k: Tensor
    v: Tensor
    key_mask: Tensor | None  # (B, n)
    length: int

    @staticmethod
    def extend(state: "History | None", q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> "History":
        if state is None:
            return History(q, k, v, key_mask, q.shape[-2])
        mask = _cat_mask(state.key_mask, key_mask, state.length, q.shape[-2], q.shape[0], q.device)
        cat = lambda a, b: torch.cat([a, b], dim=-2)  # noqa: E731
        return History(cat(state.q, q), cat(state.k, k), cat(state.v, v), mask, state.length + q.shape[-2])


@dataclass
class PositionedKVCache:
    """Cached keys and values with their absolute positions, for patterns that keep scattered keys."""

    k: Tensor  # (B, H, m, d)
    v: Tensor  # (B, H, m, d)
    key_mask: Tensor | None  # (B, m) or None when nothing is padded
    positions: Tensor  # (m,) long: absolute position of each cached key
    length: int  # tokens consumed so far

    @staticmethod
    def extend(state: "PositionedKVCache | None", k: Tensor, v: Tensor, key_mask: Tensor | None) -> "PositionedKVCache":
        """The cache after appending k, v (B, H, n_new, d) at positions length .. length + n_new - 1."""
        start = 0 if state is None else state.length
        n = k.shape[-2]
        new_positions = torch.arange(start, start + n, device=k.device)
        if state is None:
            return PositionedKVCache(k, v, key_mask, new_positions, n)
        mask = _cat_mask(state.key_mask, key_mask, state.k.shape[-2], n, k.shape[0], k.device)
        return PositionedKVCache(
            torch.cat([state.k, k], dim=-2), torch.cat([state.v, v], dim=-2), mask,
            torch.cat([state.positions, new_positions]), state.length + n,
        )

    def keep(self, keep: Tensor) -> "PositionedKVCache":
        """Only the cached keys where `keep` (m,) bool is True (those a future query can still attend)."""
        if bool(keep.all()):
            return self
        index = keep.nonzero().squeeze(-1)  # (m',)
        mask = None if self.key_mask is None else self.key_mask[:, index]
        return PositionedKVCache(self.k[..., index, :], self.v[..., index, :], mask, self.positions[index], self.length)
