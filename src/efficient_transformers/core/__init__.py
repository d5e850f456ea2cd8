"""Shared primitives: masks, the dense reference, exact dense attention, blocking, decoding state,
and the attention layer base class. Nothing here imports models, tasks, bench or train."""

from .blocking import merge_blocks, pad_mask_to_multiple, pad_to_multiple, round_up, split_blocks
from .dense import dense_attention
from .layer import AttentionLayer
from .masks import causal_allowed, combine_allowed, masked_softmax, zero_padded
from .reference import reference_attention
from .state import History, KVCache

__all__ = [
    "AttentionLayer",
    "History",
    "KVCache",
    "causal_allowed",
    "combine_allowed",
    "dense_attention",
    "masked_softmax",
    "merge_blocks",
    "pad_mask_to_multiple",
    "pad_to_multiple",
    "reference_attention",
    "round_up",
    "split_blocks",
    "zero_padded",
]
