"""Same-run comparison with public implementations of the same mechanisms ("peers").

    python -m efficient_transformers.bench.peers --n 4096 16384               # bidirectional
    python -m efficient_transformers.bench.peers --n 4096 16384 --causal      # causal, peers that have it
    python -m efficient_transformers.bench.peers --n 4096 --peers reformer-pytorch,routing-transformer \
        --repeats 7 --agree --markdown peers.md --json peers.json

What is measured (the setting of issue 13, requirement 6): one attention layer, dim 256, 4 heads of 64,
batch 1, float32, on CPU (or `--device cuda`), one training step = forward + backward of a fixed random
output gradient (`harness.make_step`, the step of `eft bench --mode train`; for `out.sum()` the gradient
would be all ones, the cost is the same). For every length and direction, vanilla attention through
PyTorch's fused SDPA, each available peer and our mechanism with the *same budget* (the table
`PEERS`) are built once and timed in ONE process, interleaved in rounds with a rotating order
(`harness.time_interleaved`), on the same input. Reported: median seconds per step, the time of ours
and theirs as a multiple of SDPA's (median over rounds of the paired ratio), ours / theirs (median of
the paired ratio: below 1 = ours faster), and the peak memory of one step of each, measured in an
isolated forked process (`bench.memory`, the probe of `eft bench`; peers enter it through its layer
`factory`, this file's `build_peer`).

`--agree` adds agreement checks where a peer computes the same function as ours (window attention,
kernel attention, random-feature attention with the features copied): the largest difference of the
two outputs on the same q, k, v (or the same weights), relative to the largest output.

The peers are NOT dependencies: nothing here imports one at package import time, the tests need none,
and a missing peer is listed with its install line. Install them in a scratch environment outside the
project (see `INSTALL`), never in the project's requirements. No peer code is copied here: peers are
only imported and called.

Decisions:
- Peers without an output projection (HF's self-attention modules) get one `nn.Linear(dim, dim)`, so
  every timed layer is input projections + attention + output projection, as ours.
- Dropout is zero everywhere; layers are timed in training mode (`layer.train()`), so training-only
  work (k-means updates, random blocks, Gumbel noise where a default enables it) is included, as in a
  training step.
- Each peer keeps its own defaults for everything the brief's budget does not fix (e.g. sinkhorn-
  transformer's `SinkhornSelfAttention` default `non_permutative=True`: a differentiable top-k instead
  of Sinkhorn iterations); `PEERS[...].note` says where that differs from ours.
- Lengths must be multiples of 512 (HF Longformer's window, the peers' bucket and window sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import harness
from ..formatting import aligned_table, json_safe

DIM, HEADS, HEAD_DIM = 256, 4, 64
LENGTH_MULTIPLE = 512
SDPA = "sdpa"
FACTORY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_factory.py")

INSTALL = """\
python3 -m venv ../peers-venv && . ../peers-venv/bin/activate      # outside the project
pip install torch numpy einops
pip install --no-deps performer-pytorch==1.1.4 linformer==0.2.3 reformer-pytorch==1.4.4 \\
    linear-attention-transformer==0.19.1 local-attention==1.11.2 sinkhorn-transformer==0.11.4 \\
    routing-transformer==1.6.1 memory-compressed-attention==0.0.7 axial-positional-embedding==0.3.12 \\
    product-key-memory==0.3.0 colt5-attention==0.11.2 hyper-connections==0.4.11 einx==0.4.3 \\
    frozendict==2.5.1 loguru==0.7.3 packaging torch-einops-utils==0.2.0 mixture-of-experts==0.2.3
pip install transformers==5.24.0                                    # HF Longformer / BigBird
PATH="$VIRTUAL_ENV/bin:/usr/bin:/bin" MAX_JOBS=2 pip install --no-deps --no-build-isolation \\
    pytorch-fast-transformers==0.4.0                               # optional, compiles C++
pip install --no-deps -e .                                          # this package"""


