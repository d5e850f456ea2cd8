"""Cross-layer weight sharing (Universal Transformer, ALBERT) and ALBERT's factorised embedding: exact
parameter counts for every registered mechanism, shared weights stored once, identical reloads, and
Linformer's layerwise projection sharing beside them."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

import efficient_transformers as et
from efficient_transformers.models.blocks import SHARE_MODES, attention_options_for
from efficient_transformers.train import checkpoint as ckpt

DIM, HEADS, DEPTH, VOCAB, MAXLEN, FF = 16, 2, 3, 13, 24, 4
CASES = [(c.name, causal) for c in et.mechanisms() for causal in c.modes]
IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in CASES]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(name: str, causal: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    opts = et.card(name).small_options(causal)
    common = dict(dim=DIM, depth=DEPTH, heads=HEADS, attention=name, attention_options=opts, max_seq_len=MAXLEN,
                  ff_mult=FF, **kw)
    if causal:
        return et.TransformerLM(vocab_size=VOCAB, **common)
    return et.TransformerClassifier(VOCAB, 3, **common)


def expected_count(name: str, causal: bool, share: str, embedding_dim: int | None) -> int:
    """Counted from the parts: one standalone attention layer, the FFN and norm formulas, the embedding."""
    seq = MAXLEN if causal else MAXLEN + 1  # the classifier's CLS position
    attn = count(et.build_attention(name, DIM, HEADS, causal,
                                    **attention_options_for(name, et.card(name).small_options(causal), seq)))
    ffn = DIM * FF * DIM + FF * DIM + FF * DIM * DIM + DIM
    norms = 4 * DIM
    n_attn = 1 if share in ("all", "attention") else DEPTH
    n_ffn = 1 if share in ("all", "ffn") else DEPTH
    n_norms = 1 if share == "all" else DEPTH
    body = n_attn * attn + n_ffn * ffn + n_norms * norms + 2 * DIM  # + the final LayerNorm
    e = embedding_dim or DIM
    embed = VOCAB * e + (e * DIM + DIM if embedding_dim else 0)
    if causal:  # tied head; factorised: a dim -> E projection before it
        head = DIM * e if embedding_dim else 0
    else:  # CLS vector + Linear(dim, dim) -> ReLU -> Linear(dim, 3)
        head = DIM + DIM * DIM + DIM + DIM * 3 + 3
    return embed + body + head


@pytest.mark.parametrize("name,causal", CASES, ids=IDS)
def test_parameter_counts_are_exact_for_every_sharing_mode(name, causal):
    for share in SHARE_MODES:
        for embedding_dim in (None, 4):
            model = tiny(name, causal, share=share, embedding_dim=embedding_dim)
            assert count(model) == expected_count(name, causal, share, embedding_dim), (share, embedding_dim)


def test_vanilla_parameter_counts_by_hand():
    d, L, V = DIM, DEPTH, VOCAB
    attn, ffn, norms = 4 * d * d + 4 * d, 2 * FF * d * d + FF * d + d, 4 * d
    want = {"none": L * (attn + ffn + norms), "all": attn + ffn + norms,
            "attention": attn + L * (ffn + norms), "ffn": ffn + L * (attn + norms)}
    for share, body in want.items():
        assert count(tiny("vanilla", True, share=share)) == V * d + body + 2 * d
    # ALBERT: V E + E dim + dim (projection) + dim E (the tied head's way back)
    assert count(tiny("vanilla", True, embedding_dim=4)) == V * 4 + 4 * d + d + d * 4 + want["none"] + 2 * d


@pytest.mark.parametrize("share", ["all", "attention", "ffn"])
def test_shared_modules_are_one_object_at_every_depth(share):
    blocks = tiny("vanilla", False, share=share).encoder.stack.blocks
    for b in blocks[1:]:
        assert (b is blocks[0]) == (share == "all")
        assert (b.attn is blocks[0].attn) == (share in ("all", "attention"))
        assert (b.ff is blocks[0].ff) == (share in ("all", "ffn"))
        assert (b.norm1 is blocks[0].norm1) == (share == "all")


@pytest.mark.parametrize("share", ["all", "attention", "ffn"])
def test_shared_weights_are_stored_once_and_reload_identically(share, tmp_path):
    a, b = tiny("vanilla", True, seed=1, share=share, embedding_dim=8), tiny("vanilla", True, seed=2, share=share, embedding_dim=8)
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert not torch.equal(a(tokens), b(tokens))
    path = tmp_path / "w.safetensors"
    path.write_bytes(ckpt.weights_to_bytes(a))
    with safe_open(str(path), framework="pt") as f:
        stored = list(f.keys())
    unique = {(t.data_ptr(), tuple(t.shape)) for t in a.state_dict().values()}
    assert len(stored) == len(unique) < len(a.state_dict())
    stored_numel = sum(t.numel() for t in ckpt.load_safetensors_bytes(path.read_bytes()).values())
    assert stored_numel == count(a), "each weight once (vanilla has no persistent buffers)"
    ckpt.load_weights(path, b)
    assert torch.equal(a(tokens), b(tokens))
    blocks = b.stack.blocks
    assert (blocks[1].attn is blocks[0].attn) == (share != "ffn"), "loading keeps the sharing"
    # safetensors' own save_model / load_model (which drop tied duplicates) work too
    c = tiny("vanilla", True, seed=3, share=share, embedding_dim=8)
    save_model(a, str(tmp_path / "m.safetensors"))
    load_model(c, str(tmp_path / "m.safetensors"))
    assert torch.equal(a(tokens), c(tokens))


def test_weights_of_an_unshared_model_do_not_load_silently_into_a_shared_one(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(ckpt.weights_to_bytes(tiny("vanilla", True, share="none")))
    with pytest.raises(ckpt.CheckpointError, match="shared weight in this model but differ in the file.*share="):
        ckpt.load_weights(path, tiny("vanilla", True, share="all"))


@pytest.mark.skipif("linformer" not in [c.name for c in et.mechanisms()], reason="linformer is not registered")
@pytest.mark.parametrize("share", SHARE_MODES)
def test_linformer_layerwise_projection_sharing_still_works_beside_layer_sharing(share, tmp_path):
    from efficient_transformers.attention.linformer import share_layerwise

    opts = {"k": 4, "sharing": "kv"}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = et.TransformerClassifier(VOCAB, 3, dim=DIM, depth=DEPTH, heads=HEADS, attention="linformer",
                                     attention_options=opts, max_seq_len=MAXLEN, share=share)
        before = count(m)
        share_layerwise(block.attn for block in m.encoder.stack.blocks)
        distinct_attn = 1 if share in ("all", "attention") else DEPTH
        assert before - count(m) == (distinct_attn - 1) * 4 * (MAXLEN + 1), "E is counted once after tying"
        models.append(m)
    a, b = models
    tokens = torch.randint(0, VOCAB, (2, MAXLEN))
    a(tokens).sum().backward()
    assert a.encoder.stack.blocks[0].attn.proj_k.grad is not None
    path = tmp_path / "lin.safetensors"
    path.write_bytes(ckpt.weights_to_bytes(a))
    ckpt.load_weights(path, b)
    assert torch.equal(a(tokens), b(tokens))


def test_factorised_embedding_shapes_and_retrieval_model():
    lm = tiny("vanilla", True, embedding_dim=4)
    assert lm.embed.tokens.weight.shape == (VOCAB, 4) and lm.embed.project.weight.shape == (DIM, 4)
    assert lm.head.weight is lm.embed.tokens.weight and lm.head_proj.weight.shape == (4, DIM)
    assert lm(torch.randint(0, VOCAB, (2, 5))).shape == (2, 5, VOCAB)
    untied = et.TransformerLM(vocab_size=VOCAB, dim=DIM, depth=1, heads=HEADS, embedding_dim=4, tie_embeddings=False)
    assert untied.head_proj is None and untied.head.weight.shape == (VOCAB, DIM)
    assert tiny("vanilla", True, embedding_dim=DIM).embed.project is None, "E = dim is no factorisation"
    torch.manual_seed(0)
    r = et.RetrievalModel(VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=MAXLEN, share="all", embedding_dim=4)
    plain = et.RetrievalModel(VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=MAXLEN)
    assert r.encoder.stack.blocks[2] is r.encoder.stack.blocks[0]
    saved = 2 * (4 * DIM * DIM + 4 * DIM + 2 * FF * DIM * DIM + FF * DIM + DIM + 4 * DIM) + VOCAB * (DIM - 4) - 4 * DIM - DIM
    assert count(plain) - count(r) == saved
    assert r(torch.randint(0, VOCAB, (2, 6)), torch.randint(0, VOCAB, (2, 8))).shape == (2, 2)


def test_bad_sharing_and_embedding_values_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"share='layers'.*allowed: \['none', 'all', 'attention', 'ffn'\]"):
        tiny("vanilla", True, share="layers")
    with pytest.raises(ValueError, match=r"embedding_dim must be None or an int in \[1, dim=16\].*got 32"):
        tiny("vanilla", False, embedding_dim=32)
    with pytest.raises(ValueError, match="embedding_dim.*got 0"):
        et.RetrievalModel(VOCAB, dim=DIM, depth=1, heads=HEADS, embedding_dim=0)
