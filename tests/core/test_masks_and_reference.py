"""The shared primitives: masked softmax, the dense reference, blocking."""

import torch

from efficient_transformers.core import (
    causal_allowed, masked_softmax, merge_blocks, pad_mask_to_multiple, pad_to_multiple, reference_attention,
    split_blocks,
)


def test_masked_softmax_zero_rows_and_no_nan_gradient():
    scores = torch.randn(2, 3, 4, requires_grad=True)
    allowed = torch.ones(2, 3, 4, dtype=torch.bool)
    allowed[1, 2] = False
    allowed[0, 0, :2] = False
    w = masked_softmax(scores, allowed)
    assert torch.equal(w[1, 2], torch.zeros(4))
    assert torch.equal(w[0, 0, :2], torch.zeros(2))
    torch.testing.assert_close(w[0].sum(-1), torch.ones(3))
    w.square().sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_reference_is_the_textbook_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = reference_attention(q, k, v, causal=True)
    for i in range(5):
        s = torch.stack([q[0, 0, i] @ k[0, 0, j] / 3**0.5 for j in range(i + 1)])
        w = torch.exp(s - s.max())
        w = w / w.sum()
        expected = sum(w[j] * v[0, 0, j] for j in range(i + 1))
        torch.testing.assert_close(out[0, 0, i], expected)


def test_causal_allowed_with_offset():
    a = causal_allowed(2, 5, query_offset=3)
    assert a.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_padding_and_blocking_roundtrip():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    padded, pad = pad_to_multiple(x, 4)
    assert pad == 1 and padded.shape == (2, 8, 3) and torch.equal(padded[:, :7], x) and torch.equal(padded[:, 7], torch.zeros(2, 3))
    blocks = split_blocks(padded, 4)
    assert blocks.shape == (2, 2, 4, 3) and torch.equal(blocks[:, 1, 0], x[:, 4])
    assert torch.equal(merge_blocks(blocks), padded)
    mask = pad_mask_to_multiple(None, 7, 4, 2, "cpu")
    assert mask.tolist() == [[True] * 7 + [False]] * 2
