"""Reversible residual layers and the chunked feed-forward (Reformer), for every registered mechanism:
the recomputing backward pass gives plain autograd's gradients (float64, with dropout), decoding
equals the full forward, auxiliary losses and buffer-updating layers replay exactly, and the saved
activations do not grow with depth."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import efficient_transformers as et
from efficient_transformers import registry
from efficient_transformers.attention.vanilla import VanillaAttention
from efficient_transformers.bench.techniques import saved_activation_bytes

from tiny_models import DIM, HEADS, VOCAB, tiny_model  # noqa: E402  (tests/models/tiny_models.py)
CASES = [(c.name, causal) for c in et.mechanisms() for causal in c.modes]
IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in CASES]
CAUSAL = [c.name for c in et.mechanisms() if c.causal]


def tiny(name: str, causal: bool, seed: int = 0, depth: int = 3, **kw):
    return tiny_model(name, causal, seed, depth, **kw)


def set_recompute(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, et.models.TransformerStack):
            m.recompute = on


def run(model, causal: bool, tokens, mask, *, recompute: bool, seed: int = 5):
    """Forward + backward with a fixed RNG (dropout); -> (output, {name: grad}, aux losses)."""
    model.zero_grad(set_to_none=True)
    set_recompute(model, recompute)
    torch.manual_seed(seed)
    out = model(tokens) if causal else model(tokens, mask)
    loss = out.square().mean()
    aux = {k: v.value for k, v in model.aux_losses().items()}
    for value in aux.values():
        loss = loss + value
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, aux


def data(causal: bool):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = None if causal else torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    return tokens, mask


def assert_same_training(model, causal: bool) -> None:
    tokens, mask = data(causal)
    out_r, grads_r, aux_r = run(model, causal, tokens, mask, recompute=True)
    out_p, grads_p, aux_p = run(model, causal, tokens, mask, recompute=False)
    assert torch.equal(out_r, out_p), "the Function's forward is the plain forward"
    assert grads_r.keys() == grads_p.keys() and grads_p
    for name in grads_p:
        torch.testing.assert_close(grads_r[name], grads_p[name], atol=1e-10, rtol=1e-8, msg=name)
    assert aux_r.keys() == aux_p.keys()
    for name in aux_p:
        torch.testing.assert_close(aux_r[name], aux_p[name], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_recomputed_gradients_equal_plain_autograd_in_float64(name, causal):
    """With dropout (so the RNG replay matters), padding (classifiers), the classifier's CLS global token
    where the mechanism has global tokens, one attention layer shared by both depths and per-depth
    feed-forwards (gradients summed over the depths that use a weight), and a chunked feed-forward."""
    model = tiny(name, causal, depth=2, reversible=True, dropout=0.1, share="attention", ff_chunks=2).double().train()
    assert_same_training(model, causal)


def test_recomputed_gradients_with_every_sharing_mode():
    for share in ("none", "all", "ffn"):
        assert_same_training(tiny("vanilla", False, reversible=True, dropout=0.1, share=share).double().train(), False)


@pytest.mark.parametrize("name", CAUSAL)
def test_reversible_decoding_carries_per_layer_states_and_equals_full_forwards(name, greedy_by_full_forwards):
    lm = tiny(name, True, depth=2, reversible=True).double()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(lm.generate(prompt, max_new_tokens=4, top_k=1), greedy_by_full_forwards(lm, prompt, 4))
    x = lm.embed(prompt)
    _, states = lm.stack(x, return_states=True)
    assert len(states) == 2


def test_reversible_equations_and_output():
    """Y1 = X1 + f(X2), Y2 = X2 + g(Y1) from X1 = X2 = x; the stack returns LN((Y1 + Y2) / 2)."""
    torch.manual_seed(0)
    stack = et.models.TransformerStack(DIM, 2, HEADS, reversible=True).double()
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    x1 = x2 = x
    for block in stack.blocks:
        x1 = x1 + block.attn(block.norm1(x2))
        x2 = x2 + block.ff(block.norm2(x1))
    torch.testing.assert_close(stack(x), stack.final_norm((x1 + x2) / 2))
    xg = x.clone().requires_grad_()
    stack(xg).sum().backward()  # the input's gradient through the Function
    xp = x.clone().requires_grad_()
    stack.recompute = False
    stack(xp).sum().backward()
    torch.testing.assert_close(xg.grad, xp.grad, atol=1e-12, rtol=1e-10)


def test_aux_losses_get_their_gradients_through_the_recomputation(aux_reporting_vanilla):
    model = tiny("vanilla", False, reversible=True, dropout=0.1, share="attention").double().train()
    tokens, mask = data(False)
    _, _, aux = run(model, False, tokens, mask, recompute=True)
    assert set(aux) == {"value_energy"} and aux["value_energy"].requires_grad
    assert_same_training(model, False)


def test_layers_that_update_buffers_in_training_are_replayed_with_the_buffers_of_their_call(monkeypatch):
    """A layer whose output depends on a buffer it changes at every training call (as Performer's
    feature redraw does) gets, when recomputed, the buffer value of the original call."""
    card = dataclasses.replace(et.card("vanilla"), updates_buffers_in_training=True)
    monkeypatch.setitem(registry._REGISTRY, "vanilla", (card, VanillaAttention))
    monkeypatch.setattr(VanillaAttention, "card", card)
    plain = VanillaAttention._attend

    def _attend(self, q, k, v, mask, state, **extra):
        if not hasattr(self, "calls"):
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        if self.training:
            self.calls += 1
        out, state = plain(self, q, k, v, mask, state, **extra)
        return out * (1 + 0.1 * self.calls), state

    monkeypatch.setattr(VanillaAttention, "_attend", _attend)
    model = tiny("vanilla", False, reversible=True, share="all").double().train()
    tokens, mask = data(False)
    model(tokens, mask)  # creates the buffer
    for m in model.modules():
        if hasattr(m, "calls"):
            m.calls.zero_()
    _, grads_r, _ = run(model, False, tokens, mask, recompute=True)
    after = [m.calls.item() for m in model.modules() if hasattr(m, "calls")]
    assert after == [3.0], "three depth calls of the one shared layer; the recomputation left no trace"
    for m in model.modules():
        if hasattr(m, "calls"):
            m.calls.zero_()
    _, grads_p, _ = run(model, False, tokens, mask, recompute=False)
    for name in grads_p:
        torch.testing.assert_close(grads_r[name], grads_p[name], atol=1e-10, rtol=1e-8)


def test_saved_activations_do_not_grow_with_depth():
    n = 64
    tokens = torch.randint(0, VOCAB, (2, n))
    saved = {}
    for reversible in (False, True):
        for depth in (2, 8):
            torch.manual_seed(0)
            clf = et.TransformerClassifier(VOCAB, 3, dim=32, depth=depth, heads=HEADS, max_seq_len=n,
                                           reversible=reversible)
            saved[reversible, depth] = saved_activation_bytes(clf, tokens)
    assert saved[True, 8] == saved[True, 2] < saved[False, 2] / 2
    assert saved[False, 8] > 3 * saved[False, 2]


def test_chunked_feed_forward_gives_the_same_numbers():
    torch.manual_seed(0)
    ff = et.models.FeedForward(DIM, 4 * DIM, chunks=3).double()
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    whole = ff.net(x)
    torch.testing.assert_close(ff(x), whole, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(ff(x[:, :2]), ff.net(x[:, :2]), atol=1e-14, rtol=1e-12)  # fewer tokens than chunks


def test_bad_reversible_and_chunk_values_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"ff_chunks must be an int >= 1 .*got 0"):
        tiny("vanilla", True, ff_chunks=0)
    with pytest.raises(ValueError, match="ff_chunks.*got 2.5"):
        tiny("vanilla", False, ff_chunks=2.5)
    with pytest.raises(ValueError, match="reversible=True needs norm='pre'.*norm='post'"):
        tiny("vanilla", True, reversible=True, norm="post")
    with pytest.raises(ValueError, match="reversible must be a bool, got 'yes'"):
        tiny("vanilla", False, reversible="yes")
