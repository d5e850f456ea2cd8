"""The shared pieces of the layer contract: option checks, seeded randomness, the fused projection's
slots, the explicit sequence axis of zero_padded, the forward template's hooks, and card derivation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

import efficient_transformers as et
from efficient_transformers.core import (
    AttentionLayer, SeededDraws, project_heads, split_heads, zero_padded,
)
from efficient_transformers.core import options as opt
from efficient_transformers.core.randomness import mix_seed
from efficient_transformers.registry import Card, constructor_options, register

# ----------------------------------------------------------------------------- option checks


@pytest.mark.parametrize("check,args,words", [
    (opt.positive_int, ("k", 0), "m: k must be a positive int, got 0; allowed: an int >= 1"),
    (opt.positive_int, ("k", True), "got True"),
    (opt.positive_int, ("k", 2.0), "got 2.0"),
    (opt.optional_positive_int, ("chunk", -1), "m: chunk must be None or a positive int, got -1"),
    (opt.int_in_range, ("c", 9, 0, 4), "m: c must be an int in [0, 4], got 9"),
    (opt.number_in_range, ("p", 1.5, 0.0, 1.0), "m: p must be a number in [0.0, 1.0], got 1.5"),
    (opt.boolean, ("flag", 1), "m: flag must be a bool, got 1; allowed: True or False"),
    (opt.choice, ("pattern", "diag", ("strided", "fixed")), "m: unknown pattern 'diag'; allowed: ['strided', 'fixed']"),
    (opt.choice, ("pattern", True, (1, 2)), "unknown pattern True"),  # True == 1, but it is not 1
    (opt.positive_int_tuple, ("shape", (4, 0), ), "m: shape must be a tuple of at least 1 positive ints, got (4, 0)"),
    (opt.positive_int_tuple, ("shape", "44"), "got '44'"),
])
def test_option_checks_name_the_mechanism_the_value_and_what_is_allowed(check, args, words):
    with pytest.raises(ValueError) as info:
        check("m", *args)
    assert words in str(info.value)


def test_option_checks_return_allowed_values():
    assert opt.positive_int("m", "k", 3) == 3 and opt.optional_positive_int("m", "c", None) is None
    assert opt.choice("m", "x", None, (None, "a")) is None and opt.boolean("m", "b", False) is False
    assert opt.positive_int_tuple("m", "shape", [4, 5], length=2) == (4, 5)
    assert opt.number_in_range("m", "p", 0.5, 0.0, 1.0, low_inclusive=False) == 0.5
    with pytest.raises(ValueError, match="tuple of 3 positive ints"):
        opt.positive_int_tuple("m", "shape", (4, 5), length=3)


# ----------------------------------------------------------------------------- seeded randomness
def test_seeded_draws_are_reproducible_index_dependent_and_redrawable(tmp_path):
    torch.manual_seed(3)
    a = SeededDraws()
    torch.manual_seed(3)
    b = SeededDraws()
    first = a.randperm(50, 7)
    assert torch.equal(first, b.randperm(50, 7)), "same global seed, same draws"
    assert not torch.equal(first, a.randperm(50, 8)), "another index, another stream"
    assert torch.equal(first, a.randperm(50, 7)), "drawing does not consume anything"
    a.redraw()
    assert int(a.draws) == 1 and not torch.equal(first, a.randperm(50, 7))
    c = nn.Module()
    c.random = SeededDraws()
    holder = nn.Module()
    holder.random = a
    save_model(holder, str(tmp_path / "r.safetensors"))
    load_model(c, str(tmp_path / "r.safetensors"))
    assert torch.equal(c.random.randperm(50, 7), a.randperm(50, 7)), "seed and draw count travel with the weights"


def test_mix_seed_separates_word_orders_and_fits_int63():
    seeds = {mix_seed(s, d, i) for s in range(4) for d in range(4) for i in range(4)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)


# ----------------------------------------------------------------------------- the fused projection
@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_project_heads_equals_linear_then_split_for_any_slot_count(slots, bias):
    torch.manual_seed(0)
    B, N, dim, H = 2, 5, 12, 3
    linear = nn.Linear(dim, slots * dim, bias=bias).double()
    x = torch.randn(B, N, dim, dtype=torch.float64, requires_grad=True)
    fused = project_heads(x, linear.weight, linear.bias, H)
    plain = [split_heads(part, H) for part in linear(x).split(dim, dim=-1)]
    assert len(fused) == slots
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)
    w = [torch.randn_like(p) for p in plain]
    params = [x, *linear.parameters()]
    got = torch.autograd.grad(sum((f * wi).sum() for f, wi in zip(fused, w)), params)
    want = torch.autograd.grad(sum((p * wi).sum() for p, wi in zip(plain, w)), params)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- zero_padded
def test_zero_padded_uses_the_given_axis_even_when_sizes_coincide():
    B, H, N, d = 2, 2, 2, 2  # every axis but the batch has the sequence's size
    x = torch.arange(B * H * N * d, dtype=torch.float64).view(B, H, N, d) + 1
    mask = torch.tensor([[True, False], [False, True]])
    out = zero_padded(x, mask, seq_dim=2)
    assert torch.equal(out == 0, ~mask[:, None, :, None].expand_as(x))
    flat = zero_padded(x[:, 0], mask, seq_dim=1)  # (B, N, d)
    assert torch.equal(flat == 0, ~mask[:, :, None].expand(B, N, d))
    with pytest.raises(ValueError, match="does not match axis"):
        zero_padded(x, torch.ones(2, 3, dtype=torch.bool), seq_dim=2)


# ----------------------------------------------------------------------------- the template's hooks
class _Probe(AttentionLayer):
    """A toy layer (not registered) that records what the template hands its core."""

    card = dataclasses.replace(et.card("vanilla"), global_tokens=True)

    def __init__(self, dim, heads, causal=False, *, projections="qkv"):
        super().__init__(dim, heads, causal, projections=projections)
        self.seen = {}

    def _attend(self, q, k, v, mask, state, **extra):
        self.seen = {"q": q, "k": k, "v": v, **extra}
        self.report_aux_loss("probe", v.square().mean() if v is not None else torch.zeros(()), weight=0.5)
        return (torch.zeros_like(v) if v is not None else torch.zeros(2, self.heads, 3, self.head_dim)), None


@pytest.mark.parametrize("projections,slots", [("qkv", 3), ("shared_qk", 2), ("v", 1), ("none", 0)])
def test_projection_kinds_give_the_core_what_they_promise(projections, slots):
    layer = _Probe(8, 2, projections=projections)
    assert (layer.to_qkv is None) == (slots == 0)
    if slots:
        assert layer.to_qkv.weight.shape == (slots * 8, 8)
    layer(torch.randn(2, 3, 8))
    q, k, v = layer.seen["q"], layer.seen["k"], layer.seen["v"]
    if projections == "qkv":
        assert not torch.equal(q, k) and v.shape == (2, 2, 3, 4)
    elif projections == "shared_qk":
        assert q is k and not torch.equal(q, v)
    elif projections == "v":
        assert q is None and k is None and v.shape == (2, 2, 3, 4)
    else:
        assert q is None and k is None and v is None


def test_global_mask_reaches_the_core_without_padding_and_aux_losses_reset_per_bare_call():
    layer = _Probe(8, 2)
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    g = torch.tensor([[True, False, True], [False, False, True]])
    layer(x, mask, global_mask=g)
    assert torch.equal(layer.seen["global_mask"], g & mask), "a padded position is never global"
    layer(x)
    assert "global_mask" not in layer.seen, "no global_mask: the core is not handed one"
    first = layer.aux_losses["probe"].value
    layer(x)
    assert layer.aux_losses["probe"].weight == 0.5
    torch.testing.assert_close(layer.aux_losses["probe"].value, first)  # a bare layer: its latest call only


def test_cards_take_their_options_from_the_constructor_defaults():
    class Toy(AttentionLayer):
        def __init__(self, dim, heads, causal=False, *, window: int = 5, flavour: str = "a"):
            super().__init__(dim, heads, causal)

    assert constructor_options(Toy) == {"window": 5, "flavour": "a"}
    base = dict(name="vanilla", title="t", paper="p", year=2020, complexity="O(N)", classes=("FP",),
                causal=False, bidirectional=True)
    from efficient_transformers import registry

    saved = dict(registry._REGISTRY)
    try:
        registry._REGISTRY.pop("vanilla")
        register(Card(**base))(Toy)
        assert Toy.card.options == {"window": 5, "flavour": "a"}
        registry._REGISTRY.pop("vanilla")
        with pytest.raises(ValueError, match="differ from the constructor"):
            register(Card(**base, options={"window": 6, "flavour": "a"}))(Toy)
        with pytest.raises(ValueError, match="test_options names unknown options"):
            register(Card(**base, test_options={"size": 2}))(Toy)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
