"""The attention layer every mechanism derives from: one template, hooks where mechanisms differ.

Two layers, so each mechanism file reads like its paper's algorithm box:

- the **core**, `attend(q, k, v, mask=None, state=None, *, global_mask=None) -> (out, state)` on
  per-head tensors (B, H, N, d); a mechanism implements `_attend(q, k, v, mask, state, **extra)`,
  called after the base class has validated shapes, dtypes, masks and state;
- the **layer**, `forward(x, mask=None, state=None, *, global_mask=None, return_state=False)`, one
  template for every mechanism:

      mask, extra = check_input(x, mask, state, global_mask)      validation, once for all
      q, k, v, extra = project(x, mask, **extra)                   hook: the input projections
      out, state = _attend(q, k, v, mask, state, **extra)          the mechanism's core
      y = output(out)                                              hook: head merge + W_O

  `project` defaults to the fused projection chosen by the constructor's `projections` argument:
  "qkv" (q, k, v from one (3 dim, dim) product), "shared_qk" (Reformer: one qk and v, q = k), "v"
  (values only, q = k = None: Synthesizer) or "none" (no input projection: Set Transformer's
  inducing points; the mechanism brings its own). A mechanism with projections of its own
  (Linformer's length projections applied to x) overrides `project`; one with extra inputs for its
  core (Longformer's global projections) adds them to `extra`. Nobody copies `forward`.

Extra inputs: `global_mask` (B, N) bool marks global positions (attend to all, attended by all); only
mechanisms whose card has `global_tokens` take it (others raise ValueError), and padded positions
are never global (the base class ANDs it with `mask`). It reaches `_attend` as the keyword
`global_mask` only when given.

Extra outputs: `report_aux_loss(name, value, weight)` (see `core.aux_losses`).

Conventions: `mask` is (B, N) bool with True = real token; `causal` is fixed at construction; a
causal layer returns its decoding state from every call (`forward(..., return_state=True)`), and
given a state it processes the next tokens only. Bad input raises `ValueError` naming the mechanism,
the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import Card
from . import gemm
from . import options as opt
from .aux_losses import ReportsAuxLosses
from .heads import merge_heads, split_heads
from .projection import project_heads
from .dense import dense_attention
from .state import History, PositionedKVCache

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: the constructor's `projections`: name -> number of dim-wide slots of the fused input projection
PROJECTIONS = {"qkv": 3, "shared_qk": 2, "v": 1, "none": 0}


class AttentionLayer(ReportsAuxLosses, nn.Module):
    card: ClassVar[Card]
    #: True when the layer's attention is a function of (q, k, v) alone, i.e. `attend` is meaningful.
    has_attend: ClassVar[bool] = True

    def __init__(self, dim: int, heads: int, causal: bool = False, *, max_seq_len: int | None = None,
                 projections: str = "qkv") -> None:
        super().__init__()
        name = self.card.name
        opt.positive_int(name, "dim", dim)
        opt.positive_int(name, "heads", heads)
        if dim % heads:
            divisors = [h for h in range(1, dim + 1) if dim % h == 0 and h <= 64]
            raise ValueError(f"{name}: heads={heads} does not divide dim={dim}; allowed heads: {divisors}")
        if max_seq_len is not None:
            opt.positive_int(name, "max_seq_len", max_seq_len)
        opt.choice(name, "projections", projections, PROJECTIONS)
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.max_seq_len = max_seq_len
        self.projections = projections
        slots = PROJECTIONS[projections]
        self.to_qkv = nn.Linear(dim, slots * dim) if slots else None
        self.to_out = nn.Linear(dim, dim)
        self._init_aux_losses()

    # ------------------------------------------------------------------ the layer
    def forward(self, x: Tensor, mask: Tensor | None = None, state: Any = None, *,
                global_mask: Tensor | None = None, return_state: bool = False):
        """x: (B, N, dim) -> (B, N, dim); with `return_state`, also the decoding state after x."""
        mask, extra = self.check_input(x, mask, state, global_mask)
        self._start_forward_aux()
        q, k, v, extra = self.project(x, mask, **extra)  # 3 x (B, H, N, d) (None where unused)
        out, new_state = self._attend(q, k, v, mask, state, **extra)  # (B, H, N, d)
        y = self.output(out)  # (B, N, dim)
        return (y, new_state) if return_state else y

    def project(self, x: Tensor, mask: Tensor | None, **extra: Any):
        """Hook: x (B, N, dim) -> (q, k, v, extra), per-head tensors (B, H, N, d) from the fused
        projection (`projections` of the constructor), and the keyword inputs of `_attend`."""
        if self.to_qkv is None:
            return None, None, None, extra
        if isinstance(self.to_qkv, nn.Linear):
            slots = project_heads(x, self.to_qkv.weight, self.to_qkv.bias, self.heads)
        else:  # a wrapped projection (et.quantize's int8 Linear, LoRA): its own product, then the head split
            n = PROJECTIONS[self.projections]
            slots = split_heads(self.to_qkv(x), n * self.heads).chunk(n, dim=1)  # S x (B, H, N, d)
        if self.projections == "qkv":
            q, k, v = slots
        elif self.projections == "shared_qk":
            qk, v = slots
            q = k = qk
        else:
            q, k, (v,) = None, None, slots
        return q, k, v, extra

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, dim) -> q, k, v (B, H, N, d): the default projection alone (tests, references)."""
        q, k, v, _ = AttentionLayer.project(self, x, None)
        return q, k, v

    def output(self, out: Tensor) -> Tensor:
        """Hook: per-head outputs (B, H, N, d) -> (B, N, dim): head merge, then W_O (a plain `nn.Linear` on
        `core.gemm`'s preferred backend; a wrapped or hooked one, e.g. quantized, LoRA or pruned, calls itself)."""
        merged = merge_heads(out)  # (B, N, dim)
        to_out = self.to_out
        if type(to_out) is nn.Linear and not (to_out._forward_hooks or to_out._forward_pre_hooks):
            return gemm.linear(merged, self.to_out.weight, self.to_out.bias)
        return self.to_out(merged)

    @staticmethod
    def merge_heads(out: Tensor) -> Tensor:
        return merge_heads(out)

    # ------------------------------------------------------------------ the core
    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, state: Any = None, *,
               global_mask: Tensor | None = None):
        """The mechanism on per-head tensors (B, H, N, d) without projections -> (out, state)."""
        name = self.card.name
        if not self.has_attend:
            raise ValueError(f"{name}: attention is not a function of (q, k, v); use the layer's forward(x)")
        for label, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: {label} must be a 4-D tensor (B, H, N, d), got {_describe(t)}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}: {label} must be floating point, got {t.dtype}; allowed: {FLOAT_DTYPES}")
        if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"{name}: q, k, v must share (B, H, N) and q, k share d; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] != self.heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name}: per-head tensors must be (B, {self.heads}, N, {self.head_dim}) for this layer, got {tuple(q.shape)}"
            )
        if q.shape[-2] < 1:
            raise ValueError(f"{name}: sequence length must be >= 1, got {q.shape[-2]}")
        mask = self._check_mask(mask, q.shape[0], q.shape[-2], q.device)
        self._check_state(state, q.shape[-2])
        extra = self._check_global_mask(global_mask, mask, q.shape[0], q.shape[-2], q.device)
        self._start_forward_aux()
        return self._attend(q, k, v, mask, state, **extra)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: Any, **extra: Any):
        raise NotImplementedError

    # ------------------------------------------------------------------ decoding fallback
    def _attend_recompute(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: History | None, full):
        """Incremental decoding for mechanisms without a cheaper form: keep the history, recompute.

        `full(q, k, v, mask)` is the mechanism's parallel form on a whole sequence. Returns the outputs
        of the new tokens and the extended history.
        """
        history = History.extend(state, q, k, v, mask)
        if state is None:
            return full(q, k, v, mask), history
        out = full(history.q, history.k, history.v, history.key_mask)  # (B, H, n_total, d)
        return out[..., -q.shape[-2]:, :], history

    def _attend_cached_pattern(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                               state: PositionedKVCache | None, allowed, still_needed, full=None):
        """Causal decoding of a fixed-pattern mechanism with a cache bounded by its pattern.

        allowed(query_positions (n,), key_positions (m,)) -> (H | 1, n, m) bool: the pattern's rule
        (causality included), the element form of the mechanism's layout; still_needed(key_positions
        (m,), next_position) -> (m,) bool: the cached keys some query at >= next_position may attend.
        With state None and `full(q, k, v, mask)` given (the block-sparse parallel form), the whole
        prefix is computed by it and the cache is only filled; otherwise the new queries attend the
        cache densely (it holds only what the pattern can still reach). Returns (out, pruned cache).
        """
        cache = PositionedKVCache.extend(state, k, v, mask)
        n = q.shape[-2]
        if state is None and full is not None:
            out = full(q, k, v, mask)
        else:
            query_positions = torch.arange(cache.length - n, cache.length, device=q.device)
            pattern = allowed(query_positions, cache.positions.to(q.device))  # (H | 1, n, m)
            out = dense_attention(q, cache.k, cache.v, key_mask=cache.key_mask, allowed=pattern[None])
        return out, cache.keep(still_needed(cache.positions, cache.length))

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Tensor, mask: Tensor | None, state: Any = None,
                    global_mask: Tensor | None = None) -> tuple[Tensor | None, dict[str, Any]]:
        """Validate the layer's inputs -> (mask on x's device, the extra keyword inputs of `_attend`)."""
        name = self.card.name
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{name}: x must be a 3-D tensor (B, N, dim={self.dim}), got {_describe(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: x must be floating point, got {x.dtype}; allowed: {FLOAT_DTYPES}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x has last dimension {x.shape[-1]}, this layer was built with dim={self.dim}")
        if x.shape[1] < 1:
            raise ValueError(f"{name}: sequence length must be >= 1, got {x.shape[1]}")
        self._check_state(state, x.shape[1])
        mask = self._check_mask(mask, x.shape[0], x.shape[1], x.device)
        return mask, self._check_global_mask(global_mask, mask, x.shape[0], x.shape[1], x.device)

    def _check_global_mask(self, global_mask: Tensor | None, mask: Tensor | None, batch: int, n: int,
                           device) -> dict[str, Any]:
        if global_mask is None:
            return {}
        name = self.card.name
        if not self.card.global_tokens:
            from ..registry import mechanisms  # late: the registry lists what is registered

            takers = [c.name for c in mechanisms() if c.global_tokens]
            raise ValueError(f"{name}: this mechanism has no global tokens, got a global_mask; allowed: "
                             f"global_mask=None (mechanisms that take one: {takers or 'none registered'})")
        if not isinstance(global_mask, Tensor) or global_mask.dtype != torch.bool:
            got = global_mask.dtype if isinstance(global_mask, Tensor) else _describe(global_mask)
            raise ValueError(f"{name}: global_mask must be a bool tensor (B, N) (True = global), got {got}")
        if tuple(global_mask.shape) != (batch, n):
            raise ValueError(f"{name}: global_mask must have shape (B, N) = ({batch}, {n}), got {tuple(global_mask.shape)}")
        global_mask = global_mask.to(device)
        return {"global_mask": global_mask if mask is None else global_mask & mask}

    def _check_state(self, state: Any, n_new: int) -> None:
        name = self.card.name
        if state is not None and not self.causal:
            raise ValueError(f"{name}: a decoding state was given to a bidirectional layer; allowed: state=None")
        total = n_new + (getattr(state, "length", 0) if state is not None else 0)
        if self.max_seq_len is not None and total > self.max_seq_len:
            raise ValueError(
                f"{name}: sequence length {total} exceeds max_seq_len={self.max_seq_len}; "
                f"allowed: N <= {self.max_seq_len} (build with a larger max_seq_len)"
            )

    def _check_mask(self, mask: Tensor | None, batch: int, n: int, device) -> Tensor | None:
        name = self.card.name
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise ValueError(f"{name}: mask must be a bool tensor (B, N) or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must have dtype torch.bool (True = real token), got {mask.dtype}")
        if tuple(mask.shape) != (batch, n):
            raise ValueError(f"{name}: mask must have shape (B, N) = ({batch}, {n}), got {tuple(mask.shape)}")
        return mask.to(device)

    def extra_repr(self) -> str:
        return f"{self.card.name}, dim={self.dim}, heads={self.heads}, causal={self.causal}"


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"