@dataclass(frozen=True)
class Peer:
    """A public implementation and the registered mechanism with the same budget.

    `our_options(n)` are the keyword options of `build_attention(mechanism, ...)` at length n;
    `constructor` is the peer's call as the report prints it; `note`, where the two differ."""

    name: str
    distribution: str
    module: str
    mechanism: str
    our_options: Callable[[int], dict[str, Any]]
    constructor: str
    causal: bool
    faithful: bool = False  # the same function as ours: an agreement check applies
    note: str = ""
    max_causal_n: int | None = None  # longer causal runs would need more memory than a shared machine has
    max_causal_why: str = ""

    def too_large(self, n: int, causal: bool) -> str | None:
        """Why this run is not made (None: it is)."""
        if causal and self.max_causal_n is not None and n > self.max_causal_n:
            return self.max_causal_why
        return None

    def available(self) -> str | None:
        """None when the peer can be imported, else why not (checked without importing it)."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
        return None if found else f"module {self.module!r} not found (pip install --no-deps {self.distribution})"


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("reformer-pytorch", "reformer-pytorch==1.4.4", "reformer_pytorch", "reformer",
         lambda n: {"bucket_size": 64, "n_hashes": 4, "max_seq_len": n},
         "LSHSelfAttention(dim=256, heads=4, dim_head=64, bucket_size=64, n_hashes=4, causal=...)", True,
         note="both: n_buckets = N / 64; ours: the paper's duplicate correction across hash rounds, peer: its "
              "default allow_duplicate_attention=True (no correction); peer not exactly causal"),
    Peer("routing-transformer", "routing-transformer==1.6.1", "routing_transformer", "routing",
         lambda n: {"num_clusters": n // 256, "window": 256, "local_heads": 0, "max_seq_len": n},
         "SelfAttention(dim=256, depth=1, max_seq_len=N, heads=4, local_attn_heads=0, window_size=256, "
         "dim_head=64, causal=...)", True,
         note="both: N / 256 clusters of 256; causal: peer top-k balanced (not causal), ours nearest centroid"),
    Peer("sinkhorn-transformer", "sinkhorn-transformer==0.11.4", "sinkhorn_transformer", "sinkhorn",
         lambda n: {"block_size": 64, "max_seq_len": n},
         "SinkhornSelfAttention(dim=256, bucket_size=64, max_seq_len=N, heads=4, dim_head=64, causal=...)", True,
         note="peer defaults: non_permutative=True (top-1 softmax sort, no Sinkhorn iterations) bidirectional; "
              "ours 8 log-space Sinkhorn iterations"),
    Peer("performer-pytorch", "performer-pytorch==1.1.4", "performer_pytorch", "performer",
         lambda n: {"nb_features": 256},
         "SelfAttention(dim=256, heads=4, dim_head=64, nb_features=256, causal=...)", True, faithful=True,
         note="peer causal on CPU: its memory-inefficient non-CUDA fallback (it takes fast-transformers' "
              "kernel only with the CUDA module)",
         max_causal_n=8192, max_causal_why="its CPU causal fallback keeps (N, m, d) prefix sums for backward "
                                           "(3-4.5 GiB at N = 4096, four times that at 16K): not run above N = 8192"),
    Peer("linformer", "linformer==0.2.3", "linformer", "linformer",
         lambda n: {"k": 256, "max_seq_len": n},
         "LinformerSelfAttention(dim=256, seq_len=N, k=256, heads=4, dim_head=64)", False,
         note="both: E, F shared by the heads (ours sharing='headwise')"),
    Peer("fast-transformers", "pytorch-fast-transformers==0.4.0", "fast_transformers", "linear_transformer",
         lambda n: {},
         "AttentionLayer(LinearAttention(64) | CausalLinearAttention(64), 256, 4)", True, faithful=True,
         note="peer causal: C++ CausalDotProduct kernel; ours plain PyTorch, chunked"),
    Peer("local-attention", "local-attention==1.11.2", "local_attention", "longformer",
         lambda n: {"window": 512},
         "LocalMHA(dim=256, window_size=256, dim_head=64, heads=4, causal=..., use_rotary_pos_emb=False)", True,
         faithful=True, note="exact_windowsize (its default): |i - j| <= 256, = ours window=512 (256 per side)"),
    Peer("memory-compressed-attention", "memory-compressed-attention==0.0.7", "memory_compressed_attention",
         "memory_compressed", lambda n: {"compression": 3},
         "MemoryCompressedAttention(dim=256, heads=4, compression_factor=3, causal=...)", True,
         note="peer conv grouped per head; causal: peer not exactly causal (issue 12)"),
    Peer("hf-longformer", "transformers==5.24.0", "transformers", "longformer",
         lambda n: {"window": 512},
         "LongformerSelfAttention(LongformerConfig(hidden_size=256, num_attention_heads=4, attention_window=[512], "
         "attention_probs_dropout_prob=0), layer_id=0) + Linear(256, 256)", False, faithful=True,
         note="encoder only; no global tokens in this run"),
    Peer("hf-bigbird", "transformers==5.24.0", "transformers", "bigbird",
         lambda n: {"block_size": 64, "num_random_blocks": 3, "max_seq_len": n},
         "BigBirdBlockSparseAttention(BigBirdConfig(hidden_size=256, num_attention_heads=4, "
         "attention_type='block_sparse', block_size=64, num_random_blocks=3, max_position_embeddings=N), seed=0) "
         "+ Linear(256, 256)", False,
         note="both: window 3 blocks, 2 global blocks (first, last), 3 random blocks per query block"),
)}


# ---------------------------------------------------------------------------------------- peer layers
class PeerLayer(nn.Module):
    """A peer as a layer x (B, N, dim) -> (B, N, dim): `call(inner, x)` runs it; `out` is the output
    projection added to peers that have none (else None)."""

    def __init__(self, peer: str, inner: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 add_output_projection: bool = False) -> None:
        super().__init__()
        self.peer, self.inner, self._call = peer, inner, call
        self.out = nn.Linear(DIM, DIM) if add_output_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._call(self.inner, x)  # (B, N, dim)
        return self.out(y) if self.out is not None else y

    def extra_repr(self) -> str:
        return f"peer={self.peer}"


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _build_reformer(n: int, causal: bool) -> PeerLayer:
    from reformer_pytorch import LSHSelfAttention

    inner = LSHSelfAttention(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, bucket_size=64, n_hashes=4, causal=causal)
    return PeerLayer("reformer-pytorch", inner, lambda m, x: m(x))


def _build_routing(n: int, causal: bool) -> PeerLayer:
    from routing_transformer.routing_transformer import SelfAttention

    inner = SelfAttention(dim=DIM, depth=1, max_seq_len=n, heads=HEADS, local_attn_heads=0,
                          window_size=256, dim_head=HEAD_DIM, causal=causal)
    return PeerLayer("routing-transformer", inner, lambda m, x: _first(m(x)))  # (out, aux_loss)


def _build_sinkhorn(n: int, causal: bool) -> PeerLayer:
    from sinkhorn_transformer import SinkhornSelfAttention

    inner = SinkhornSelfAttention(dim=DIM, bucket_size=64, max_seq_len=n, heads=HEADS, dim_head=HEAD_DIM, causal=causal)
    return PeerLayer("sinkhorn-transformer", inner, lambda m, x: m(x))


def _build_performer(n: int, causal: bool) -> PeerLayer:
    from performer_pytorch import SelfAttention

    inner = SelfAttention(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, nb_features=256, causal=causal)
    return PeerLayer("performer-pytorch", inner, lambda m, x: m(x))


def _build_linformer(n: int, causal: bool) -> PeerLayer:
    from linformer import LinformerSelfAttention

    inner = LinformerSelfAttention(dim=DIM, seq_len=n, k=256, heads=HEADS, dim_head=HEAD_DIM)
    return PeerLayer("linformer", inner, lambda m, x: m(x))


def _build_fast_transformers(n: int, causal: bool) -> PeerLayer:
    from fast_transformers.attention import AttentionLayer, CausalLinearAttention, LinearAttention
    from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

    kernel = CausalLinearAttention(HEAD_DIM) if causal else LinearAttention(HEAD_DIM)
    inner = AttentionLayer(kernel, DIM, HEADS)
    masks: dict[tuple[int, int, str], tuple[Any, Any]] = {}

    def make_masks(b: int, length: int, device: str = "cpu") -> tuple[Any, Any]:
        # LinearAttention insists on an all-ones FullMask, an (N, N) bool tensor (256 MiB at N = 16K) that the
        # peer's own encoder builds in every call; here it is built once per shape, and for N = n at
        # construction, so that the measured step does not include it.
        attn_mask = TriangularCausalMask(length, device=device) if causal else FullMask(length, device=device)
        return attn_mask, LengthMask(torch.full((b,), length, dtype=torch.int64, device=device), max_len=length,
                                     device=device)

    masks[(1, n, "cpu")] = make_masks(1, n)

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        key = (b, length, str(x.device))
        if key not in masks:
            masks[key] = make_masks(b, length, str(x.device))
        attn_mask, lengths = masks[key]
        return m(x, x, x, attn_mask, lengths, lengths)

    return PeerLayer("fast-transformers", inner, call)


def _build_local_attention(n: int, causal: bool) -> PeerLayer:
    from local_attention import LocalMHA

    inner = LocalMHA(dim=DIM, window_size=256, dim_head=HEAD_DIM, heads=HEADS, causal=causal, use_rotary_pos_emb=False)
    return PeerLayer("local-attention", inner, lambda m, x: m(x))


def _build_memory_compressed(n: int, causal: bool) -> PeerLayer:
    from memory_compressed_attention import MemoryCompressedAttention

    inner = MemoryCompressedAttention(dim=DIM, heads=HEADS, compression_factor=3, causal=causal)
    return PeerLayer("memory-compressed-attention", inner, lambda m, x: m(x))


def _build_hf_longformer(n: int, causal: bool) -> PeerLayer:
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    config = LongformerConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_window=[512],
                              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    inner = LongformerSelfAttention(config, layer_id=0)

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        no_flags = torch.zeros(b, length, dtype=torch.bool, device=x.device)
        zeros = torch.zeros(b, length, dtype=x.dtype, device=x.device)  # 0 = local attention, no padding
        return _first(m(x, attention_mask=zeros, is_index_masked=no_flags, is_index_global_attn=no_flags,
                        is_global_attn=False))

    return PeerLayer("hf-longformer", inner, call, add_output_projection=True)


def _build_hf_bigbird(n: int, causal: bool) -> PeerLayer:
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    config = BigBirdConfig(hidden_size=DIM, num_attention_heads=HEADS, attention_type="block_sparse", block_size=64,
                           num_random_blocks=3, max_position_embeddings=n, attention_probs_dropout_prob=0.0,
                           hidden_dropout_prob=0.0)
    inner = BigBirdBlockSparseAttention(config, seed=0)

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        ones = torch.ones(b, length, dtype=x.dtype, device=x.device)
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(ones, 64)
        return _first(m(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                        to_blocked_mask=blocked))

    return PeerLayer("hf-bigbird", inner, call, add_output_projection=True)


BUILDERS: dict[str, Callable[[int, bool], PeerLayer]] = {
    "reformer-pytorch": _build_reformer,
    "routing-transformer": _build_routing,
    "sinkhorn-transformer": _build_sinkhorn,
    "performer-pytorch": _build_performer,
    "linformer": _build_linformer,
    "fast-transformers": _build_fast_transformers,
    "local-attention": _build_local_attention,
    "memory-compressed-attention": _build_memory_compressed,
    "hf-longformer": _build_hf_longformer,
    "hf-bigbird": _build_hf_bigbird,
}


def build_peer(dim: int, heads: int, causal: bool, *, peer: str, seq_len: int) -> nn.Module:
    """The peer layer (the memory probe's `factory`: `bench/peers.py:build_peer`)."""
    if (dim, heads) != (DIM, HEADS):
        raise ValueError(f"peers are compared at dim={DIM}, heads={HEADS}; got dim={dim}, heads={heads}")
    if peer not in BUILDERS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(BUILDERS)}")
    if causal and not PEERS[peer].causal:
        raise ValueError(f"peer {peer!r} has no causal form")
    return BUILDERS[peer](seq_len, causal)


