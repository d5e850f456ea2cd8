"""The ceiling's recorded products (bench/products.py): FLOPs equal hand counts, recomputation is dropped."""

import pytest
import torch

from efficient_transformers.bench import products
from efficient_transformers.core import gemm
from efficient_transformers.bench.ceiling import performer_products
from efficient_transformers.bench.harness import Workload, build_layer, count_flops, make_step, matmul_rate

N, DIM, HEADS, FEATURES, CHUNK = 128, 32, 2, 24, 16
D_HEAD = DIM // HEADS
PROJECTIONS = 3 * 8 * N * DIM * DIM  # q/k/v and out: 2 N D (3D + D) forward, twice that backward


def _recorded(mechanism: str, causal: bool = False, mode: str = "train", **options) -> products.Products:
    work = Workload(mechanism, N, mode, dim=DIM, heads=HEADS, causal=causal, options=options)
    return products.record_products(make_step(build_layer(work), work))


def test_vanilla_is_its_projections_and_six_attention_products():
    recorded = _recorded("vanilla")
    attention = 2 * N * N * D_HEAD * HEADS  # one N x N x d product, all heads
    # forward Q K^T, P V; backward dV, dP, dQ, dK (the backward's Q K^T is a recomputation)
    assert recorded.flops == PROJECTIONS + 6 * attention
    assert recorded.recomputed_flops == attention
    assert {p.op for p in recorded.all if p.recomputed} == {"sdpa:scores QK^T (recomputed)"}


@pytest.mark.parametrize("causal", [False, True])
def test_performer_is_its_hand_count_without_the_recomputed_features(causal):
    d, H, m, C = D_HEAD, HEADS, FEATURES, CHUNK
    features = 4 * 2 * N * m * d * H  # phi's projections of q, k and their two backward products
    state = 6 * 2 * N * m * (d + 1) * H  # phi(K)^T [V 1], phi(Q) S and their four backward products
    intra = 3 * 2 * N * C * m * H + 3 * 2 * N * C * (d + 1) * H if causal else 0  # the chunk-local triangle
    options = {"nb_features": FEATURES, **({"chunk_size": CHUNK} if causal else {})}
    recorded = _recorded("performer", causal, **options)
    assert recorded.flops == PROJECTIONS + features + state + intra
    # the dropped products are exactly what the backward pass recomputes: the features' projections
    # (and, causal, the chunk summaries and intra-chunk scores)
    recomputed = features // 2 + (2 * N * C * m * H + 2 * N * m * (d + 1) * H if causal else 0)
    assert recorded.recomputed_flops == recomputed
    assert all(p.phase == "backward" for p in recorded.all if p.recomputed)
    # and the hand-written Performer ceiling does the same products
    assert count_flops(performer_products(N, DIM, HEADS, FEATURES, causal=causal, chunk_size=CHUNK)) == recorded.flops


def test_a_forward_step_keeps_every_product_and_matches_the_flop_counter():
    recorded = _recorded("performer", mode="forward", nb_features=FEATURES)
    work = Workload("performer", N, "forward", dim=DIM, heads=HEADS, options={"nb_features": FEATURES})
    assert recorded.recomputed_flops == 0 and all(p.phase == "forward" for p in recorded.all)
    assert recorded.flops == count_flops(make_step(build_layer(work), work))


def test_causal_attention_keeps_the_tiles_at_or_below_the_diagonal():
    tiles = products._flash_tiles(1024, 1024, causal=True)  # query blocks of 256, key blocks of 512
    assert dict(tiles) == {(256, 256): 2, (256, 512): 4}
    counted = sum(rows * cols * count for (rows, cols), count in tiles.items())
    assert counted == 256 * (256 + 512 + 768 + 1024)  # every key up to each block's last query
    assert sum(r * c * n for (r, c), n in products._flash_tiles(1024, 1024, causal=False).items()) == 1024 * 1024


def test_replay_runs_the_kept_products_on_buffers_of_their_shapes():
    recorded = _recorded("performer", nb_features=FEATURES)
    seen = products.record_products(products.replay(recorded))  # the replay's own products, recorded
    assert seen.flops == recorded.flops and seen.recomputed_flops == 0


def test_gradient_taint_follows_views_and_in_place_writes():
    a = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 4)
    grad = torch.randn(8, 4)

    def step():
        y = a @ w  # forward product
        y.backward(grad)  # backward: grad @ w^T (from the gradient) only

    step.grad_output = grad
    recorded = products.record_products(step)
    assert [(p.phase, p.recomputed) for p in recorded.all] == [("forward", False), ("backward", False)]


def test_in_place_and_out_variants_of_the_products_are_counted():
    a, b = torch.randn(6, 5), torch.randn(5, 3)
    ba, bb = torch.randn(2, 6, 5), torch.randn(2, 5, 3)

    def step():
        torch.zeros(6, 3).addmm_(a, b)                      # 2 * 6 * 3 * 5
        torch.zeros(2, 6, 3).baddbmm_(ba, bb)               # 2 * 2 * 6 * 3 * 5
        torch.zeros(6, 3).addbmm_(ba, bb)                   # 2 * 2 * 6 * 3 * 5
        torch.zeros(6).addmv_(a, torch.randn(5))            # 2 * 6 * 5
        torch.addmm(torch.zeros(6, 3), a, b, out=torch.empty(6, 3))  # 2 * 6 * 3 * 5

    assert products.record_products(step, roots=[]).flops == 2 * (90 + 180 + 180 + 30 + 90)


@pytest.mark.skipif(not gemm.onednn_usable(torch.float32), reason="oneDNN is not built into this PyTorch")
def test_onednn_product_is_the_same_product_as_torch_mm():
    a, b = torch.randn(37, 19, dtype=torch.float32), torch.randn(19, 23, dtype=torch.float32)
    torch.testing.assert_close(gemm.onednn_product(a, b.t().contiguous()), a @ b, rtol=1e-5, atol=1e-5)
    assert not gemm.onednn_usable(torch.float64)  # float64 stays on PyTorch's product


@pytest.mark.parametrize("backend", [None, "torch", "oneDNN"])
def test_replay_on_either_backend_runs_the_same_products(backend):
    recorded = _recorded("performer", nb_features=FEATURES)  # mm, bmm and addbmm products
    assert {p.kind for p in recorded.kept} >= {"mm", "bmm"}
    seen = products.record_products(products.replay(recorded, backend=backend))  # oneDNN's matmul is recorded too
    assert seen.flops == recorded.flops and seen.recomputed_flops == 0
    with pytest.raises(ValueError, match="backend must be"):
        products.replay(recorded, backend="mkl")


def test_the_machine_rate_is_the_faster_backend():
    probe = matmul_rate(size=64, seconds=0.01)
    assert "torch.matmul" in probe["backends"] and probe["gflops"] == max(probe["backends"].values()) > 0
    assert probe["backends"][probe["backend"]] == probe["gflops"]


@pytest.mark.parametrize("kind", ["mm", "bmm", "addbmm"])
@pytest.mark.parametrize("backend", ["torch", "oneDNN"])
def test_every_kind_of_product_replays_with_its_flops_on_either_backend(kind, backend):
    product = products.Product(kind, 1 if kind == "mm" else 3, 8, 5, 4, torch.float32, kind, "forward", repeat=2)
    seen = products.record_products(products.replay([product], backend=backend))
    assert seen.flops == product.flops == 2 * 2 * (1 if kind == "mm" else 3) * 8 * 5 * 4
