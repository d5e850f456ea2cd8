"""Every mechanism's ceiling: its own matrix products, recorded from one step and replayed alone.

The *ceiling* of a layer's step is the measured time of its matrix products alone -- forward and
backward, without what the backward pass recomputes -- run back to back on preallocated buffers at
the same thread count as the step. Every implementation of the same products must do at least
these, so it is a lower bound on the step, and `ceiling time / step time` (the *fraction of the
ceiling reached*, at most about 1) says how close the implementation runs to its own limit: the
rest of its time goes to elementwise work (softmax, exp, masks), copies, allocation and Python.

**Recording** (`record_products`): one call of the step under a `TorchDispatchMode` that sees every
aten op below autograd and keeps, per matrix product, its shape (batch, m, n, k), dtype and phase:

- products: `mm`, `addmm`, `bmm`, `baddbmm`, `addbmm`, `mv`, `addmv` (and their in-place `_` forms), `dot`, `vdot` (and `matmul`,
  should it ever reach the mode undecomposed); `torch.matmul`, `F.linear` and `einsum` arrive
  decomposed into these. The elementwise part of `addmm`/`baddbmm` (the added input) is not a
  product and is not replayed;
- fused attention (`_scaled_dot_product_*attention*`, e.g. PyTorch's CPU flash kernel) is expanded
  into the products its kernel does, tile by tile in the CPU kernel's tiles (queries in blocks of
  32/64/256 by length, keys in blocks of 512): forward Q K^T and P V per tile; backward dV = P^T dO,
  dP = dO V^T, dQ = dS K, dK = dS^T Q (its recomputation of Q K^T is dropped, see below). Causal
  calls keep only the tiles with a key at or before the block's last query (full diagonal tiles, as
  the kernel computes them). An explicit `attn_mask` is dense work: every tile is kept.

**What the backward pass recomputes** is identified by data flow, not by name: the step's output
gradient (the root, `step.grad_output`) is *tainted*, and so is every tensor an op computes from a
tainted input (tracked per storage, so views and in-place writes carry it; a fresh output takes its
inputs' taint, overwriting a stale entry at a reused address). A product run during the backward
pass (autograd's graph task is active) none of whose operands is tainted depends on forward
quantities only: it redoes forward work (activation checkpointing, a custom Function recomputing
its features or block scores) and is not part of the ceiling. A forward product is always kept.

**Native kernels** (`efficient_transformers.native`, e.g. the Performer's bidirectional FAVOR+) do their
products inside C++, where this mode cannot see them, and their elementwise work too, where taint
could not follow: while recording, the step runs the portable Python path (`native.portable()`), which
does the same products (one head at a time in C++, all heads per product in Python: the same FLOPs).
The FLOP counter (`harness.count_flops`) does the same.

**Replay** (`replay`): every kept product runs as `torch.mm`/`bmm`/`addbmm(out=...)` on contiguous
row-major buffers of its shape (values irrelevant: only the time counts), allocated once and shared
by products of the same shape and role (a segment loop's products reuse their buffers, as its
temporaries do; memory stays bounded). Tiles of fused attention run on one tile buffer, repeated.
Where oneDNN's matmul is faster for a shape than PyTorch's product (on AMD CPUs MKL runs its AVX2
kernels, about half the rate: `gemm`), that shape runs on oneDNN instead (chosen by timing both once
per shape): a lower bound on any implementation's step has to use the faster one. oneDNN's matmul
(`mkldnn::_linear_pointwise`) is recorded as a product too, should a layer call it.

**FLOPs** (`Products.flops`): 2 m n k per product (times the batch), the kept products only.
Divided by the machine's measured matrix-multiply rate it gives a second, computed bound beside the
measured ceiling.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import native
from ..core import gemm

aten = torch.ops.aten
# op packet -> how to read (batch, m, n, k) from its tensor arguments
_MM = {aten.mm, aten.addmm, aten.addmm_}
_BMM = {aten.bmm, aten.baddbmm, aten.baddbmm_}
_VECTOR = {aten.mv, aten.addmv, aten.addmv_, aten.dot, aten.vdot}
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
KV_TILE = 512  # the CPU flash-attention kernel's key block


@dataclass(frozen=True)
class Product:
    """One matrix product of a step: `batch` independent (m, k) @ (k, n) products, `repeat` times.

    kind: "mm", "bmm" or "addbmm" (a sum over the batch into one (m, n) result), how it is replayed.
    op: the aten op it came from (fused attention: "sdpa:<which product>").
    phase: "forward" or "backward"; recomputed: a backward product of forward quantities only.
    """

    kind: str
    batch: int
    m: int
    n: int
    k: int
    dtype: torch.dtype
    op: str
    phase: str
    recomputed: bool = False
    repeat: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k * self.repeat


@dataclass
class Products:
    """The products recorded from one step; `kept` are those of the ceiling."""

    all: list[Product] = field(default_factory=list)

    @property
    def kept(self) -> list[Product]:
        return [p for p in self.all if not p.recomputed]

    @property
    def flops(self) -> int:
        """2 m n k summed over the kept products: the ceiling's FLOPs."""
        return sum(p.flops for p in self.kept)

    @property
    def recomputed_flops(self) -> int:
        return sum(p.flops for p in self.all if p.recomputed)

    def summary(self) -> dict[str, Any]:
        """For bench.json: counts and FLOPs by phase, and what was dropped."""
        kept = self.kept
        return {
            "products": sum(p.repeat for p in kept),
            "flops": self.flops,
            "forward_flops": sum(p.flops for p in kept if p.phase == "forward"),
            "backward_flops": sum(p.flops for p in kept if p.phase == "backward"),
            "recomputed_products": sum(p.repeat for p in self.all if p.recomputed),
            "recomputed_flops": self.recomputed_flops,
        }