# ---------------------------------------------------------------------------------------- workloads
def workloads(peer: Peer, n: int, causal: bool, device: str = "cpu") -> dict[str, harness.Workload]:
    """The three layers of one comparison: SDPA, ours with the peer's budget, the peer."""
    common = dict(seq_len=n, mode="train", batch=1, dim=DIM, heads=HEADS, dtype="float32", causal=causal,
                  device=device)
    return {
        SDPA: harness.Workload(mechanism="vanilla", options={"backend": "sdpa"}, **common),
        "ours": harness.Workload(mechanism=peer.mechanism, options=peer.our_options(n), **common),
        "theirs": harness.Workload(mechanism=f"peer:{peer.name}", options={"peer": peer.name, "seq_len": n},
                                   factory=f"{FACTORY_FILE}:build_peer", **common),
    }


def select(names: list[str] | None, causal: bool) -> tuple[list[Peer], dict[str, str]]:
    """The peers to compare (in table order) and, separately, those skipped with the reason."""
    chosen = [PEERS[n] for n in names] if names else list(PEERS.values())
    runnable, skipped = [], {}
    for peer in chosen:
        why = peer.available()
        if why is None and causal and not peer.causal:
            why = "no causal form (encoder only)"
        if why is None:
            runnable.append(peer)
        else:
            skipped[peer.name] = why
    return runnable, skipped


