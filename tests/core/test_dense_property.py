"""Property test: exact dense attention equals the float64 reference for any shape, mask and offset."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_transformers.core import dense_attention, reference_attention


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3), nq=st.integers(1, 9), extra=st.integers(0, 6),
    d=st.sampled_from([1, 4, 8]), causal=st.booleans(), use_mask=st.booleans(), seed=st.integers(0, 2**16),
    backend=st.sampled_from(["sdpa", "math"]),
)
def test_dense_attention_matches_reference(batch, heads, nq, extra, d, causal, use_mask, seed, backend):
    g = torch.Generator().manual_seed(seed)
    nk = nq + extra
    q = torch.randn(batch, heads, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, nk, d, generator=g, dtype=torch.float64)
    key_mask = (torch.rand(batch, nk, generator=g) > 0.4) if use_mask else None
    out = dense_attention(q, k, v, key_mask=key_mask, causal=causal, query_offset=extra, backend=backend)
    ref = reference_attention(q, k, v, key_mask=key_mask, causal=causal, query_offset=extra)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
