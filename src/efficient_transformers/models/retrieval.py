"""The two-tower retrieval model of the Long Range Arena (Tay et al. 2021, arXiv 2011.04006, Sec. 3.3).

Two documents are encoded independently by ONE shared encoder (no cross-attention), and a 2-layer
ReLU MLP classifies the pair from the interaction features of the LRA paper:

    X1 = Enc(doc1),  X2 = Enc(doc2)                                   (B, dim) each
    logits = MLP([X1, X2, X1 * X2, X1 - X2])                          (B, 4 dim) -> (B, num_classes)

(The released LRA code defaults to ``interaction=None``, i.e. only [X1, X2]; we follow the paper.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.aux_losses import AuxLoss, collect_aux_losses, reset_aux_losses
from .classifier import TransformerEncoder, classification_head


class RetrievalModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 128, depth: int = 4, heads: int = 4, *,
                 attention: str = "vanilla", attention_options: dict[str, Any] | None = None,
                 pooling: str = "cls", max_seq_len: int = 4096, norm: str = "pre", positional: str | None = None,
                 ff_mult: int = 4, dropout: float = 0.0, mlp_dim: int | None = None, num_classes: int = 2,
                 share: str = "none", embedding_dim: int | None = None, reversible: bool = False,
                 ff_chunks: int = 1) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(
            vocab_size, dim, depth, heads, attention=attention, attention_options=attention_options,
            pooling=pooling, max_seq_len=max_seq_len, norm=norm, positional=positional, ff_mult=ff_mult,
            dropout=dropout, share=share, embedding_dim=embedding_dim, reversible=reversible, ff_chunks=ff_chunks,
        )
        self.head = classification_head(4 * dim, mlp_dim or dim, num_classes)  # on [X1, X2, X1 * X2, X1 - X2]

    def encode_pair(self, tokens: Tensor, tokens2: Tensor, mask: Tensor | None = None,
                    mask2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both documents through the shared encoder -> (X1, X2), each (B, dim).

        Documents of equal padded length go through the encoder as one batch of 2B (the examples of a
        batch never interact), otherwise as two calls."""
        if not isinstance(tokens, Tensor) or not isinstance(tokens2, Tensor):
            raise ValueError(f"tokens and tokens2 must be LongTensors (B, N), got {type(tokens).__name__} and {type(tokens2).__name__}")
        if (mask is None) != (mask2 is None):
            raise ValueError("give masks for both documents or for neither (mask and mask2)")
        if tokens.dim() == 2 and tokens2.dim() == 2 and tokens.shape[0] != tokens2.shape[0]:
            raise ValueError(f"the two documents need the same batch size, got {tokens.shape[0]} and {tokens2.shape[0]}")
        reset_aux_losses(self)  # the layers' auxiliary losses now add up over the two documents
        if tokens.shape == tokens2.shape:
            both_mask = None if mask is None else torch.cat([mask, mask2])  # (2B, N)
            both = self.encoder(torch.cat([tokens, tokens2]), both_mask)  # (2B, dim)
            return both.chunk(2)
        return self.encoder(tokens, mask), self.encoder(tokens2, mask2)

    def forward(self, tokens: Tensor, tokens2: Tensor, mask: Tensor | None = None,
                mask2: Tensor | None = None) -> Tensor:
        """tokens (B, N), tokens2 (B, M) long, masks bool True = real -> logits (B, num_classes)."""
        x1, x2 = self.encode_pair(tokens, tokens2, mask, mask2)  # (B, dim) each (auxiliary losses of both)
        features = torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1)  # (B, 4 dim)
        return self.head(features)

    def aux_losses(self) -> dict[str, AuxLoss]:
        """The attention layers' auxiliary losses of the last forward (both documents)."""
        return collect_aux_losses(self)
