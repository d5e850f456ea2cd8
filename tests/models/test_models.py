"""The vanilla Transformer as the survey describes it: LM, classifier, shared stack, generation."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.models.positions import SinusoidalPositions


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none"])
def test_lm_is_causal_and_generation_is_greedy(norm, positional, greedy_by_full_forwards):
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=31, dim=16, depth=2, heads=2, norm=norm, positional=positional, max_seq_len=32).double()
    tokens = torch.randint(0, 31, (2, 12))
    logits = lm(tokens)
    assert logits.shape == (2, 12, 31) and torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 31
    assert torch.equal(lm(changed)[:, :8], logits[:, :8])
    out = lm.generate(tokens[:, :4], max_new_tokens=6, top_k=1)
    slow = greedy_by_full_forwards(lm, tokens[:, :4], 6)
    assert torch.equal(out, slow)


def test_post_norm_block_is_the_original_formula():
    torch.manual_seed(0)
    block = et.models.TransformerBlock(16, 2, norm="post").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    h = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(h + block.ff(h)))
    pre = et.models.TransformerBlock(16, 2, norm="pre").double()
    h = x + pre.attn(pre.norm1(x))
    torch.testing.assert_close(pre(x), h + pre.ff(pre.norm2(h)))


def test_generation_feeds_one_token_per_step_after_the_prefill():
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=11, dim=16, depth=1, heads=2, max_seq_len=64)
    seen = []
    attn = lm.stack.blocks[0].attn
    hook = attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    lm.generate(torch.zeros(1, 7, dtype=torch.long), max_new_tokens=5, top_k=1)
    hook.remove()
    assert seen == [7, 1, 1, 1, 1]


def test_sampling_respects_top_k_and_the_generator():
    torch.manual_seed(0)
    lm = et.TransformerLM(vocab_size=50, dim=16, depth=1, heads=2, max_seq_len=64)
    prompt = torch.zeros(4, 2, dtype=torch.long)
    a = lm.generate(prompt, 8, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = lm.generate(prompt, 8, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with torch.no_grad():
        for t in range(2, 10):
            top3 = lm(a[:, :t])[:, -1].topk(3).indices
            assert (top3 == a[:, t : t + 1]).any(-1).all()


def test_generation_arguments_are_checked():
    lm = et.TransformerLM(vocab_size=11, dim=16, depth=1, heads=2, max_seq_len=8)
    p = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        lm.generate(p, max_new_tokens=6)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(p, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        lm.generate(p, 2, top_k=0)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        lm(torch.full((1, 3), 11))
    with pytest.raises(ValueError, match="integer"):
        lm(torch.zeros(1, 3))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_ignores_padding(pooling):
    torch.manual_seed(0)
    clf = et.TransformerClassifier(vocab_size=20, num_classes=3, dim=16, depth=2, heads=2, pooling=pooling, max_seq_len=16)
    tokens = torch.randint(1, 20, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    logits = clf(tokens, mask)
    changed = tokens.clone()
    changed[1, 6:] = 0
    torch.testing.assert_close(clf(changed, mask), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clf(tokens[1:2, :6])[0], logits[1], atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, 3)


def test_sinusoidal_positions_formula():
    pe = SinusoidalPositions(6)(4)
    for pos in range(4):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_model_configuration_errors():
    with pytest.raises(ValueError, match="norm placement 'mid'"):
        et.TransformerLM(vocab_size=5, dim=16, depth=1, heads=2, norm="mid")
    with pytest.raises(ValueError, match="positional encoding 'rope'"):
        et.TransformerLM(vocab_size=5, dim=16, depth=1, heads=2, positional="rope")
    with pytest.raises(ValueError, match="pooling 'max'"):
        et.TransformerClassifier(vocab_size=5, num_classes=2, dim=16, depth=1, heads=2, pooling="max")
    with pytest.raises(ValueError, match="vanilla.*unknown option"):
        et.TransformerLM(vocab_size=5, dim=16, depth=1, heads=2, attention_options={"window": 3})
    with pytest.raises(ValueError, match="heads=3 does not divide dim=16"):
        et.TransformerLM(vocab_size=5, dim=16, depth=1, heads=3)
