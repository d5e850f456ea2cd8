"""A tiny model of every registered mechanism, shared by the model tests (imported by name: pytest puts
this folder on sys.path)."""

import torch

import efficient_transformers as et

DIM, HEADS, VOCAB, MAXLEN = 16, 2, 13, 32


def tiny_model(name: str, causal: bool, seed: int = 0, depth: int = 2, **kw):
    """A tiny model of every mechanism at its card's small options: an LM when causal, else a
    3-class classifier (dim 16, 2 heads, vocabulary 13, max_seq_len 32)."""
    torch.manual_seed(seed)
    common = dict(dim=DIM, depth=depth, heads=HEADS, attention=name, max_seq_len=MAXLEN,
                  attention_options=et.card(name).small_options(causal), **kw)
    if causal:
        return et.TransformerLM(vocab_size=VOCAB, **common)
    return et.TransformerClassifier(VOCAB, 3, **common)
