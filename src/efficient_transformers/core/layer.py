"""The attention layer every mechanism derives from.

Two layers, so each mechanism file reads like its paper's algorithm box:

- the **core**, `attend(q, k, v, mask=None, state=None) -> (out, state)` on per-head tensors
  (B, H, N, d); a mechanism implements `_attend` with the same signature, after the base class has
  validated shapes, dtypes and masks;
- the **layer**, `forward(x, mask=None)`: the q/k/v projections, the head split, the core and the
  output projection. Mechanisms with their own parameters (Linformer's E/F, Performer's features)
  keep them on the layer; mechanisms whose attention is not a function of q, k, v (Synthesizer,
  Set Transformer) override `forward` instead and say so.

Conventions: `mask` is (B, N) bool with True = real token; `causal` is fixed at construction; a
causal layer returns its decoding state from every call (`forward(..., return_state=True)`), and
given a state it processes the next tokens only. Bad input raises `ValueError` naming the mechanism,
the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..registry import Card
from .state import History

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionLayer(nn.Module):
    card: ClassVar[Card]
    #: True when the layer's attention is a function of (q, k, v) alone, i.e. `attend` is meaningful.
    has_attend: ClassVar[bool] = True

    def __init__(self, dim: int, heads: int, causal: bool = False, *, max_seq_len: int | None = None) -> None:
        super().__init__()
        name = self.card.name
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"{name}: dim must be a positive int, got {dim!r}")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            raise ValueError(f"{name}: heads must be a positive int, got {heads!r}")
        if dim % heads:
            divisors = [h for h in range(1, dim + 1) if dim % h == 0 and h <= 64]
            raise ValueError(f"{name}: heads={heads} does not divide dim={dim}; allowed heads: {divisors}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len <= 0):
            raise ValueError(f"{name}: max_seq_len must be a positive int, got {max_seq_len!r}")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.max_seq_len = max_seq_len
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    # ------------------------------------------------------------------ the layer
    def forward(self, x: Tensor, mask: Tensor | None = None, state: Any = None, *, return_state: bool = False):
        """x: (B, N, dim) -> (B, N, dim); with `return_state`, also the decoding state after x."""
        mask = self.check_input(x, mask, state)
        q, k, v = self.project_qkv(x)  # 3 x (B, H, N, d)
        out, new_state = self._attend(q, k, v, mask, state)  # (B, H, N, d)
        y = self.to_out(self.merge_heads(out))  # (B, N, dim)
        return (y, new_state) if return_state else y

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, dim) -> q, k, v (B, H, N, d): views of one (B, N, 3, H, d) product (see `_QKVProjection`)."""
        return _QKVProjection.apply(x, self.to_qkv.weight, self.to_qkv.bias, self.heads)

    @staticmethod
    def merge_heads(out: Tensor) -> Tensor:
        B, H, N, d = out.shape
        return out.transpose(1, 2).reshape(B, N, H * d)  # (B, N, H*d)

    # ------------------------------------------------------------------ the core
    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, state: Any = None):
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
        return self._attend(q, k, v, mask, state)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: Any):
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

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Tensor, mask: Tensor | None, state: Any = None) -> Tensor | None:
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
        return self._check_mask(mask, x.shape[0], x.shape[1], x.device)

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


class _QKVProjection(torch.autograd.Function):
    """q, k, v = split_heads(x W^T + b), with a backward pass of three per-slot products that read each
    head-split gradient where it lies.

    Autograd's own graph for view / permute / unbind stacks the three gradients into one
    (B, N, 3, dim) buffer before the two weight products: two passes over 3 N dim numbers and a fresh
    buffer, which at long N cost a tenth of a linear-time layer's step. Here a gradient stored heads-last
    ((B, N, H, d) memory, as SDPA and kernel attention write them) is already the (B N, dim) operand of
    its slot's products and is not copied at all; another layout is copied once. Values and gradients
    are those of `nn.Linear` followed by the head split (tested); double backward is not supported.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, heads: int):
        B, N, dim = x.shape
        qkv = F.linear(x, weight, bias).view(B, N, 3, heads, dim // heads)  # (B, N, 3, H, d)
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d), views
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        x, _ = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # the products in the weight's dtype, with out=
            return _QKVProjection._backward(ctx, grad_q, grad_k, grad_v)

    @staticmethod
    def _backward(ctx, grad_q, grad_k, grad_v):
        x, weight = ctx.saved_tensors
        B, N, dim = x.shape
        rows = x.reshape(B * N, dim).to(weight.dtype)  # (B N, dim)
        grad_x = None
        grad_weight = weight.new_zeros(weight.shape) if ctx.needs_input_grad[1] else None  # (3 dim, dim)
        grad_bias = weight.new_zeros(3 * dim) if ctx.needs_input_grad[2] else None
        for slot, g in enumerate((grad_q, grad_k, grad_v)):
            if g is None:
                continue
            g = g.to(weight.dtype).transpose(1, 2).reshape(B * N, dim)  # (B N, H d): a view when heads-last
            w = weight[slot * dim:(slot + 1) * dim]  # (dim, dim): this slot's rows
            if ctx.needs_input_grad[0]:  # accumulated with out= rather than addmm_, which FlopCounterMode misses
                grad_x = g @ w if grad_x is None else torch.addmm(grad_x, g, w, out=grad_x)  # (B N, dim)
            if grad_weight is not None:
                torch.mm(g.t(), rows, out=grad_weight[slot * dim:(slot + 1) * dim])
            if grad_bias is not None:
                torch.sum(g, 0, out=grad_bias[slot * dim:(slot + 1) * dim])
        if grad_x is not None:
            grad_x = grad_x.view(B, N, dim).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
        return grad_x, grad_weight, None if grad_bias is None else grad_bias.to(ctx.bias_dtype), None


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"
