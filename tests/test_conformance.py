"""The conformance suite, generated from the registry.

Every registered mechanism is run through every check below in every mode its card declares
(bidirectional and/or causal), the moment it is registered. Cards may declare `test_options`:
options that exercise the layer's structure at the tiny sizes used here (e.g. a block size of 4),
and `causal_test_options` added in causal mode only (e.g. a causal scan's chunk size); otherwise the
card's defaults are used. `test_defaults_work` runs every mechanism once at its default options.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_model, save_model

import efficient_transformers as et
from efficient_transformers.core import reference_attention
from efficient_transformers.registry import mechanism_class

DIM, HEADS = 16, 2
CASES = [(c.name, causal) for c in et.mechanisms() for causal in c.modes]
IDS = [f"{name}-{'causal' if causal else 'bidir'}" for name, causal in CASES]
CAUSAL_CASES = [(n, c) for n, c in CASES if c]
CAUSAL_IDS = [f"{n}-causal" for n, _ in CAUSAL_CASES]
ATTEND_CASES = [(n, c) for n, c in CASES if mechanism_class(n).has_attend]
ATTEND_IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in ATTEND_CASES]
PATTERN_CASES = [(n, c) for n, c in CASES if et.card(n).fixed_pattern]
PATTERN_IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in PATTERN_CASES]


GLOBAL_CASES = [(n, c) for n, c in CASES if et.card(n).global_tokens and not c]  # global tokens: encoders
GLOBAL_IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in GLOBAL_CASES]


def small_options(name: str, causal: bool) -> dict:
    return et.card(name).small_options(causal)


def build(name: str, causal: bool, *, seed: int = 0, dim: int = DIM, heads: int = HEADS, dtype=torch.float32, **extra):
    torch.manual_seed(seed)
    layer = et.build_attention(name, dim, heads, causal, **{**small_options(name, causal), **extra})
    return layer.to(dtype)


def inputs(batch: int, n: int, *, seed: int = 1, dim: int = DIM, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, dim, generator=g).to(dtype)


def scattered_mask(batch: int, n: int, seed: int = 2) -> torch.Tensor:
    """Item 0 all real, item 1 right-padded, item 2 random holes (the first token always real)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.bool)
    if batch > 1:
        mask[1, max(1, n - n // 3) :] = False
    if batch > 2:
        mask[2] = torch.rand(n, generator=g) > 0.35
        mask[2, 0] = True
    return mask


# ----------------------------------------------------------------------------- the card
@pytest.mark.parametrize("name", [c.name for c in et.mechanisms()])
def test_card_options_are_exactly_the_constructor_keyword_defaults(name):
    card = et.card(name)
    params = inspect.signature(mechanism_class(name).__init__).parameters
    defaults = {p: v.default for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    assert card.options == defaults, f"{name}: card options {card.options} vs constructor defaults {defaults}"
    assert set(card.test_options) <= set(card.options) and set(card.causal_test_options) <= set(card.options)
    assert card.causal or card.bidirectional
    assert card.title and card.paper and 2015 <= card.year <= 2030 and card.complexity.startswith("O(")


# ----------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_defaults_work(name, causal):
    """Every mechanism at its default options (not only the suite's small ones): length 300, head dim
    16, padding; finite outputs and gradients, padding-independent real outputs, causality."""
    torch.manual_seed(0)
    dim, n = 32, 300
    layer = et.build_attention(name, dim, 2, causal)
    x = inputs(2, n, dim=dim).requires_grad_()
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 250:] = False
    y = layer(x, mask)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
    x2 = x.detach().clone()
    x2[1, 250:] = 50.0
    if causal:
        x2[0, 200:] = -50.0  # the future of position 199
    with torch.no_grad():
        y2 = layer(x2, mask)
    torch.testing.assert_close(y2[1, :250], y[1, :250].detach(), atol=1e-4, rtol=1e-4)
    if causal:
        torch.testing.assert_close(y2[0, :200], y[0, :200].detach(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- shapes, batch independence
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
@pytest.mark.parametrize("n", [1, 7, 130])
def test_any_length_and_batch_items_are_independent(name, causal, n):
    layer = build(name, causal)
    x = inputs(3, n)
    y = layer(x)
    assert y.shape == (3, n, DIM) and torch.isfinite(y).all()
    alone = layer(x[1:2])  # the same item computed alone
    torch.testing.assert_close(y[1:2], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
@pytest.mark.parametrize("n", [HEADS, DIM // HEADS, 9, 37])  # N == H and N == d catch axis guesses
def test_real_outputs_do_not_depend_on_padded_content(name, causal, n):
    layer = build(name, causal)
    x = inputs(3, n)
    mask = scattered_mask(3, n)
    y = layer(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), DIM) * 100.0
    y2 = layer(x2, mask)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    torch.testing.assert_close(y[mask], y2[mask], atol=1e-4, rtol=1e-4)
    # an all-real item gives the same outputs with an all-True mask as without a mask
    torch.testing.assert_close(y[0], layer(x[0:1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", ATTEND_CASES, ids=ATTEND_IDS)
@pytest.mark.parametrize("n", [HEADS, DIM // HEADS, 11])  # N == H and N == d catch axis guesses
def test_attend_real_outputs_do_not_depend_on_padded_keys(name, causal, n):
    layer = build(name, causal)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, HEADS, n, DIM // HEADS, generator=g) for _ in range(3))
    mask = scattered_mask(3, n)
    mask[1, -1] = False  # at least one padded key even when n is tiny
    out, _ = layer.attend(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    pad = ~mask[:, None, :, None].expand_as(k)
    k2[pad], v2[pad] = 30.0, -30.0
    out2, _ = layer.attend(q, k2, v2, mask)
    real = mask[:, None, :, None].expand_as(out)
    assert torch.isfinite(out2).all()
    torch.testing.assert_close(out2[real], out[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", ATTEND_CASES, ids=ATTEND_IDS)
def test_a_row_with_nothing_to_attend_gives_zeros(name, causal):
    layer = build(name, causal)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, HEADS, 11, DIM // HEADS, generator=g) for _ in range(3))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1] = False  # item 1: every key is padding
    out, _ = layer.attend(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name,causal", CAUSAL_CASES, ids=CAUSAL_IDS)
@pytest.mark.parametrize("t", [0, 5, 17, 28])
def test_causal_outputs_ignore_the_future_exactly(name, causal, t):
    layer = build(name, causal)
    n = 30
    x = inputs(2, n)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, n - t - 1, DIM) * 10.0
    y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), "outputs before t changed when inputs after t changed"
    if t < n - 1:
        assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])


# ----------------------------------------------------------------------------- the dense reference
@pytest.mark.parametrize("name,causal", PATTERN_CASES, ids=PATTERN_IDS)
@pytest.mark.parametrize("n", [1, 7, 37])
def test_attend_equals_dense_attention_on_its_pattern(name, causal, n):
    layer = build(name, causal, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, HEADS, n, DIM // HEADS, generator=g, dtype=torch.float64) for _ in range(3))
    mask = scattered_mask(3, n)
    pattern = layer.dense_mask(n)  # (N, N), or (H, N, N) when heads attend different patterns
    assert pattern.shape in ((n, n), (HEADS, n, n)) and pattern.dtype == torch.bool
    if causal:
        assert not torch.triu(pattern, diagonal=1).any(), "a causal pattern must not allow future keys"
    out, _ = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, pattern=pattern, key_mask=mask)
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_gradcheck(name, causal):
    layer = build(name, causal, dim=8, heads=2, dtype=torch.float64)
    x = inputs(2, 6, dim=8, dtype=torch.float64).requires_grad_()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    assert torch.autograd.gradcheck(lambda t: layer(t, mask), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name,causal", CAUSAL_CASES, ids=CAUSAL_IDS)
def test_token_by_token_decoding_equals_the_parallel_form(name, causal, decode_in_steps):
    layer = build(name, causal, dtype=torch.float64)
    x = inputs(2, 23, dtype=torch.float64)
    full = layer(x)
    stepped, _ = decode_in_steps(layer, x, 6)
    y, state = layer(x[:, :4], return_state=True)  # a multi-token step after a prefill
    y2, _ = layer(x[:, 4:11], state=state, return_state=True)
    torch.testing.assert_close(stepped, full, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(y2, full[:, 4:11], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name,causal", CAUSAL_CASES, ids=CAUSAL_IDS)
def test_generate_greedy_equals_repeated_full_forwards(name, causal, greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=23, dim=DIM, depth=2, heads=HEADS, attention=name,
                          attention_options=small_options(name, True), max_seq_len=64).double()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(5))
    fast = lm.generate(prompt, max_new_tokens=9, top_k=1)
    slow = greedy_by_full_forwards(lm, prompt, 9)
    assert torch.equal(fast, slow)


# ----------------------------------------------------------------------------- determinism and persistence
def buffers(layer) -> dict:
    return {name: b.clone() for name, b in layer.named_buffers()}


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_same_seed_same_output_and_train_equals_eval(name, causal):
    """Eval is pure (no buffer changes, same output twice); train equals eval unless the card says the
    layer updates buffers in training by design (then only eval's purity is required)."""
    a, b = build(name, causal, seed=7), build(name, causal, seed=7)
    x = inputs(2, 19)
    a.eval(), b.eval()
    before = buffers(a)
    ya = a(x)
    assert torch.equal(ya, b(x))
    assert torch.equal(ya, a(x)), "calling the layer in eval must not change it"
    after = buffers(a)
    assert all(torch.equal(before[k], after[k]) for k in before), "eval changed a buffer"
    if et.card(name).updates_buffers_in_training:
        return
    a.train()
    y_train = a(x)
    assert all(torch.equal(before[k], v) for k, v in buffers(a).items()), "training changed a buffer"
    a.eval()
    assert torch.equal(y_train, a(x))


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_safetensors_roundtrip_gives_identical_outputs(name, causal, tmp_path):
    a, b = build(name, causal, seed=1), build(name, causal, seed=2)
    x = inputs(2, 19)
    assert not torch.equal(a(x), b(x))
    save_model(a, str(tmp_path / "layer.safetensors"))
    load_model(b, str(tmp_path / "layer.safetensors"))
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- reduced precision
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_bf16_is_finite_and_close_to_float32(name, causal):
    layer = build(name, causal)
    x = inputs(2, 33)
    mask = scattered_mask(2, 33)
    ref = layer(x, mask)
    low = layer.to(torch.bfloat16)(x.to(torch.bfloat16), mask)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    err = (low.float() - ref)[mask].norm() / ref[mask].norm()
    assert err < 0.05, f"relative error {err:.3g} in bf16"


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_float32_on_onednn_equals_float32_on_pytorchs_products(name, causal, monkeypatch):
    """`EFT_MATMUL=onednn` (every product `core.gemm` routes, whatever its size) against `EFT_MATMUL=torch`:
    the same float32 layer, outputs and input and parameter gradients, with padding."""
    from efficient_transformers.core import gemm

    if not gemm.onednn_usable(torch.float32):
        pytest.skip("oneDNN is not built into this PyTorch")
    results = {}
    for backend in ("torch", "onednn"):
        monkeypatch.setenv("EFT_MATMUL", backend)
        layer = build(name, causal)
        x = inputs(2, 37).requires_grad_()
        mask = scattered_mask(2, 37)
        y = layer(x, mask)
        (y * inputs(2, 37, seed=7)).sum().backward()
        results[backend] = [y.detach(), x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
    assert len(results["torch"]) == len(results["onednn"])
    for i, (a, b) in enumerate(zip(results["torch"], results["onednn"])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{name}: tensor {i} (0: output, 1: input gradient)")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_bad_input_raises_value_errors_naming_the_mechanism(name, causal):
    layer = build(name, causal)
    x = inputs(2, 5)

    def raises(fn, *words):
        with pytest.raises(ValueError) as info:
            fn()
        message = str(info.value)
        assert name in message, message
        for word in words:
            assert word in message, message

    raises(lambda: layer(x[0]), "3-D")
    raises(lambda: layer(inputs(2, 5, dim=DIM + 1)), str(DIM))
    raises(lambda: layer(x.long()), "floating")
    raises(lambda: layer(x, torch.ones(2, 4, dtype=torch.bool)), "(2, 5)")
    raises(lambda: layer(x, torch.ones(2, 5)), "torch.bool")
    raises(lambda: et.build_attention(name, DIM, 3, causal), "heads")
    raises(lambda: et.build_attention(name, DIM, HEADS, causal, definitely_not_an_option=1), "definitely_not_an_option")
    if mechanism_class(name).has_attend:
        q = torch.randn(2, HEADS, 5, DIM // HEADS)
        raises(lambda: layer.attend(q, q, q[..., :3, :]), "share")
        raises(lambda: layer.attend(q[0], q[0], q[0]), "4-D")


# ----------------------------------------------------------------------------- global tokens
@pytest.mark.parametrize("name,causal", [(n, c) for n, c in CASES if not et.card(n).global_tokens],
                         ids=[i for (n, c), i in zip(CASES, IDS) if not et.card(n).global_tokens])
def test_a_global_mask_is_refused_by_mechanisms_without_global_tokens(name, causal):
    layer = build(name, causal)
    x = inputs(2, 5)
    with pytest.raises(ValueError, match=f"{name}: this mechanism has no global tokens.*allowed: global_mask=None"):
        layer(x, global_mask=torch.zeros(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("name,causal", GLOBAL_CASES, ids=GLOBAL_IDS)
def test_global_tokens_keep_padding_out_and_bad_global_masks_are_refused(name, causal):
    layer = build(name, causal)
    n = 37
    x = inputs(3, n)
    mask = scattered_mask(3, n)
    g = torch.zeros(3, n, dtype=torch.bool)
    g[:, 0] = True
    g[1, -1] = True  # a padded position marked global is not global
    y = layer(x, mask, global_mask=g)
    x2 = x.clone()
    x2[~mask] = 100.0
    y2 = layer(x2, mask, global_mask=g)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    torch.testing.assert_close(y[mask], y2[mask], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y[0], layer(x[:1], mask[:1])[0]), "the global token changed nothing"
    with pytest.raises(ValueError, match=f"{name}: global_mask must have shape"):
        layer(x, mask, global_mask=g[:, :-1])
    with pytest.raises(ValueError, match=f"{name}: global_mask must be a bool tensor"):
        layer(x, mask, global_mask=g.float())


@pytest.mark.parametrize("name", [c.name for c in et.mechanisms() if not c.causal])
def test_causal_true_is_refused_for_encoder_only_mechanisms(name):
    with pytest.raises(ValueError, match=f"{name}.*causal=True"):
        et.build_attention(name, DIM, HEADS, causal=True)


@pytest.mark.parametrize(
    "name,causal", [(n, c) for n, c in CASES if "max_seq_len" in et.card(n).options],
    ids=[i for (n, c), i in zip(CASES, IDS) if "max_seq_len" in et.card(n).options],
)
def test_length_above_the_maximum_is_refused(name, causal):
    layer = build(name, causal, max_seq_len=8)
    layer(inputs(1, 8))
    with pytest.raises(ValueError, match=f"{name}.*max_seq_len=8"):
        layer(inputs(1, 9))


def test_unknown_mechanism_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown attention mechanism 'nope'.*vanilla"):
        et.build_attention("nope", DIM, HEADS)
