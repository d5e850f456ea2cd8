"""Post-training int8 quantization for CPU inference, through PyTorch's own stack.

    q = et.quantize(model)          # an int8 copy; `model` is unchanged

`torch.ao.quantization.quantize_dynamic` swaps every `nn.Linear` (projections, feed-forward, heads,
adapters) for its dynamically quantized module: int8 weights (per-tensor scale), activations
quantized per call, int8 x int8 products with int32 accumulation (fbgemm / onednn / qnnpack kernels).
Embeddings, layer norms and the attention cores stay float32. LoRA updates are merged first.

Each quantized Linear is then wrapped in `Int8Linear`, which calls it and also exposes `weight` and
`bias` as float tensors (dequantized), so layer code that reads a projection's weight directly still
works; the attention layer's default projection calls the module (the int8 kernel) instead of its
fused float product (`core.layer.AttentionLayer.project`).

CPU only: quantized kernels need a quantized engine (`torch.backends.quantized.supported_engines`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from .adapters import merge_lora


def int8_supported(device: str | torch.device = "cpu") -> str | None:
    """None when int8 inference can run on `device`, else why not (and what is allowed)."""
    device = torch.device(device)
    if device.type != "cpu":
        return (f"int8 dynamic quantization runs on the CPU only, got device {str(device)!r}; "
                f"allowed: cpu")
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        return "this PyTorch build has no quantized CPU engine (torch.backends.quantized.supported_engines is empty)"
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return f"this PyTorch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic"
    return None


class Int8Linear(nn.Module):
    """A dynamically quantized Linear (torch.ao), with `weight` / `bias` readable as float tensors."""

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features

    @property
    def weight(self) -> Tensor:
        return self.quantized.weight().dequantize()

    @property
    def bias(self) -> Tensor | None:
        return self.quantized.bias()

    def forward(self, x: Tensor) -> Tensor:
        return self.quantized(x)

    def nbytes(self) -> int:
        """Storage of the packed weight: int8 values, its scale and zero point, float32 bias."""
        w = self.quantized.weight()
        bias = self.quantized.bias()
        return w.numel() + 8 + (0 if bias is None else bias.numel() * bias.element_size())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize(model: nn.Module) -> nn.Module:
    """An int8 copy of `model` for CPU inference (eval mode): every nn.Linear dynamically quantized."""
    problem = int8_supported("cpu")
    if problem is not None:
        raise ValueError(f"et.quantize: {problem}")
    from torch.ao.quantization import quantize_dynamic

    if torch.backends.quantized.engine == "none":
        torch.backends.quantized.engine = [e for e in torch.backends.quantized.supported_engines if e != "none"][0]
    work = merge_lora(copy.deepcopy(model)).cpu().float().eval()
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it works as documented
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = quantize_dynamic(work, {nn.Linear}, dtype=torch.qint8)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(module, name, Int8Linear(child))
    for p in quantized.parameters():
        p.requires_grad_(False)
    return quantized


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's weights and persistent buffers, shared tensors once; int8 Linears at their packed size."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.nbytes()
    for t in [*model.parameters(), *(b for _, b in _persistent_buffers(model))]:
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _persistent_buffers(model: nn.Module):
    for module_name, m in model.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if name not in m._non_persistent_buffers_set:
                yield f"{module_name}.{name}", b
