"""Large per-step CPU buffers kept between steps, so that a step does not pay the first touch of fresh memory.

On Linux, glibc serves every allocation above its mmap threshold (at most 32 MiB, and smaller ones
once the heap is trimmed) with fresh pages from the kernel, and each page's first write is a page
fault that also zeroes it: about 0.5 ms per MiB on the AMD machine, 1.4 on the Intel one (README,
"fresh memory"). A linear-time layer's 16K train step allocates about 200 MiB of such buffers (the
fused q/k/v product, the attention output, its input gradients, ...) and frees them again, so about
a fifth of Performer's causal step went to page faults (measured on the AMD EPYC: 65 % of its
ceiling with fresh buffers, 80 % with glibc told to keep freed memory).

`empty(shape, dtype, device)` returns an uninitialised tensor, as `torch.empty` does. On CPU, for
tensors of at least `MIN_BYTES`, its memory is a storage this pool keeps: a storage is handed out
again only when nothing else references it any more (its use count: no tensor, view, saved tensor of
an autograd graph or `.grad` still holds it), to a request of the same byte size (any dtype or shape).
So a pooled buffer behaves exactly as a fresh one, and is never shared between two live tensors.

**Memory.** The pool keeps at most `EFT_BUFFER_POOL_MIB` MiB (default 1024; 0 turns it off) of
storages between steps, evicting the least recently used free ones first; requests beyond that get
ordinary memory. A step's peak is unchanged up to buffers of one size not being reused by a request
of another within the step (measured with the benchmark's memory probe: README). `clear()` returns
the kept memory; `retained_bytes()` says how much that is. CUDA has its own caching allocator and
other devices are not pooled.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Sequence

import torch
from torch import Tensor

POOL_ENV = "EFT_BUFFER_POOL_MIB"
DEFAULT_LIMIT_MIB = 1024
MIN_BYTES = 1 << 20  # smaller allocations come from the heap's reused memory anyway

_lock = threading.Lock()
_kept: "collections.OrderedDict[int, torch.UntypedStorage]" = collections.OrderedDict()  # id -> storage, LRU first
_retained = 0


def limit_bytes() -> int:
    """`EFT_BUFFER_POOL_MIB` in bytes (the default when unset), checked."""
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT_MIB << 20
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # also NaN
        raise ValueError(f"{POOL_ENV}={raw!r}: expected a number of MiB >= 0 (0 turns the buffer pool off)")
    return int(mib * (1 << 20))


def _in_use(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) > 1  # the pool's own reference is 1


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _pooled(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, limit: int) -> Tensor | None:
    """A tensor on a free kept storage of `nbytes` (the most recently used), on a new kept one, or None
    (the limit is reached). Under the lock, so that no two threads are handed the same storage."""
    global _retained
    with _lock:
        chosen = None
        for key in reversed(_kept):
            storage = _kept[key]
            if storage.nbytes() == nbytes and not _in_use(storage):
                _kept.move_to_end(key)
                chosen = storage
                break
        if chosen is None:
            for key in list(_kept):  # make room: evict free storages, least recently used first
                if _retained + nbytes <= limit:
                    break
                storage = _kept[key]
                if not _in_use(storage):
                    del _kept[key]
                    _retained -= storage.nbytes()
            if _retained + nbytes > limit:
                return None
            chosen = torch.UntypedStorage(nbytes)
            _kept[id(chosen)] = chosen
            _retained += nbytes
        return torch.empty(0, dtype=dtype).set_(chosen, 0, shape, _contiguous_strides(shape))


def empty(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu") -> Tensor:
    """An uninitialised contiguous tensor, its memory from the pool when it is a large CPU one (see the module doc)."""
    device = torch.device(device)
    shape = tuple(int(size) for size in shape)
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or _fills_uninitialised_memory():
        return torch.empty(shape, dtype=dtype, device=device)
    limit = limit_bytes()
    tensor = _pooled(shape, dtype, nbytes, limit) if limit > 0 else None
    return torch.empty(shape, dtype=dtype, device=device) if tensor is None else tensor


def _fills_uninitialised_memory() -> bool:
    """PyTorch's deterministic mode fills `torch.empty` with NaN (or the dtype's max): keep that contract."""
    return torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory


def empty_like(like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """`empty(shape or like.shape)` in `like`'s dtype and device."""
    return empty(like.shape if shape is None else shape, like.dtype, like.device)


def retained_bytes() -> int:
    """Bytes of storage the pool keeps (in use or free)."""
    return _retained


def clear() -> None:
    """Forget every kept storage (those still in use stay alive with their tensors)."""
    global _retained
    with _lock:
        _kept.clear()
        _retained = 0
