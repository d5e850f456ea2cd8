"""Set Transformer model: MAB / SAB / ISAB / PMA against plainly written formulas, permutation
invariance (the paper's test), sets of different sizes through the mask, a tiny max-of-set task, bad options."""

import pytest
import torch
from torch import nn

from efficient_transformers.models.set_transformer import ISAB, MAB, PMA, SAB, SetTransformer

DIM, HEADS, D = 16, 2, 8


def inputs(batch, n, width=DIM, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, width, generator=g, dtype=torch.float64)


def sizes_mask(sizes, n):
    return torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]  # (B, N): sets of these sizes


def lin(linear, t):
    return t @ linear.weight.T + linear.bias


def plain_mha(mha, x, y, keep):
    """concat_h softmax(x W_q (y W_k)^T / sqrt(d)) y W_v, then W_o; x (n, dim), y (N, dim), keep (N,)."""
    q, kv = lin(mha.to_q, x), lin(mha.to_kv, y)
    k, v = kv[:, :DIM], kv[:, DIM:]
    heads = []
    for h in range(HEADS):
        c = slice(h * D, (h + 1) * D)
        scores = (q[:, c] @ k[:, c].T / D**0.5).masked_fill(~keep, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, c])
    return lin(mha.to_out, torch.cat(heads, dim=-1))


def plain_ln(ln, t):
    if isinstance(ln, nn.Identity):
        return t
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def plain_rff(rff, t):
    first, _, second = rff.net
    return lin(second, torch.relu(lin(first, t)))


def plain_mab(mab, x, y, keep):
    """MAB(X, Y) = LN(H + rFF(H)), H = LN(X + MHA(X, Y, Y)), for one item."""
    h = plain_ln(mab.norm1, x + plain_mha(mab.attn, x, y, keep))
    return plain_ln(mab.norm2, h + plain_rff(mab.rff, h))


@pytest.mark.parametrize("layer_norm", [True, False])
def test_blocks_equal_their_plain_formulas(layer_norm):
    torch.manual_seed(0)
    n = 7
    x = inputs(2, n)
    mask = sizes_mask([7, 4], n)
    mab = MAB(DIM, HEADS, ff_mult=2, layer_norm=layer_norm).double()
    sab = SAB(DIM, HEADS, layer_norm=layer_norm).double()
    isab = ISAB(DIM, HEADS, num_inducing=9, layer_norm=layer_norm).double()  # m >= N
    isab_small = ISAB(DIM, HEADS, num_inducing=3, layer_norm=layer_norm).double()  # m < N
    pma = PMA(DIM, HEADS, num_seeds=2, layer_norm=layer_norm).double()
    y = inputs(2, n, seed=5)
    x.requires_grad_()
    got = {"mab": mab(x, y, mask), "sab": sab(x, mask), "isab": isab(x, mask), "isab_small": isab_small(x, mask),
           "pma": pma(x, mask)}
    blocks = {"mab": mab, "sab": sab, "isab": isab, "isab_small": isab_small, "pma": pma}
    expected_rows = {name: [] for name in got}
    for b in range(2):
        keep, real = mask[b], mask[b]
        expected = {
            "mab": plain_mab(mab, x[b], y[b], keep),
            "sab": plain_mab(sab.mab, x[b], x[b], keep),
            "pma": plain_mab(pma.mab, pma.seeds[0], plain_rff(pma.rff, x[b]), keep),
        }
        for name, block in (("isab", isab), ("isab_small", isab_small)):
            h = plain_mab(block.summarise, block.inducing[0], x[b], keep)
            expected[name] = plain_mab(block.broadcast, x[b], h, torch.ones(h.shape[0], dtype=torch.bool))
        for name, value in expected.items():
            rows = slice(None) if name in ("pma", "mab") else real
            torch.testing.assert_close(got[name][b][rows], value[rows], atol=1e-12, rtol=1e-12, msg=name)
            expected_rows[name].append(value[rows])
    # gradients (input and every parameter) through the real rows equal those of the plain formulas
    for name, block in blocks.items():
        rows = (lambda t: t.flatten(0, 1)) if name in ("pma", "mab") else (lambda t: t[mask])
        ref = torch.cat(expected_rows[name])  # the real rows of both items, in order
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        params = [x, *block.parameters()]
        grads = torch.autograd.grad((rows(got[name]) * w).sum(), params)
        expected_grads = torch.autograd.grad((ref * w).sum(), params)
        for p, a, e in zip(["x", *(n for n, _ in block.named_parameters())], grads, expected_grads):
            torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11, msg=f"{name}: d/d{p}")


def test_model_equals_its_composition_and_gradients_flow():
    torch.manual_seed(0)
    model = SetTransformer(3, 2, dim=DIM, heads=HEADS, depth=2, num_inducing=4, num_seeds=2).double()
    x = inputs(2, 6, width=3).requires_grad_()
    mask = sizes_mask([6, 3], 6)
    out = model(x, mask)
    assert out.shape == (2, 2, 2)
    h = model.embed(x)
    for block in model.encoder:
        h = block(h, mask)
    manual = model.head(model.decoder_sab(model.pool(h, mask)))
    torch.testing.assert_close(out, manual, atol=0, rtol=0)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("encoder", ["isab", "sab"])
