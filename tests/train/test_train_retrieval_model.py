"""RetrievalModel: one shared encoder for both documents and the LRA head MLP([X1, X2, X1*X2, X1-X2])."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et


def _model(**kw) -> et.RetrievalModel:
    torch.manual_seed(0)
    return et.RetrievalModel(vocab_size=20, dim=16, depth=1, heads=2, max_seq_len=24, **kw).eval()


def test_logits_are_the_head_of_the_paper_features():
    model = _model()
    a, b = torch.randint(1, 20, (3, 10)), torch.randint(1, 20, (3, 7))
    with torch.no_grad():
        x1, x2 = model.encoder(a), model.encoder(b)  # (3, 16) each
        expected = model.head(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))
        assert torch.allclose(model(a, b), expected, atol=1e-6)
    assert model.head[0].in_features == 4 * 16


def test_one_encoder_is_shared_by_both_towers():
    model = _model()
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    head_params = sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for p in model.parameters()) == encoder_params + head_params
    a = torch.randint(1, 20, (2, 9))
    with torch.no_grad():
        x1, x2 = model.encode_pair(a, a.clone())
    assert torch.equal(x1, x2)


def test_equal_length_documents_batched_together_match_separate_encoding():
    model = _model()
    a, b = torch.randint(1, 20, (4, 12)), torch.randint(1, 20, (4, 12))
    mask_a = torch.arange(12)[None] < torch.tensor([12, 9, 5, 12])[:, None]  # (4, 12)
    mask_b = torch.arange(12)[None] < torch.tensor([3, 12, 12, 8])[:, None]
    with torch.no_grad():
        x1, x2 = model.encode_pair(a, b, mask_a, mask_b)
        assert torch.allclose(x1, model.encoder(a, mask_a), atol=1e-5)
        assert torch.allclose(x2, model.encoder(b, mask_b), atol=1e-5)


def test_padding_of_either_document_does_not_change_the_logits():
    model = _model(pooling="mean")
    a, b = torch.randint(1, 20, (2, 8)), torch.randint(1, 20, (2, 6))
    padded_b = torch.cat([b, torch.zeros(2, 5, dtype=torch.long)], dim=1)  # (2, 11)
    mask_b = torch.arange(11)[None].expand(2, -1) < 6
    with torch.no_grad():
        plain = model(a, b)
        padded = model(a, padded_b, torch.ones(2, 8, dtype=torch.bool), mask_b)
    assert torch.allclose(plain, padded, atol=1e-5)


def test_bad_inputs_are_named():
    model = _model()
    a = torch.randint(1, 20, (2, 8))
    with pytest.raises(ValueError, match="masks for both documents or for neither"):
        model(a, a, torch.ones(2, 8, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="same batch size, got 2 and 3"):
        model(a, torch.randint(1, 20, (3, 8)))
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        _model(num_classes=1)
    with pytest.raises(ValueError, match="tokens and tokens2 must be LongTensors"):
        model(a, [1, 2])
