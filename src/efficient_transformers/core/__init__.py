"""Shared primitives: masks, the dense reference, exact dense attention, blocking, head layouts, the
fused input projection, option checks, seeded randomness, auxiliary losses, decoding state, and the
attention layer base class. Nothing here imports models, tasks, bench or train."""

from .aux_losses import AuxLoss, collect_aux_losses, reset_aux_losses, weighted_aux_loss
from .blocking import merge_blocks, pad_mask_to_multiple, pad_to_multiple, round_up, split_blocks
from .dense import dense_attention
from .heads import head_groups, heads_last, merge_heads, split_heads
from .layer import PROJECTIONS, AttentionLayer
from .masks import causal_allowed, combine_allowed, masked_softmax, zero_padded
from .projection import project_heads
from .randomness import SeededDraws
from .reference import reference_attention
from .state import History, KVCache, PositionedKVCache

__all__ = [
    "PROJECTIONS",
    "AttentionLayer",
    "AuxLoss",
    "History",
    "KVCache",
    "PositionedKVCache",
    "SeededDraws",
    "causal_allowed",
    "collect_aux_losses",
    "combine_allowed",
    "dense_attention",
    "head_groups",
    "heads_last",
    "masked_softmax",
    "merge_blocks",
    "merge_heads",
    "pad_mask_to_multiple",
    "pad_to_multiple",
    "project_heads",
    "reference_attention",
    "reset_aux_losses",
    "round_up",
    "split_blocks",
    "split_heads",
    "weighted_aux_loss",
    "zero_padded",
]