# ---------------------------------------------------------------------------------------- recording
def _storage_key(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, meta, tensor subclasses without storage
        return None
    return ptr or None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _product_shape(packet, tensors: list[torch.Tensor]) -> tuple[str, int, int, int, int] | None:
    """(kind, batch, m, n, k) of a product op from its tensor operands (the added input first for
    add* ops, as their schemas order them)."""
    if packet in _MM:
        a, b = tensors[-2], tensors[-1]
        return "mm", 1, a.shape[0], b.shape[1], a.shape[1]
    if packet in _BMM:
        a, b = tensors[-2], tensors[-1]
        return "bmm", a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    if packet in (aten.addbmm, aten.addbmm_):
        a, b = tensors[-2], tensors[-1]
        return "addbmm", a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    if packet in _VECTOR:
        a, b = tensors[-2], tensors[-1]
        m = a.shape[0] if a.dim() == 2 else 1
        return "mm", 1, m, 1, a.shape[-1]
    if packet is _ONEDNN_LINEAR:  # input (..., k), weight (n, k)
        a, weight = tensors[0], tensors[1]
        return "mm", 1, a.numel() // a.shape[-1], weight.shape[0], a.shape[-1]
    if packet is aten.matmul:  # only if it reaches the mode undecomposed
        a, b = tensors[0], tensors[1]
        a2 = a if a.dim() > 1 else a[None]
        b2 = b if b.dim() > 1 else b[:, None]
        batch_shape = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        return "bmm", math.prod(batch_shape), a2.shape[-2], b2.shape[-1], a2.shape[-1]
    return None


def _flash_tiles(q_len: int, kv_len: int, causal: bool) -> Counter:
    """(query rows, key columns) -> number of tiles the CPU flash kernel computes for one head."""
    q_tile = 256 if q_len >= 768 else (64 if q_len >= 192 else 32)
    tiles: Counter = Counter()
    for q0 in range(0, q_len, q_tile):
        rows = min(q_tile, q_len - q0)
        keys = min(kv_len, q0 + rows) if causal else kv_len  # keys j <= the block's last query
        for k0 in range(0, keys, KV_TILE):
            tiles[rows, min(KV_TILE, keys - k0)] += 1
    return tiles


def _attention_products(name: str, args: dict[str, Any], phase: str) -> list[Product]:
    """The products inside one fused-attention call (see the module doc), per tile shape."""
    q, k, v = args["query"], args["key"], args["value"]
    causal = bool(args.get("is_causal", False)) and args.get("attn_mask") is None
    heads = math.prod(q.shape[:-2])  # (B, H, L, E): batch and heads together
    d, dv = q.shape[-1], v.shape[-1]
    backward = "backward" in name
    products = []
    for (rows, cols), count in _flash_tiles(q.shape[-2], k.shape[-2], causal).items():
        def tile(label: str, m: int, n: int, kk: int, recomputed: bool = False) -> Product:
            return Product("bmm", heads, m, n, kk, q.dtype, f"sdpa:{label}", phase, recomputed, count)

        if not backward:
            products += [tile("scores QK^T", rows, cols, d), tile("PV", rows, dv, cols)]
        else:
            products += [tile("scores QK^T (recomputed)", rows, cols, d, recomputed=True),
                         tile("dV=P^T dO", cols, dv, rows), tile("dP=dO V^T", rows, cols, dv),
                         tile("dQ=dS K", rows, d, cols), tile("dK=dS^T Q", cols, d, rows)]
    return products


def _named_arguments(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    names = [a.name for a in func._schema.arguments]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


class ProductRecorder(TorchDispatchMode):
    """Records the matrix products of the ops run under it (see the module doc).

    `roots`: tensors that carry the step's output gradient (their storages start tainted)."""

    def __init__(self, roots: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.products = Products()
        self.tainted: dict[int, bool] = {}
        for t in roots:
            key = _storage_key(t)
            if key is not None:
                self.tainted[key] = True

    def __enter__(self):
        # native kernels (`efficient_transformers.native`) do their products inside C++, out of this mode's
        # sight: the step runs the portable path, which does the same products, while recorded
        self._portable = native.portable()
        self._portable.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._portable.__exit__(None, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = [t for t in flat_in if isinstance(t, torch.Tensor)]
        out_args = {id(v) for name, v in kwargs.items() if name.startswith("out") and isinstance(v, torch.Tensor)}
        read = [t for t in inputs if id(t) not in out_args]  # an out= buffer's old contents are not read
        input_keys = {_storage_key(t) for t in inputs}
        taint = any(self.tainted.get(_storage_key(t), False) for t in read)
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is None:
                    continue
                if key in input_keys:  # a view or an in-place/out= write: the storage keeps its taint too
                    self.tainted[key] = self.tainted.get(key, False) or taint
                else:  # a fresh result (possibly at an address freed earlier)
                    self.tainted[key] = taint
        self._record(func, args, kwargs, inputs, read, taint)
        return out

    def _record(self, func, args, kwargs, inputs, read, taint) -> None:
        packet = func.overloadpacket
        backward = _in_backward()
        phase = "backward" if backward else "forward"
        name = packet.__name__
        if "scaled_dot_product" in name and "attention" in name and "math" not in name:
            named = _named_arguments(func, args, kwargs)
            if all(isinstance(named.get(a), torch.Tensor) for a in ("query", "key", "value")):
                self.products.all.extend(_attention_products(name, named, phase))
            return
        operands = [t for t in read if t.dim() >= 1]
        shape = _product_shape(packet, operands) if operands else None
        if shape is None:
            return
        kind, batch, m, n, k = shape
        recomputed = backward and not taint
        dtype = operands[-1].dtype
        self.products.all.append(Product(kind, int(batch), int(m), int(n), int(k), dtype, name, phase, recomputed))


def record_products(step: Callable[[], None], roots: Iterable[torch.Tensor] | None = None) -> Products:
    """The products of one call of `step` (it runs once). `roots` default to `step.grad_output`,
    the output gradient of a train step (`harness.make_step` sets it); a forward step has none."""
    if roots is None:
        root = getattr(step, "grad_output", None)
        roots = [] if root is None else [root]
    recorder = ProductRecorder(roots)
    with recorder:
        step()
    return recorder.products


# ---------------------------------------------------------------------------------------- replay
def _product_calls(p: Product, buffer: Callable[..., torch.Tensor], device: str) -> dict[str, Callable[[], object]]:
    """One call of product `p` per backend usable for it (`gemm`): "torch" always, "oneDNN" where it runs."""
    if p.kind == "mm":
        a, b, c = buffer("a", (p.m, p.k), p.dtype), buffer("b", (p.k, p.n), p.dtype), buffer("c", (p.m, p.n), p.dtype)
        calls = {"torch": lambda: torch.mm(a, b, out=c)}
    elif p.kind == "bmm":
        a, b = buffer("a", (p.batch, p.m, p.k), p.dtype), buffer("b", (p.batch, p.k, p.n), p.dtype)
        c = buffer("c", (p.batch, p.m, p.n), p.dtype)
        calls = {"torch": lambda: torch.bmm(a, b, out=c)}
    else:  # addbmm: sum over the batch
        a, b = buffer("a", (p.batch, p.m, p.k), p.dtype), buffer("b", (p.batch, p.k, p.n), p.dtype)
        c = buffer("c", (p.m, p.n), p.dtype)
        calls = {"torch": lambda: torch.addbmm(c, a, b, beta=0.0, out=c)}
    if gemm.onednn_usable(p.dtype, device) and p.dtype == torch.float32:
        if p.kind in ("mm", "bmm"):
            calls["oneDNN"] = lambda: gemm.onednn_matmul(a, b, c)
        else:  # sum_i a_i b_i = [a_1 ... a_B] [b_1; ...; b_B]: one product with B k columns
            wide, tall = buffer("a_wide", (p.m, p.batch * p.k), p.dtype), buffer("b_tall", (p.batch * p.k, p.n), p.dtype)
            calls["oneDNN"] = lambda: gemm.onednn_matmul(wide, tall, c)
    return calls


def replay(products: Products | Iterable[Product], device: str = "cpu", backend: str | None = None) -> Callable[[], None]:
    """A zero-argument callable that runs the kept products alone, on buffers allocated here once, each on
    the faster backend for its shape (`gemm.fastest`: PyTorch's product or oneDNN's), or on `backend`
    ("torch" or "oneDNN") wherever that one can run the product."""
    if backend not in (None, "torch", "oneDNN"):
        raise ValueError(f"replay: backend must be None (the faster per shape), 'torch' or 'oneDNN', got {backend!r}")
    kept = products.kept if isinstance(products, Products) else [p for p in products if not p.recomputed]
    buffers: dict[tuple, torch.Tensor] = {}

    def buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (role, shape, dtype)
        if key not in buffers:
            buffers[key] = torch.randn(shape, device=device).to(dtype)  # values do not matter
        return buffers[key]

    def trial_buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, device=device).to(dtype)  # freed once the backend is chosen

    calls: list[tuple[Callable[[], object], int]] = []
    for p in kept:
        options = _product_calls(p, buffer, device)
        if backend is None:
            key = ("replay", p.kind, p.batch, p.m, p.n, p.k, p.dtype, device)
            choice = gemm.fastest(key, lambda: _product_calls(p, trial_buffer, device))
        else:
            choice = backend if backend in options else "torch"
        calls.append((options[choice], p.repeat))

    def run() -> None:
        for call, repeat in calls:
            for _ in range(repeat):
                call()

    return run


class CeilingStep:
    """The replay of a step's products, built lazily from what `record` saw on the step's first call.

    `record(step)` runs the step once under the recorder (nested around `inner`, e.g. a FLOP counter,
    so one warm-up call serves both); calling the object replays the kept products. It raises when
    nothing was recorded (the step's first call failed), which the timing loop records as a failure."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.products: Products | None = None
        self._run: Callable[[], None] | None = None

    def record(self, step: Callable[[], None], inner: Callable[[Callable[[], None]], Any] | None = None) -> Any:
        root = getattr(step, "grad_output", None)
        recorder = ProductRecorder([] if root is None else [root])
        with recorder:
            result = inner(step) if inner else step()
        self.products = recorder.products
        return result

    def __call__(self) -> None:
        if self._run is None:
            if self.products is None:
                raise RuntimeError("ceiling: no products were recorded (the step's first call failed)")
            self._run = replay(self.products, self.device)
        self._run()

    def release(self) -> None:
        self._run = None  # frees the replay buffers
