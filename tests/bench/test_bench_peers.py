"""The peer comparison's pure logic, with no peer installed: the peer table, missing peers, the report.

No timing and no peer import here: `bench.peers` is a benchmark command (issue 13, requirement 6)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import efficient_transformers as et
from efficient_transformers.bench import peers

# The budgets of issue 13 and the brief: the peer's settings and ours must be the same.
EXPECTED_OPTIONS = {
    "reformer-pytorch": ("reformer", {"bucket_size": 64, "n_hashes": 4, "max_seq_len": 4096}),
    "routing-transformer": ("routing", {"num_clusters": 4096 // 256, "window": 256, "local_heads": 0, "max_seq_len": 4096}),
    "sinkhorn-transformer": ("sinkhorn", {"block_size": 64, "max_seq_len": 4096}),
    "performer-pytorch": ("performer", {"nb_features": 256}),
    "linformer": ("linformer", {"k": 256, "max_seq_len": 4096}),
    "fast-transformers": ("linear_transformer", {}),
    "local-attention": ("longformer", {"window": 512}),
    "memory-compressed-attention": ("memory_compressed", {"compression": 3}),
    "hf-longformer": ("longformer", {"window": 512}),
    "hf-bigbird": ("bigbird", {"block_size": 64, "num_random_blocks": 3, "max_seq_len": 4096}),
}
# The same numbers as they appear in the peers' constructors.
EXPECTED_IN_CONSTRUCTOR = {
    "reformer-pytorch": ("bucket_size=64", "n_hashes=4"),
    "routing-transformer": ("window_size=256", "local_attn_heads=0", "max_seq_len=N"),
    "sinkhorn-transformer": ("bucket_size=64", "max_seq_len=N"),
    "performer-pytorch": ("nb_features=256",),
    "linformer": ("k=256", "seq_len=N"),
    "fast-transformers": ("LinearAttention(64)",),
    "local-attention": ("window_size=256", "use_rotary_pos_emb=False"),
    "memory-compressed-attention": ("compression_factor=3",),
    "hf-longformer": ("attention_window=[512]",),
    "hf-bigbird": ("block_size=64", "num_random_blocks=3"),
}


def test_every_peer_maps_to_a_registered_mechanism_with_the_same_budget():
    assert set(peers.PEERS) == set(peers.BUILDERS) == set(EXPECTED_OPTIONS)
    names = {c.name for c in et.mechanisms()}
    for name, peer in peers.PEERS.items():
        mechanism, options = EXPECTED_OPTIONS[name]
        assert peer.mechanism == mechanism and peer.mechanism in names, name
        assert peer.our_options(4096) == options, name
        assert set(options) <= set(et.card(mechanism).options), name
        for setting in EXPECTED_IN_CONSTRUCTOR[name]:
            assert setting in peer.constructor, (name, setting)
        if peer.causal:
            assert et.card(mechanism).causal, name
    assert {n for n, p in peers.PEERS.items() if not p.causal} == {"linformer", "hf-longformer", "hf-bigbird"}


@pytest.mark.parametrize("causal", [False, True])
def test_our_counterparts_build_with_the_peer_options(causal):
    for peer in peers.PEERS.values():
        if causal and not peer.causal:
            continue
        layer = et.build_attention(peer.mechanism, peers.DIM, peers.HEADS, causal, **peer.our_options(512))
        assert layer.causal == causal


def test_workloads_pair_sdpa_ours_and_the_peer_through_the_probe_factory():
    works = peers.workloads(peers.PEERS["reformer-pytorch"], 4096, causal=True)
    assert works[peers.SDPA].mechanism == "vanilla" and works[peers.SDPA].options == {"backend": "sdpa"}
    assert works["ours"].mechanism == "reformer" and works["ours"].options["max_seq_len"] == 4096
    theirs = works["theirs"]
    assert theirs.factory.endswith("peer_factory.py:build_peer")
    assert theirs.options == {"peer": "reformer-pytorch", "seq_len": 4096}
    assert all(w.mode == "train" and w.causal and (w.dim, w.heads, w.batch) == (256, 4, 1) for w in works.values())


def test_build_peer_refuses_other_shapes_unknown_peers_and_causal_encoders():
    with pytest.raises(ValueError, match="dim=256"):
        peers.build_peer(128, 4, False, peer="linformer", seq_len=512)
    with pytest.raises(ValueError, match="unknown peer"):
        peers.build_peer(256, 4, False, peer="nope", seq_len=512)
    with pytest.raises(ValueError, match="no causal form"):
        peers.build_peer(256, 4, True, peer="hf-bigbird", seq_len=512)


def test_importing_the_package_and_the_module_imports_no_peer():
    modules = sorted({p.module for p in peers.PEERS.values()})
    code = ("import sys, efficient_transformers, efficient_transformers.bench.peers; "
            f"print([m for m in {modules!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture
def nothing_installed(monkeypatch):
    missing = {n: dataclasses.replace(p, module=f"_not_installed_{n.replace('-', '_')}") for n, p in peers.PEERS.items()}
    monkeypatch.setattr(peers, "PEERS", missing)
    return missing


def test_missing_peers_are_listed_with_their_install_line(nothing_installed):
    runnable, skipped = peers.select(None, causal=False)
    assert runnable == [] and set(skipped) == set(peers.PEERS)
    assert "pip install --no-deps reformer-pytorch==1.4.4" in skipped["reformer-pytorch"]
    runnable, skipped = peers.select(["linformer"], causal=True)
    assert runnable == [] and "not found" in skipped["linformer"]


def test_command_without_peers_says_which_are_missing_and_how_to_install(nothing_installed, capsys):
    assert peers.main(["--n", "512", "--no-memory"]) == 1
    err = capsys.readouterr().err
    assert "peers missing" in err and "routing-transformer" in err and "pip install --no-deps" in err
    assert peers.main(["--list"]) == 0
    assert capsys.readouterr().out.count("MISSING") == len(peers.PEERS)


def test_an_encoder_only_peer_is_skipped_when_causal(monkeypatch):
    monkeypatch.setattr(peers.Peer, "available", lambda self: None)
    runnable, skipped = peers.select(["linformer", "reformer-pytorch"], causal=True)
    assert [p.name for p in runnable] == ["reformer-pytorch"] and "encoder only" in skipped["linformer"]


@pytest.mark.parametrize("argv", [["--n", "1000"], ["--n", "0"], ["--peers", "reformer"], ["--peers", ""]])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        peers.main(argv + ["--no-memory"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "allowed" in err or "multiple of 512" in err


def test_markdown_report_shows_ratios_missing_values_and_errors():
    row = {"peer": "reformer-pytorch", "mechanism": "reformer", "n": 4096, "causal": False,
           "our_options": {"bucket_size": 64}, "rounds": 3, "sdpa_s": 1.0, "ours_s": 0.5, "theirs_s": None,
           "ours_x_sdpa": 0.5, "theirs_x_sdpa": None, "ours_over_theirs": None,
           "sdpa_peak_mb": 100.0, "ours_peak_mb": 250.0, "theirs_peak_mb": None,
           "errors": {"theirs": "oom: out of memory"}}
    result = {"command": "python -m efficient_transformers.bench.peers --n 4096", "machine": "m", "torch": "t",
              "threads": 1, "load_before": "1.00", "load_after": "2.00", "started": "now", "wall_s": 3.0,
              "rows": [row], "skipped": {"linformer": "no causal form (encoder only)"},
              "sources": {"reformer.py": "0123456789"},
              "agreement": [{"peer": "local-attention", "mechanism": "longformer", "causal": True, "error": 3e-7,
                             "what": "core"}], "agreement_n": 1024}
    text = peers.markdown(result)
    assert "**N = 4096, bidirectional**" in text
    assert "| reformer-pytorch" in text and "0.500" in text and "250 (2.5×)" in text and "—" in text
    assert "- reformer-pytorch theirs: oom: out of memory" in text
    assert "3.0e-07" in text and "linformer: no causal form" in text
    assert "`python -m efficient_transformers.bench.peers --n 4096`" in text and "reformer.py 0123456789" in text


def test_runs_too_large_for_a_shared_machine_are_skipped_with_the_reason():
    performer = peers.PEERS["performer-pytorch"]
    assert performer.too_large(16384, causal=True) and "8192" in performer.too_large(16384, causal=True)
    assert performer.too_large(8192, causal=True) is None and performer.too_large(16384, causal=False) is None
    assert all(p.too_large(16384, causal=True) is None for n, p in peers.PEERS.items() if n != "performer-pytorch")
