"""The speed-up ceiling's product-only steps are a lower bound on the real layers' products."""

import pytest

from efficient_transformers.bench.ceiling import main, performer_products, sdpa_step
from efficient_transformers.bench.harness import Workload, build_layer, count_flops, make_step

N, DIM, HEADS, FEATURES, CHUNK = 128, 32, 2, 24, 16


def _layer_flops(mechanism: str, causal: bool, **options) -> int:
    work = Workload(mechanism, N, "train", dim=DIM, heads=HEADS, causal=causal, options=options)
    return count_flops(make_step(build_layer(work), work))


@pytest.mark.parametrize("causal", [False, True])
def test_performer_products_are_the_layers_products_without_recomputation(causal):
    d, H, m, C = DIM // HEADS, HEADS, FEATURES, CHUNK
    projections = 3 * 8 * N * DIM * DIM  # q/k/v and out: 2 N D (3D + D) forward, twice that backward
    features = 4 * 2 * N * m * d * H  # phi's projections of q, k and their two backward products
    state = 6 * 2 * N * m * (d + 1) * H  # phi(K)^T [V 1], phi(Q) S and their four backward products
    intra = 3 * 2 * N * C * m * H + 3 * 2 * N * C * (d + 1) * H if causal else 0  # the chunk-local triangle
    products = count_flops(performer_products(N, DIM, HEADS, FEATURES, causal=causal, chunk_size=CHUNK))
    assert products == projections + features + state + intra
    # the real layer does the same products, plus what its backward pass recomputes: the features
    # (2 of the 4 feature units) and, when causal, the intra-chunk scores and the chunk summaries
    options = {"nb_features": FEATURES, **({"chunk_size": CHUNK} if causal else {})}
    layer = _layer_flops("performer", causal, **options)
    recomputed = features // 2 + (2 * N * C * m * H + 2 * N * m * (d + 1) * H if causal else 0)
    assert products <= layer <= products + recomputed


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_step_has_vanillas_products(causal):
    assert count_flops(sdpa_step(N, DIM, HEADS, causal=causal)) == _layer_flops("vanilla", causal)


def test_ceiling_command_prints_a_table(capsys):
    assert main(["--lengths", "64", "--features", "8,16", "--dim", "16", "--heads", "2", "--repeats", "1",
                 "--chunk-size", "16", "--causal"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("| 64 |") and lines[-1].count("x)") == 2
