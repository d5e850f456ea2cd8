"""Test session set-up: one torch thread per xdist worker (CI runs `-n 2` on 2 cores)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import pytest  # noqa: E402


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