def test_output_is_permutation_invariant_and_blocks_equivariant(encoder):
    torch.manual_seed(0)
    model = SetTransformer(4, 3, dim=DIM, heads=HEADS, encoder=encoder, num_inducing=5).double()
    n = 11
    x, mask = inputs(3, n, width=4), sizes_mask([11, 8, 5], n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x[:, perm], mask[:, perm]), model(x, mask), atol=1e-12, rtol=1e-12)
    block = model.encoder[0]
    h = model.embed(x)
    y, y_perm = block(h, mask), block(h[:, perm], mask[:, perm])
    torch.testing.assert_close(y_perm[mask[:, perm]], y[:, perm][mask[:, perm]], atol=1e-12, rtol=1e-12)


def test_pma_pools_a_permuted_padded_set_to_the_same_vectors():
    torch.manual_seed(0)
    pma = PMA(DIM, HEADS, num_seeds=3).double()
    n = 10
    x, mask = inputs(3, n), sizes_mask([10, 7, 1], n)
    pooled = pma(x, mask)  # (B, k, dim)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pma(x[:, perm], mask[:, perm]), pooled, atol=1e-12, rtol=1e-12)
    x2 = x.clone()
    x2[~mask] = -1e3
    torch.testing.assert_close(pma(x2, mask), pooled, atol=1e-12, rtol=1e-12)
    for b, size in enumerate([10, 7, 1]):
        torch.testing.assert_close(pma(x[b:b + 1, :size]), pooled[b:b + 1], atol=1e-12, rtol=1e-12)


def test_sets_of_different_sizes_in_one_batch_equal_each_set_alone():
    torch.manual_seed(0)
    model = SetTransformer(4, 3, dim=DIM, heads=HEADS, num_inducing=4).double()
    n, sizes = 9, [9, 6, 2]
    x, mask = inputs(3, n, width=4), sizes_mask(sizes, n)
    out = model(x, mask)
    x2 = x.clone()
    x2[~mask] = 1e3  # padded content changes nothing
    torch.testing.assert_close(model(x2, mask), out, atol=1e-12, rtol=1e-12)
    for b, size in enumerate(sizes):
        torch.testing.assert_close(model(x[b:b + 1, :size]), out[b:b + 1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model(x[:1], torch.ones(1, n, dtype=torch.bool)), model(x[:1]), atol=0, rtol=0)


def test_a_tiny_max_of_set_regression_learns():
    """The paper's max-regression toy task: predict max(x) of a set of 3..10 reals, trained a few dozen steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: one thread is fastest, and the machine is shared
    try:
        before, after = train_max_of_set(steps=60)
    finally:
        torch.set_num_threads(threads)
    # a constant predictor's MAE is about 0.35 here; learning the max goes well below
    assert after < 0.4 * before and after < 0.25, (before, after)


def train_max_of_set(steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SetTransformer(1, 1, dim=32, heads=4, depth=1, num_inducing=8)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(size=64, n=10):
        x = torch.rand(size, n, 1, generator=g) * 4 - 2
        mask = sizes_mask(torch.randint(3, n + 1, (size,), generator=g).tolist(), n)
        target = x[..., 0].masked_fill(~mask, float("-inf")).amax(dim=1)  # (B,)
        return x, mask, target

    x_eval, mask_eval, target_eval = batch(256)

    def eval_loss():
        with torch.no_grad():
            return (model(x_eval, mask_eval)[:, 0, 0] - target_eval).abs().mean().item()

    before = eval_loss()
    for _ in range(steps):
        x, mask, target = batch()
        loss = (model(x, mask)[:, 0, 0] - target).abs().mean()  # MAE, as the paper
        optim.zero_grad()
        loss.backward()
        optim.step()
    return before, eval_loss()


@pytest.mark.parametrize("kwargs,words", [
    ({"num_inducing": 0}, "num_inducing"),
    ({"num_seeds": -1}, "num_seeds"),
    ({"depth": 0}, "depth"),
    ({"encoder": "pma"}, "encoder"),
    ({"heads": 3}, "heads=3"),
    ({"dim": 2.0}, "dim"),
    ({"ff_mult": True}, "ff_mult"),
    ({"layer_norm": 1}, "layer_norm"),
])
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=f"set_transformer: .*{words}.*allowed"):
        SetTransformer(3, 2, **{"dim": DIM, "heads": HEADS, **kwargs})


def test_bad_inputs_are_refused():
    model = SetTransformer(3, 2, dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="set_transformer: x must be a floating tensor"):
        model(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="set_transformer: x must be .*in_features=3"):
        model(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"set_transformer: mask must be a bool tensor of shape \(B, N\) = \(2, 5\)"):
        model(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="set_transformer: in_features"):
        SetTransformer(0, 2)
    with pytest.raises(ValueError, match="set_transformer: num_inducing"):
        ISAB(DIM, HEADS, num_inducing=0)
    with pytest.raises(ValueError, match="set_transformer: num_seeds"):
        PMA(DIM, HEADS, num_seeds=0)