# ---------------------------------------------------------------------------------------- the run
def run_block(peers: list[Peer], n: int, causal: bool, *, repeats: int, device: str, probe: Any | None,
              sample_min_s: float, timeout_s: float,
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """One length and direction: SDPA, every peer and its counterpart, timed interleaved in one process.

    `probe`: a started `memory.ProbeServer` (one for the whole run, so that the probed and the timed
    layers come from the same source files), or None for no peak memory."""
    works: dict[str, harness.Workload] = {}
    for peer in peers:
        w = workloads(peer, n, causal, device)
        works[SDPA] = w[SDPA]
        works[f"ours:{peer.name}"] = w["ours"]
        works[f"theirs:{peer.name}"] = w["theirs"]
    peaks: dict[str, dict[str, Any]] = {}
    if probe is not None:
        for key, work in works.items():
            log(f"  memory probe {key} N={n}{' causal' if causal else ''}")
            peaks[key] = probe.measure(work.to_json(), timeout_s)
    steps: dict[str, Callable[[], None]] = {}
    build_errors: dict[str, str] = {}
    for key, work in works.items():
        try:
            steps[key] = harness.make_step(harness.build_layer(work), work)
        except Exception as err:  # noqa: BLE001 - one failing layer must not end the block
            build_errors[key] = harness.classify_failure(err)[1]
    log(f"  timing {len(steps)} layers at N={n}{' causal' if causal else ''}, up to {repeats} rounds")
    plan = harness.TimingPlan(repeats=repeats, min_rounds=min(3, repeats), budget_s=timeout_s,
                              timeout_s=timeout_s, sample_min_s=sample_min_s)
    estimates = {k: p["first_step_ms"] / 1e3 for k, p in peaks.items() if p.get("first_step_ms")}
    timing = harness.time_interleaved(steps, plan, device=device, estimates_s=estimates,
                                      on_round=lambda r, t: log(f"    round {r}/{t}"))
    errors = dict(build_errors)
    errors.update({k: harness.classify_failure(e)[1] for k, e in timing.failures.items()})

    def seconds(key: str) -> float | None:
        return None if key in errors else harness.median_of(timing.samples.get(key, []))

    def ratio(key: str, ref: str) -> float | None:
        if key in errors or ref in errors:
            return None
        return harness.paired_ratio(timing.samples[key], timing.samples[ref])

    def peak(key: str) -> float | None:
        return peaks.get(key, {}).get("peak_mem_mb")

    rows = []
    for peer in peers:
        ours, theirs = f"ours:{peer.name}", f"theirs:{peer.name}"
        rows.append({
            "peer": peer.name, "mechanism": peer.mechanism, "n": n, "causal": causal,
            "our_options": peer.our_options(n), "rounds": sum(s is not None for s in timing.samples.get(ours, [])),
            "sdpa_s": seconds(SDPA), "ours_s": seconds(ours), "theirs_s": seconds(theirs),
            "ours_x_sdpa": ratio(ours, SDPA), "theirs_x_sdpa": ratio(theirs, SDPA), "ours_over_theirs": ratio(ours, theirs),
            "sdpa_peak_mb": peak(SDPA), "ours_peak_mb": peak(ours), "theirs_peak_mb": peak(theirs),
            "errors": {side: errors[k] for side, k in (("sdpa", SDPA), ("ours", ours), ("theirs", theirs)) if k in errors}
                      | {f"{side}_memory": peaks[k].get("error") for side, k in
                         (("sdpa", SDPA), ("ours", ours), ("theirs", theirs))
                         if k in peaks and peaks[k].get("status") != "ok"},
        })
    return rows


# ---------------------------------------------------------------------------------------- agreement
def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Exact softmax attention (a test-sized N x N score matrix: agreement checks only)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v  # (B, H, N, d)


def agreement(peer_name: str, causal: bool, n: int = 1024, seed: int = 0) -> tuple[float, str]:
    """(relative error, what was compared) between ours and a faithful peer, on the same inputs."""
    from ..registry import build_attention

    peer = PEERS[peer_name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))  # (B, H, N, d)
    torch.manual_seed(seed)
    ours_layer = build_attention(peer.mechanism, DIM, HEADS, causal, **peer.our_options(n)).eval()
    with torch.no_grad():
        if peer_name == "local-attention":
            from local_attention import LocalAttention

            theirs = LocalAttention(window_size=256, causal=causal, look_forward=0 if causal else 1, exact_windowsize=True,
                                    autopad=True, use_rotary_pos_emb=False, dim=HEAD_DIM)(q, k, v)
            return _relative_error(ours_layer.attend(q, k, v)[0], theirs), "core: attend(q, k, v) vs LocalAttention"
        if peer_name == "fast-transformers":
            from fast_transformers.attention import CausalLinearAttention, LinearAttention
            from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

            kernel = CausalLinearAttention(HEAD_DIM) if causal else LinearAttention(HEAD_DIM)
            lengths = LengthMask(torch.full((1,), n, dtype=torch.int64), max_len=n)
            mask = TriangularCausalMask(n) if causal else FullMask(n)
            theirs = kernel(*(t.transpose(1, 2) for t in (q, k, v)), mask, lengths, lengths).transpose(1, 2)
            return _relative_error(ours_layer.attend(q, k, v)[0], theirs), "core: attend(q, k, v) vs (Causal)LinearAttention"
        if peer_name == "performer-pytorch":
            from performer_pytorch import FastAttention

            # q, k scaled by 1/4 (|q . k| / sqrt(d) ~ 1/16): there the peer's absolute feature epsilon (1e-4
            # after subtracting the largest key feature; ours 1e-6 of each row's largest) is negligible; at
            # scale 1/2 it is ~ the typical key feature and the two differ by 8e-2 (both then far from exact)
            q, k = q * 0.25, k * 0.25
            fast = FastAttention(dim_heads=HEAD_DIM, nb_features=256, causal=causal)
            fast.projection_matrix.copy_(ours_layer.feature_map.omega)  # the same random features
            ours_out, theirs_out = ours_layer.attend(q, k, v)[0], fast(q, k, v)
            exact = _dense_reference(q, k, v, causal)
            return (_relative_error(ours_out, theirs_out),
                    f"core: attend(q, k, v) vs FastAttention, our omega copied, q, k x 0.25; vs exact softmax: "
                    f"ours {_relative_error(ours_out, exact):.1e}, theirs {_relative_error(theirs_out, exact):.1e}")
        if peer_name == "hf-longformer":
            if causal:
                raise ValueError("hf-longformer has no causal form")
            theirs_layer = build_peer(DIM, HEADS, False, peer=peer_name, seq_len=n).eval()
            w_q, w_k, w_v = ours_layer.to_qkv.weight.chunk(3, dim=0)
            b_q, b_k, b_v = ours_layer.to_qkv.bias.chunk(3, dim=0)
            for linear, w, b in ((theirs_layer.inner.query, w_q, b_q), (theirs_layer.inner.key, w_k, b_k),
                                 (theirs_layer.inner.value, w_v, b_v),
                                 (theirs_layer.out, ours_layer.to_out.weight, ours_layer.to_out.bias)):
                linear.weight.copy_(w)
                linear.bias.copy_(b)
            x = torch.randn(1, n, DIM, generator=gen)  # (B, N, dim)
            return _relative_error(ours_layer(x), theirs_layer(x)), "layer: weights copied (q, k, v, output projections)"
    raise ValueError(f"no agreement check for peer {peer_name!r}; available for: {', '.join(AGREEMENT_PEERS)}")


