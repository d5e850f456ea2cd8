"""Test session set-up: one torch thread per xdist worker (CI runs `-n 2` on 2 cores)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def _greedy_by_full_forwards(lm, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The slow reference for generation: re-run the whole sequence for every new token, take the argmax."""
    out = prompt
    with torch.no_grad():
        for _ in range(steps):
            out = torch.cat([out, lm(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.fixture
def greedy_by_full_forwards():
    return _greedy_by_full_forwards


def _decode_in_steps(layer, x: torch.Tensor, prefill: int, on_step=None):
    """Run a causal layer on x[:, :prefill], then one token at a time with the carried state; returns
    (the outputs concatenated along N, the final state). `on_step(state)` sees each state."""
    y, state = layer(x[:, :prefill], return_state=True)
    outs = [y]
    for t in range(prefill, x.shape[1]):
        y, state = layer(x[:, t : t + 1], state=state, return_state=True)
        outs.append(y)
        if on_step is not None:
            on_step(state)
    return torch.cat(outs, dim=1), state


@pytest.fixture
def decode_in_steps():
    return _decode_in_steps


@pytest.fixture
def aux_reporting_vanilla(monkeypatch):
    """Vanilla layers that report an auxiliary loss: the mean square of their values, weight 0.25."""
    from efficient_transformers.attention.vanilla import VanillaAttention

    plain = VanillaAttention._attend

    def _attend(self, q, k, v, mask, state, **extra):
        self.report_aux_loss("value_energy", v.float().square().mean(), weight=0.25)
        return plain(self, q, k, v, mask, state, **extra)

    monkeypatch.setattr(VanillaAttention, "_attend", _attend)



class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns:
    `with largest_tensor() as mode: ...; mode.largest` (for "no tensor grows with N^2" checks)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.fixture
def largest_tensor():
    return LargestTensor


def _attend_matches_dense_pattern(layer, q, k, v, mask, atol=1e-10):
    """layer.attend equals reference_attention on layer.dense_mask(N) at the real positions, outputs and
    q/k/v gradients (float64 inputs with requires_grad)."""
    from efficient_transformers.core import reference_attention

    out, _ = layer.attend(q, k, v, mask)
    ref = reference_attention(q, k, v, pattern=layer.dense_mask(q.shape[-2]), key_mask=mask)
    real = mask[:, None, :, None].expand_as(ref).to(ref.dtype)  # outputs at padded positions are unspecified
    torch.testing.assert_close(out * real, ref * real, atol=atol, rtol=atol)
    w = torch.randn_like(out) * real
    for got, expected in zip(torch.autograd.grad((out * w).sum(), (q, k, v)),
                             torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol)


@pytest.fixture
def attend_matches_dense_pattern():
    return _attend_matches_dense_pattern
