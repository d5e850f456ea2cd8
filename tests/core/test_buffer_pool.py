"""`core.buffer_pool`: large CPU buffers reused across steps, never while anything still holds them."""

import threading

import pytest
import torch

from efficient_transformers import build_attention
from efficient_transformers.core import buffer_pool

BIG = (512, 1024)  # 2 MiB of float32: pooled
BIG_BYTES = 512 * 1024 * 4


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.delenv(buffer_pool.POOL_ENV, raising=False)
    buffer_pool.clear()
    yield
    buffer_pool.clear()


def storage_address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_freed_buffer_is_handed_out_again_and_a_live_one_never():
    a = buffer_pool.empty(BIG, torch.float32)
    assert a.shape == BIG and a.dtype == torch.float32 and a.is_contiguous() and a.stride() == (1024, 1)
    b = buffer_pool.empty(BIG, torch.float32)  # a is alive: another storage
    assert storage_address(b) != storage_address(a)
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(a == 1.0) and torch.all(b == 2.0)  # no sharing
    address = storage_address(a)
    del a
    c = buffer_pool.empty((1024, 512), torch.float32)  # same bytes, other shape: a's storage again
    assert storage_address(c) == address and c.shape == (1024, 512)
    assert buffer_pool.retained_bytes() == 2 * BIG_BYTES


def test_a_view_a_grad_or_a_saved_tensor_keeps_the_buffer_busy():
    a = buffer_pool.empty(BIG, torch.float32)
    address = storage_address(a)
    view = a[:3].t()
    del a
    other = buffer_pool.empty(BIG, torch.float32)
    assert storage_address(other) != address  # the view holds it
    del view
    assert storage_address(buffer_pool.empty(BIG, torch.float32)) == address
    del other
    buffer_pool.clear()

    saved = buffer_pool.empty(BIG, torch.float32).fill_(3.0)
    address = storage_address(saved)
    w = torch.ones(BIG, requires_grad=True)
    loss = (w * saved).sum()  # the graph saves `saved`
    del saved
    held = buffer_pool.empty(BIG, torch.float32)
    assert storage_address(held) != address
    loss.backward()
    assert torch.all(w.grad == 3.0)  # the saved values survived
    del loss
    assert storage_address(buffer_pool.empty(BIG, torch.float32)) == address  # the graph is gone


def test_small_non_cpu_and_deterministic_requests_are_ordinary_tensors():
    small = buffer_pool.empty((16, 16), torch.float32)
    assert small.shape == (16, 16) and buffer_pool.retained_bytes() == 0
    meta = buffer_pool.empty(BIG, torch.float32, "meta")
    assert meta.device.type == "meta" and buffer_pool.retained_bytes() == 0
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        torch.utils.deterministic.fill_uninitialized_memory = True
        filled = buffer_pool.empty(BIG, torch.float32)
        assert torch.isnan(filled).all() and buffer_pool.retained_bytes() == 0  # PyTorch's contract kept
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_the_limit_evicts_free_buffers_first_and_is_checked(monkeypatch):
    monkeypatch.setenv(buffer_pool.POOL_ENV, str(2 * BIG_BYTES / 2**20))  # room for two
    a = buffer_pool.empty(BIG, torch.float32)
    b = buffer_pool.empty(BIG, torch.float32)
    c = buffer_pool.empty(BIG, torch.float32)  # both kept ones are busy: ordinary memory
    assert buffer_pool.retained_bytes() == 2 * BIG_BYTES
    del a
    d = buffer_pool.empty((4, 1024, 1024), torch.uint8)  # 4 MiB: evicts the free one, still over: ordinary
    assert buffer_pool.retained_bytes() == BIG_BYTES
    del b, c, d
    e = buffer_pool.empty((2, 1024, 1024), torch.float32)  # 8 MiB > the limit
    assert buffer_pool.retained_bytes() <= 2 * BIG_BYTES and e.shape == (2, 1024, 1024)
    monkeypatch.setenv(buffer_pool.POOL_ENV, "0")
    buffer_pool.clear()
    buffer_pool.empty(BIG, torch.float32)
    assert buffer_pool.retained_bytes() == 0  # 0: off
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(buffer_pool.POOL_ENV, bad)
        with pytest.raises(ValueError, match=r"EFT_BUFFER_POOL_MIB=.*expected a number of MiB >= 0"):
            buffer_pool.empty(BIG, torch.float32)


def test_threads_are_never_handed_the_same_buffer():
    seen, errors = [], []

    def take():
        try:
            for _ in range(50):
                t = buffer_pool.empty(BIG, torch.float32)
                marker = float(threading.get_ident() % 1000)
                t.fill_(marker)
                seen.append(storage_address(t))
                if not torch.all(t == marker):
                    errors.append("shared")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 200
    assert buffer_pool.retained_bytes() <= 8 * BIG_BYTES  # reused, not one per request


@pytest.mark.parametrize("causal", [False, True])
def test_steps_on_reused_buffers_compute_what_fresh_buffers_compute(monkeypatch, causal):
    """Two train steps of a layer whose buffers are pooled equal those with the pool off, bit for bit,
    and the second step reuses the first one's storages (nothing new is kept)."""
    torch.manual_seed(0)
    chunks = {"chunk_size": 32} if causal else {}
    layer = build_attention("performer", dim=64, heads=2, causal=causal, nb_features=32, **chunks)
    x = torch.randn(2, 2048, 64, requires_grad=True)  # (B, N, dim): 1 MiB and more per buffer

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.square().sum().backward()
        return out.detach().clone(), x.grad.clone(), layer.to_qkv.weight.grad.clone()

    monkeypatch.setenv(buffer_pool.POOL_ENV, "0")
    fresh = step()
    monkeypatch.delenv(buffer_pool.POOL_ENV)
    first = step()
    kept = buffer_pool.retained_bytes()
    assert kept > 0
    second = step()
    assert buffer_pool.retained_bytes() == kept
    for reference, a, b in zip(fresh, first, second):
        assert torch.equal(reference, a) and torch.equal(reference, b)
