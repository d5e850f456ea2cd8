"""Parameter-efficient fine-tuning: bottleneck adapters (Houlsby et al. 2019) and LoRA (Hu et al. 2021).

A trained model is frozen and a few new weights are trained on the new task:

    houlsby:SIZE   after the attention and after the feed-forward sublayer of every block,
                   A(h) = h + W_up act(W_down h),   W_down: (SIZE, dim), W_up: (dim, SIZE), W_up = 0 at start
    lora:RANK      every attention layer's input and output projections (to_qkv, to_out),
                   W' = W + (alpha / RANK) B A,      A: (RANK, in), B: (out, RANK), B = 0 at start

Both start as the identity function of the base model. Trainable after `add_adapters`: the adapter
weights, every LayerNorm, and the task head (the classifier's / retrieval model's MLP; a language
model's head is its tied embedding and stays frozen). Where the base shares weights across layers
(`share=`), adapters follow the sharing: Houlsby adapters live in the block (one per block object,
so one for all depths with share="all"), LoRA in the attention layer (one for all depths when the
attention is shared).

LoRA's projection keeps the attention layer's code path: `LoRALinear.weight` is the merged matrix
W + s B A, so a layer that reads its projection's weight (the fused q/k/v projection, Linformer's
reordered projections) computes with it and back-propagates into A and B.

`adapter_state(model)` is what fine-tuning changed (a small safetensors file); `load_adapters` puts it
back onto a base model with the base's weights. `merge_lora(model)` folds LoRA into plain Linears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layer import AttentionLayer

ADAPTER_KINDS = ("houlsby", "lora")


def parse_adapters(spec: object) -> tuple[str, int]:
    """"houlsby:64" -> ("houlsby", 64); bad specs raise ValueError naming what is allowed."""
    allowed = "houlsby:SIZE or lora:RANK with an int >= 1, e.g. houlsby:64 or lora:8"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"adapters {spec!r}: expected {allowed}")
    kind, _, size = spec.partition(":")
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r} in {spec!r}; allowed: {list(ADAPTER_KINDS)} ({allowed})")
    try:
        value = int(size)
    except ValueError:
        raise ValueError(f"adapters {spec!r}: the size must be an int >= 1, got {size!r}; allowed: {allowed}") from None
    if value < 1 or str(value) != size.strip():
        raise ValueError(f"adapters {spec!r}: the size must be an int >= 1, got {size!r}; allowed: {allowed}")
    return kind, value


class HoulsbyAdapter(nn.Module):
    """h -> h + W_up gelu(W_down h), near-identity at initialisation (W_up = 0)."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = x (W + s B A)^T + b, s = alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The merged matrix W + s B A (out, in), differentiable in A and B."""
        return self.base.weight + self.scaling * (self.lora_b @ self.lora_a)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight, self.base.bias) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def _blocks(model: nn.Module):
    from .blocks import TransformerBlock  # late: blocks imports the registry

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]  # modules() lists a shared block once


def add_adapters(model: nn.Module, spec: str) -> dict[str, int]:
    """Add `spec`'s adapters to `model` in place and freeze everything else but the LayerNorms and the task
    head. Returns {"trainable": ..., "total": ...} parameter counts."""
    kind, size = parse_adapters(spec)
    if any(isinstance(m, (HoulsbyAdapter, LoRALinear)) for m in model.modules()):
        raise ValueError(f"adapters {spec!r}: this model already has adapters; add them to a base model once")
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"adapters {spec!r}: {type(model).__name__} has no Transformer blocks to adapt")
    param = next(model.parameters())
    new: list[nn.Module] = []
    if kind == "houlsby":
        for block in blocks:
            dim = block.norm1.normalized_shape[0]
            block.adapter_attn = HoulsbyAdapter(dim, size).to(param.device, param.dtype)
            block.adapter_ff = HoulsbyAdapter(dim, size).to(param.device, param.dtype)
            new += [block.adapter_attn, block.adapter_ff]
    else:
        layers = [m for m in model.modules() if isinstance(m, AttentionLayer)]
        for layer in layers:
            for attr in ("to_qkv", "to_out"):
                linear = getattr(layer, attr, None)
                if isinstance(linear, nn.Linear):
                    if size > min(linear.in_features, linear.out_features):
                        raise ValueError(f"adapters {spec!r}: rank {size} exceeds the projection's size "
                                         f"({linear.out_features} x {linear.in_features}); allowed: rank <= "
                                         f"{min(linear.in_features, linear.out_features)}")
                    setattr(layer, attr, LoRALinear(linear, size))
                    new.append(getattr(layer, attr))
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*new, *(m for m in model.modules() if isinstance(m, nn.LayerNorm)), *_task_heads(model)]
    for module in trainable:
        for name, p in module.named_parameters():
            if not name.endswith("base.weight") and not name.endswith("base.bias"):
                p.requires_grad_(True)
    for m in model.modules():  # a LoRA's frozen base stays frozen even inside a trainable head
        if isinstance(m, LoRALinear):
            m.base.requires_grad_(False)
    return parameter_counts(model)


def _task_heads(model: nn.Module) -> list[nn.Module]:
    from .lm import TransformerLM

    head = getattr(model, "head", None)
    if head is None or isinstance(model, TransformerLM):  # an LM's head is its (tied) embedding
        return []
    return [head]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())  # shared weights once
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def adapter_kind(model: nn.Module) -> str | None:
    for m in model.modules():
        if isinstance(m, HoulsbyAdapter):
            return "houlsby"
        if isinstance(m, LoRALinear):
            return "lora"
    return None


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """What fine-tuning with adapters trains: every trainable parameter, by name (shared ones once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, spec: str, tensors: dict[str, Tensor]) -> nn.Module:
    """Add `spec`'s adapters to a base model (holding the base weights) and load `tensors` (from
    `adapter_state`) into them; the names must be exactly the trainable ones."""
    add_adapters(model, spec)
    want = set(adapter_state(model))
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise ValueError(f"adapters {spec!r}: the adapter file does not fit this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"adapters {spec!r}: {name} has shape {tuple(value.shape)} in the file, "
                                 f"{tuple(params[name].shape)} in the model")
            params[name].copy_(value)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + s B A (in place; returns the model)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model
