"""What the models do with the layer contract's extra inputs and outputs: global tokens (the CLS token
is global for mechanisms that take them), data shapes, own positions, and auxiliary losses collected
over layers and calls and added by the trainer with their weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import efficient_transformers as et
from efficient_transformers import registry
from efficient_transformers.attention.vanilla import VanillaAttention
from efficient_transformers.core import collect_aux_losses, reset_aux_losses
from efficient_transformers.models.blocks import attention_options_for


@pytest.fixture
def vanilla_card(monkeypatch):
    """Give vanilla's card other fields for one test (the registry and the class see the same card)."""

    def patch(**fields):
        new = dataclasses.replace(et.card("vanilla"), **fields)
        monkeypatch.setitem(registry._REGISTRY, "vanilla", (new, VanillaAttention))
        monkeypatch.setattr(VanillaAttention, "card", new)
        return new

    return patch


def test_classifier_marks_its_cls_token_global_when_the_mechanism_takes_global_tokens(vanilla_card, monkeypatch):
    seen = []
    plain = VanillaAttention._attend
    monkeypatch.setattr(VanillaAttention, "_attend",
                        lambda self, q, k, v, mask, state, **extra: (seen.append(extra.get("global_mask")),
                                                                     plain(self, q, k, v, mask, state))[1])
    tokens = torch.randint(0, 9, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    et.TransformerClassifier(9, 2, dim=8, depth=2, heads=2)(tokens, mask)
    assert seen == [None, None], "without global tokens the layers get no global_mask"
    seen.clear()
    vanilla_card(global_tokens=True)
    clf = et.TransformerClassifier(9, 2, dim=8, depth=2, heads=2)
    extra = torch.zeros(2, 6, dtype=torch.bool)
    extra[0, 3] = extra[1, 5] = True  # item 1's is padding: not global
    clf(tokens, mask, global_mask=extra)
    want = torch.zeros(2, 7, dtype=torch.bool)
    want[:, 0] = True
    want[0, 4] = True
    assert len(seen) == 2 and all(torch.equal(g, want) for g in seen)
    mean = et.TransformerClassifier(9, 2, dim=8, depth=1, heads=2, pooling="mean")
    seen.clear()
    mean(tokens, mask)
    assert seen == [None], "mean pooling has no CLS to mark"


def test_a_global_mask_is_refused_for_mechanisms_without_global_tokens():
    lm = et.TransformerLM(vocab_size=9, dim=8, depth=1, heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match="vanilla: this mechanism has no global tokens"):
        lm(torch.randint(0, 9, (2, 6)), global_mask=torch.ones(2, 6, dtype=torch.bool))
    clf = et.TransformerClassifier(9, 2, dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="vanilla: this mechanism has no global tokens"):
        clf(torch.randint(0, 9, (2, 6)), global_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="global_mask must be a bool tensor of shape"):
        clf(torch.randint(0, 9, (2, 6)), global_mask=torch.ones(2, 5, dtype=torch.bool))


def test_mechanisms_with_their_own_positions_get_no_absolute_positions(vanilla_card):
    assert et.TransformerLM(vocab_size=9, dim=8, depth=1, heads=2).embed.positions is not None
    vanilla_card(own_positions=True)
    assert et.TransformerLM(vocab_size=9, dim=8, depth=1, heads=2).embed.positions is None
    assert et.TransformerClassifier(9, 2, dim=8, depth=1, heads=2).encoder.embed.positions is None
    kept = et.TransformerLM(vocab_size=9, dim=8, depth=1, heads=2, positional="learned")
    assert kept.embed.positions is not None, "an explicit choice is kept"


def test_data_shape_reaches_mechanisms_with_a_shape_option_only(vanilla_card):
    assert "shape" not in attention_options_for("vanilla", {}, 64, (8, 8))
    vanilla_card(options={**et.card("vanilla").options, "shape": None})
    assert attention_options_for("vanilla", {}, 64, (8, 8))["shape"] == (8, 8)
    assert attention_options_for("vanilla", {"shape": (4, 16)}, 64, (8, 8))["shape"] == (4, 16), "the user's wins"
    with pytest.raises(ValueError, match="data_shape must be None or a tuple of positive ints"):
        et.TransformerClassifier(9, 2, dim=8, depth=1, heads=2, data_shape=(8, 0))


def test_models_collect_aux_losses_over_layers_and_calls(aux_reporting_vanilla):
    """(The fixture is in tests/conftest.py: vanilla layers report their values' mean square, weight 0.25.)"""
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=9, dim=8, depth=3, heads=2, max_seq_len=16)
    lm(torch.randint(0, 9, (2, 5)))
    losses = lm.aux_losses()
    per_layer = [block.attn.aux_losses["value_energy"].value for block in lm.stack.blocks]
    assert set(losses) == {"value_energy"} and losses["value_energy"].weight == 0.25
    torch.testing.assert_close(losses["value_energy"].value, sum(per_layer))
    lm(torch.randint(0, 9, (2, 5)))
    assert len(lm.aux_losses()) == 1, "a new forward starts from zero"
    torch.manual_seed(0)
    retrieval = et.RetrievalModel(9, dim=8, depth=1, heads=2, max_seq_len=16)
    a, b = torch.randint(0, 9, (2, 5)), torch.randint(0, 9, (2, 7))
    retrieval(a, b)  # two lengths: two encoder calls, both counted
    both = retrieval.aux_losses()["value_energy"].value
    reset_aux_losses(retrieval)
    retrieval.encoder(a)
    first = collect_aux_losses(retrieval)["value_energy"].value
    retrieval.encoder(b)
    second = collect_aux_losses(retrieval)["value_energy"].value - first
    torch.testing.assert_close(both, first + second)


def test_pma_pooling_is_the_set_transformers_pma_over_the_real_outputs():
    torch.manual_seed(0)
    clf = et.TransformerClassifier(9, 2, dim=16, depth=1, heads=2, pooling="pma", positional="none").double()
    tokens = torch.randint(0, 9, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    encoder = clf.encoder
    h = encoder.stack(encoder.embed(tokens).double(), mask)
    torch.testing.assert_close(encoder(tokens, mask), encoder.pma(h, mask)[:, 0])
    order = torch.randperm(5)
    shuffled, shuffled_mask = tokens.clone(), mask.clone()
    shuffled[1, :5] = tokens[1, order]
    shuffled[1, 5:] = 3  # other padding content
    torch.testing.assert_close(clf(shuffled, shuffled_mask)[1], clf(tokens, mask)[1])  # a set: order-free