AGREEMENT_PEERS = ("local-attention", "fast-transformers", "performer-pytorch", "hf-longformer")


# ---------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: one table per (length, direction), plus agreement and skipped peers."""
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} thread(s); "
             f"load (1-min) {result['load_before']} before, {result['load_after']} after; started {result['started']}, "
             f"{result['wall_s']:.0f} s.", "",
             "Our sources (SHA-1 prefix of the file as imported): "
             + (", ".join(f"{k} {v}" for k, v in result.get("sources", {}).items()) or "—"), "",
             "Time × SDPA: a step's time as a multiple of SDPA's in the same round (below 1 = faster than SDPA), "
             "median over rounds; ours/theirs below 1 = ours faster. Peak: MiB above the inputs for one "
             "forward+backward step, isolated process (× SDPA's).", ""]
    header = ["peer", "ours", "SDPA ms", "ours ms", "theirs ms", "ours ×SDPA", "theirs ×SDPA", "ours/theirs",
              "peak SDPA", "peak ours", "peak theirs"]
    blocks: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        blocks.setdefault((row["n"], row["causal"]), []).append(row)
    for (n, causal), rows in blocks.items():
        lines += [f"**N = {n}, {'causal' if causal else 'bidirectional'}**", ""]
        table = []
        for r in rows:
            sdpa_peak = r["sdpa_peak_mb"]

            def mem(v: float | None) -> str:
                if v is None:
                    return "—"
                return f"{v:.0f}" + (f" ({v / sdpa_peak:.1f}×)" if sdpa_peak else "")

            opts = ", ".join(f"{k}={v}" for k, v in r["our_options"].items())
            table.append([r["peer"], f"{r['mechanism']}({opts})",
                          _fmt(r["sdpa_s"] and r["sdpa_s"] * 1e3, ".0f"), _fmt(r["ours_s"] and r["ours_s"] * 1e3, ".0f"),
                          _fmt(r["theirs_s"] and r["theirs_s"] * 1e3, ".0f"), _fmt(r["ours_x_sdpa"], ".3f"),
                          _fmt(r["theirs_x_sdpa"], ".3f"), _fmt(r["ours_over_theirs"], ".2f"),
                          mem(r["sdpa_peak_mb"]), mem(r["ours_peak_mb"]), mem(r["theirs_peak_mb"])])
        lines += [aligned_table(header, table), ""]
        for r in rows:
            for side, message in r["errors"].items():
                lines.append(f"- {r['peer']} {side}: {message}")
        lines.append("")
    if result.get("agreement"):
        lines += ["**Agreement** (max |ours − theirs| / max |theirs|, float32, N = "
                  f"{result['agreement_n']})", ""]
        lines += [aligned_table(["peer", "ours", "direction", "relative error", "compared"],
                                [[a["peer"], a["mechanism"], "causal" if a["causal"] else "bidirectional",
                                  _fmt(a["error"], ".1e") if a.get("error") is not None else a.get("failure", "—"),
                                  a.get("what", "")] for a in result["agreement"]]), ""]
    if result["skipped"]:
        lines += ["**Not compared**", ""] + [f"- {name}: {why}" for name, why in result["skipped"].items()] + [""]
    lines += ["Peers' constructors:", ""]
    for name in dict.fromkeys(r["peer"] for r in result["rows"]):
        lines.append(f"- {name}: `{PEERS[name].constructor}`" + (f"; {PEERS[name].note}" if PEERS[name].note else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- command line
def _peer_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown or [text]}; allowed: {','.join(PEERS)}")
    return names


def _length(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < LENGTH_MULTIPLE or n % LENGTH_MULTIPLE:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: expected a positive multiple of {LENGTH_MULTIPLE} "
                                         "(the peers' windows and buckets need it)")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m efficient_transformers.bench.peers",
                                description="Time ours against public implementations in one process (see module doc).")
    p.add_argument("--n", type=_length, nargs="+", default=[4096, 16384], help="lengths (default 4096 16384)")
    p.add_argument("--causal", action="store_true", help="causal layers (peers without a causal form are skipped)")
    p.add_argument("--both", action="store_true", help="bidirectional, then causal")
    p.add_argument("--peers", type=_peer_list, default=None, help=f"comma-separated, default all: {','.join(PEERS)}")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (default 5)")
    p.add_argument("--sample-min-s", type=float, default=0.2, help="shortest timed sample (default 0.2 s)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="time per layer and block (default 300 s)")
    p.add_argument("--threads", default="auto",
                   help="torch threads, or 'auto' (default: torch's default, 1 when the machine is already busy)")
    p.add_argument("--device", choices=list(harness.DEVICES), default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the isolated peak-memory probe")
    p.add_argument("--agree", action="store_true", help=f"agreement checks for {', '.join(AGREEMENT_PEERS)}")
    p.add_argument("--agree-n", type=_length, default=1024, help="length of the agreement checks (default 1024)")
    p.add_argument("--markdown", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, dest="json_path", help="write the JSON results here")
    p.add_argument("--list", action="store_true", help="list the peers, their availability and our counterparts")
    return p


def _threads(value: str) -> int:
    from .runner import load_average, machine_is_busy

    if value == "auto":
        return 1 if machine_is_busy(load_average()) else torch.get_num_threads()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"--threads: expected a positive int or 'auto', got {value!r}")
    return threads


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2
    directions = [False, True] if args.both else [args.causal]
    if args.list:
        for peer in PEERS.values():
            why = peer.available()
            print(f"{peer.name:28s} {'ok' if why is None else 'MISSING':8s} -> {peer.mechanism:18s} "
                  f"{'causal+bi' if peer.causal else 'bi only':9s} {why or ''}")
        return 0
    plans = {causal: select(args.peers, causal) for causal in directions}
    skipped = {name: why for _, (_, s) in plans.items() for name, why in s.items()}
    missing = {name: why for name, why in skipped.items() if "not found" in why or "Error" in why}
    if missing:
        print("peers missing (not compared):\n" + "\n".join(f"  {n}: {w}" for n, w in missing.items()), file=sys.stderr)
    if not any(peers for peers, _ in plans.values()):
        print("no peer to compare: install them in a scratch environment outside the project:\n" + INSTALL, file=sys.stderr)
        return 1
    try:
        threads = _threads(args.threads)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    torch.set_num_threads(threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    from ..registry import mechanisms
    from .memory import ProbeServer

    mechanisms()  # import every mechanism's source now (others may be editing them), as the probe server does
    with ProbeServer(threads=threads) as probe:
        if not args.no_memory:
            probe.measure(workloads(PEERS["linformer"], LENGTH_MULTIPLE, False, args.device)[SDPA].to_json(),
                          args.timeout_s)  # starts the server now: it imports the sources when the timing does
        for causal in directions:
            peers = plans[causal][0]
            for n in args.n:
                too_large = {p.name: p.too_large(n, causal) for p in peers if p.too_large(n, causal)}
                skipped.update({f"{name} (causal, N = {n})": why for name, why in too_large.items()})
                peers_n = [p for p in peers if p.name not in too_large]
                if not peers_n:
                    continue
                log(f"N={n} {'causal' if causal else 'bidirectional'}: {', '.join(p.name for p in peers_n)} "
                    f"(load {os.getloadavg()[0]:.2f})")
                rows += run_block(peers_n, n, causal, repeats=args.repeats, device=args.device,
                                  probe=None if args.no_memory else probe, sample_min_s=args.sample_min_s,
                                  timeout_s=args.timeout_s, log=log)
    agreements = []
    if args.agree:
        for causal in directions:
            for peer in plans[causal][0]:
                if peer.name not in AGREEMENT_PEERS or (causal and peer.name == "hf-longformer"):
                    continue
                entry: dict[str, Any] = {"peer": peer.name, "mechanism": peer.mechanism, "causal": causal}
                try:
                    entry["error"], entry["what"] = agreement(peer.name, causal, args.agree_n)
                except Exception as err:  # noqa: BLE001 - reported, not fatal
                    entry["failure"] = f"{type(err).__name__}: {err}"[:200]
                agreements.append(entry)
    result = {
        "command": "python -m efficient_transformers.bench.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _machine(), "torch": torch.__version__, "threads": threads, "device": args.device,
        "load_before": _fmt(load_before, ".2f"),
        "load_after": _fmt(os.getloadavg()[0] if hasattr(os, "getloadavg") else None, ".2f"),
        "started": started, "wall_s": time.perf_counter() - t0, "rows": rows, "skipped": skipped,
        "agreement": agreements, "agreement_n": args.agree_n,
        "sources": _sources([r["mechanism"] for r in rows]),
    }
    text = markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(json_safe(result), f, indent=1)
    return 0


def _sources(mechanisms: list[str]) -> dict[str, str]:
    """The first 10 hex digits of the SHA-1 of each compared mechanism's source file, as imported now
    (the tree may be edited between runs: this says which version a table measured)."""
    import hashlib

    from ..registry import build_attention

    found = {}
    for name in dict.fromkeys(mechanisms):
        module = sys.modules.get(type(build_attention(name, DIM, HEADS, False, **_small_options(name))).__module__)
        path = getattr(module, "__file__", None)
        if path:
            with open(path, "rb") as f:
                found[os.path.basename(path)] = hashlib.sha1(f.read()).hexdigest()[:10]
    return found


def _small_options(mechanism: str) -> dict[str, Any]:
    peer = next(p for p in PEERS.values() if p.mechanism == mechanism)
    return peer.our_options(LENGTH_MULTIPLE)


def _machine() -> str:
    try:
        from .runner import _cpu_name  # the name `eft bench` reports

        return _cpu_name()
    except ImportError:
        import platform

        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


if __name__ == "__main__":
    sys.exit(main())
