"""The model-level techniques together, for every registered mechanism (generated from the registry):
weight sharing x reversible layers x chunked feed-forward x factorised embedding x adapters / LoRA x
int8 quantization; plus how the combinations are defined (adapters follow the sharing, reversible
training with a frozen base, LoRA through the fused projection, adapter files onto a base)."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.models.adapters import (
    HoulsbyAdapter,
    LoRALinear,
    adapter_state,
    add_adapters,
    load_adapters,
    merge_lora,
    parameter_counts,
    parse_adapters,
)
from efficient_transformers.models.quantize import Int8Linear, int8_supported, model_nbytes

from tiny_models import DIM, VOCAB, tiny_model  # noqa: E402  (tests/models/tiny_models.py)
CASES = [(c.name, causal) for c in et.mechanisms() for causal in c.modes]
IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in CASES]


def tiny(name: str, causal: bool, seed: int = 0, depth: int = 2, **kw):
    return tiny_model(name, causal, seed, depth, **kw)


def forward(model, causal: bool, tokens, mask):
    return model(tokens) if causal else model(tokens, mask)


def data(causal: bool):
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = None if causal else torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    return tokens, mask


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_every_technique_combines_with_every_mechanism(name, causal):
    tokens, mask = data(causal)
    model = tiny(name, causal, share="all", reversible=True, ff_chunks=2, embedding_dim=8).eval()
    with torch.no_grad():
        base = forward(model, causal, tokens, mask)
    assert torch.isfinite(base).all()
    if causal:
        assert model.generate(tokens[:, :3], max_new_tokens=2, top_k=1).shape == (2, 5)
    # int8: every Linear quantized, whatever the mechanism reads from its projections
    q = et.quantize(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    with torch.no_grad():
        low = forward(q, causal, tokens, mask)
    real = (mask if mask is not None else torch.ones_like(tokens, dtype=torch.bool))
    ref = base[real] if causal else base
    got = low[real] if causal else low
    assert torch.isfinite(got).all() and (got - ref).norm() / ref.norm() < 0.15
    assert model_nbytes(q) < 0.6 * model_nbytes(model)
    # adapters start as the identity of the base model, and only they, the norms and the head train
    for spec in ("houlsby:4", "lora:2"):
        adapted = tiny(name, causal, share="all", reversible=True, ff_chunks=2, embedding_dim=8)
        adapted.load_state_dict(model.state_dict())
        add_adapters(adapted, spec)
        adapted.train()
        out = forward(adapted, causal, tokens, mask)
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        out.float().square().mean().backward()
        assert {n for n, p in adapted.named_parameters() if p.grad is not None} <= trainable_names(adapted)
        kind_params = [n for n in trainable_names(adapted) if "adapter" in n or "lora_" in n]
        assert kind_params and all(adapted.get_parameter(n).grad is not None for n in kind_params)


def test_adapters_follow_the_weight_sharing():
    d, size, rank = DIM, 4, 2
    houlsby = 2 * (d * size + size + size * d + d)  # one adapter pair
    for share, pairs in (("none", 3), ("all", 1), ("attention", 3), ("ffn", 3)):
        model = tiny("vanilla", False, depth=3, share=share)
        before = parameter_counts(model)["total"]
        add_adapters(model, f"houlsby:{size}")
        assert parameter_counts(model)["total"] - before == pairs * houlsby, share
        assert sum(isinstance(m, HoulsbyAdapter) for m in model.modules()) == 2 * pairs
    lora = rank * d + 3 * d * rank + rank * d + d * rank  # to_qkv (3d x d) and to_out (d x d)
    for share, layers in (("none", 3), ("all", 1), ("attention", 1), ("ffn", 3)):
        model = tiny("vanilla", True, depth=3, share=share)
        before = parameter_counts(model)["total"]
        add_adapters(model, f"lora:{rank}")
        assert parameter_counts(model)["total"] - before == layers * lora, share


def test_trainable_parts_and_fraction():
    clf = tiny("vanilla", False, depth=2)
    counts = add_adapters(clf, "houlsby:4")
    names = trainable_names(clf)
    assert all(("adapter" in n) or ("norm" in n) or n.startswith("head.") for n in names)
    assert any(n.startswith("head.") for n in names) and any("norm" in n for n in names)
    assert counts["trainable"] == sum(clf.get_parameter(n).numel() for n in names) < counts["total"]
    lm = tiny("vanilla", True, depth=2)
    add_adapters(lm, "lora:2")
    assert not lm.head.weight.requires_grad, "a language model's head is its tied embedding: frozen"
    assert all(("lora_" in n) or ("norm" in n) for n in trainable_names(lm))
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(lm, "lora:2")


def test_reversible_training_with_a_frozen_base_and_adapters_matches_plain_autograd():
    model = tiny("vanilla", False, depth=2, reversible=True, dropout=0.1, share="attention").double()
    add_adapters(model, "houlsby:3")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HoulsbyAdapter):
                m.up.weight.normal_()  # away from the identity, so the adapters matter
    tokens, mask = data(False)
    grads = []
    for recompute in (True, False):
        model.encoder.stack.recompute = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(tokens, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == trainable_names(model)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-10, rtol=1e-8)


def test_lora_through_the_fused_projection_equals_the_merged_weights():
    model = tiny("vanilla", True, depth=2).double()
    add_adapters(model, "lora:2")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
    layer = model.stack.blocks[0].attn
    assert isinstance(layer.to_qkv, LoRALinear)
    lora = layer.to_qkv
    torch.testing.assert_close(lora.weight, lora.base.weight + lora.scaling * lora.lora_b @ lora.lora_a)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    torch.testing.assert_close(lora(x), torch.nn.functional.linear(x, lora.weight, lora.bias))
    tokens, _ = data(True)
    out = model(tokens)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(tokens), out, atol=1e-12, rtol=1e-10)


def test_adapter_weights_load_onto_the_base_model():
    base = tiny("vanilla", False, depth=2, share="ffn")
    tuned = tiny("vanilla", False, depth=2, share="ffn")
    tuned.load_state_dict(base.state_dict())
    add_adapters(tuned, "houlsby:4")
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "fine-tuned"
    state = adapter_state(tuned)
    assert set(state) == trainable_names(tuned)
    fresh = tiny("vanilla", False, seed=9, depth=2, share="ffn")
    fresh.load_state_dict(base.state_dict())
    load_adapters(fresh, "houlsby:4", state)
    tokens, mask = data(False)
    assert torch.equal(fresh(tokens, mask), tuned(tokens, mask))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapters(tiny("vanilla", False, depth=2), "lora:4", state)


def test_int8_linears_expose_float_weights_and_run_the_quantized_kernel():
    model = tiny("vanilla", True, depth=1).eval()
    q = et.quantize(model)
    proj = q.stack.blocks[0].attn.to_qkv
    assert isinstance(proj, Int8Linear) and proj.weight.dtype == torch.float32
    torch.testing.assert_close(proj.weight, model.stack.blocks[0].attn.to_qkv.weight, atol=0.02, rtol=0.1)
    x = torch.randn(1, 4, DIM)
    assert torch.equal(proj(x), proj.quantized(x))
    assert model.stack.blocks[0].attn.to_qkv.weight.dtype == torch.float32, "the original is unchanged"
    lora = tiny("vanilla", True, depth=1)
    add_adapters(lora, "lora:2")
    assert not any(isinstance(m, LoRALinear) for m in et.quantize(lora).modules()), "LoRA is merged first"


def test_bad_adapter_specs_and_int8_devices_name_what_is_allowed():
    assert parse_adapters("houlsby:64") == ("houlsby", 64) and parse_adapters("lora:8") == ("lora", 8)
    for spec, message in (("houlsby:0", "the size must be an int >= 1, got '0'"), ("lora:-2", "got '-2'"),
                          ("bottleneck:8", "unknown adapter kind 'bottleneck'.*allowed: \\['houlsby', 'lora'\\]"),
                          ("houlsby", "expected houlsby:SIZE or lora:RANK"), ("lora:x", "got 'x'")):
        with pytest.raises(ValueError, match=message):
            parse_adapters(spec)
    with pytest.raises(ValueError, match="rank 99 exceeds"):
        add_adapters(tiny("vanilla", False, depth=1), "lora:99")
    assert "CPU only" in int8_supported("cuda") and "allowed: cpu" in int8_supported("cuda")
    assert int8_supported("cpu") is None
