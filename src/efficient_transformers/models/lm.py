"""A causal Transformer language model over any registered attention mechanism.

    tokens (B, N) -> embedding + positions -> depth x block(attention=<name>) -> LN -> logits (B, N, V)

`generate` prefills the prompt once and then feeds one token at a time with each layer's decoding
state (a KV cache for dense and pattern mechanisms, running sums for kernel mechanisms), so a new
token costs what the mechanism's incremental form costs, not a recompute of the whole prefix.

Model-level techniques (any mechanism): `share` (cross-layer weight sharing), `embedding_dim`
(ALBERT's factorised embedding; with tied embeddings the output goes back through a dim -> E
projection before the tied (V, E) matrix), `reversible` and `ff_chunks` (Reformer); see
`models.blocks.TransformerStack`.

`positional=None` (default): sinusoidal absolute positions, or none for mechanisms with their own
(card `own_positions`). `data_shape=(H, W)`: the grid of an image modelled in raster order, passed
as the `shape` option to mechanisms that use one (card `uses_shape`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import card, mechanisms
from ..core.aux_losses import AuxLoss, collect_aux_losses, reset_aux_losses
from .blocks import TransformerStack, check_tokens, resolve_positional
from .embedding import Embedder


class TransformerLM(nn.Module):
    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        *,
        attention: str = "vanilla",
        attention_options: dict[str, Any] | None = None,
        max_seq_len: int = 4096,
        norm: str = "pre",
        positional: str | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        data_shape: tuple[int, ...] | None = None,
        share: str = "none",
        embedding_dim: int | None = None,
        reversible: bool = False,
        ff_chunks: int = 1,
    ) -> None:
        super().__init__()
        if not card(attention).causal:
            raise ValueError(
                f"{attention}: TransformerLM needs a causal mechanism and {card(attention).title} cannot decode; "
                f"allowed: {[c.name for c in mechanisms() if c.causal]}"
            )
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.attention = attention
        #: relative positions and no length-sized state (Transformer-XL, Compressive): a stream may run past
        #: max_seq_len through the memory; max_seq_len then bounds one call only
        self.streams_past_max_len = card(attention).own_positions and "max_seq_len" not in card(attention).options
        positional = resolve_positional(attention, positional)
        self.embed = Embedder(vocab_size, dim, positional=positional, max_seq_len=max_seq_len, dropout=dropout,
                              embedding_dim=embedding_dim)
        self.stack = TransformerStack(
            dim, depth, heads, attention=attention, attention_options=attention_options, causal=True,
            norm=norm, ff_mult=ff_mult, dropout=dropout, max_seq_len=max_seq_len, data_shape=data_shape,
            share=share, reversible=reversible, ff_chunks=ff_chunks,
        )
        factorised = self.embed.project is not None and tie_embeddings
        e = self.embed.embedding_dim
        self.head_proj = nn.Linear(dim, e, bias=False) if factorised else None  # dim -> E before the tied head
        self.head = nn.Linear(e if factorised else dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.tokens.weight

    def forward(self, tokens: Tensor, mask: Tensor | None = None, global_mask: Tensor | None = None, *,
                memory: list | None = None, return_state: bool = False):
        """tokens (B, N) long -> logits (B, N, vocab_size). `global_mask` (B, N) bool reaches every
        attention layer (mechanisms that take global tokens in causal mode; the others refuse it).
        After a forward, `aux_losses()` gives the layers' auxiliary losses (see `core.aux_losses`).

        Streams (recurrence): `memory` is the list of per-layer states a previous call returned with
        `return_state=True`, which then returns (logits, memory): the tokens continue that stream
        (Transformer-XL and the Compressive Transformer carry their bounded memories this way; other
        causal mechanisms their decoding states, e.g. a growing KV cache)."""
        check_tokens(tokens, self.vocab_size)
        self._check_length(tokens.shape[1])
        offset = self._check_memory(memory, tokens.shape[0])
        reset_aux_losses(self)
        x = self.embed(tokens, offset)  # (B, N, dim)
        if memory is None and not return_state:
            return self.logits(self.stack(x, mask, global_mask=global_mask))  # (B, N, V)
        h, states = self.stack(x, mask, memory, return_states=True, global_mask=global_mask)  # (B, N, dim)
        return self.logits(h), states

    def _check_memory(self, memory: list | None, batch: int) -> int:
        """A memory is one state per layer (from a call with return_state=True); returns the stream position."""
        if memory is None:
            return 0
        depth = len(self.stack.blocks)
        if not isinstance(memory, (list, tuple)) or len(memory) != depth:
            got = f"a {type(memory).__name__} of length {len(memory)}" if isinstance(memory, (list, tuple)) else type(memory).__name__
            raise ValueError(f"{self.attention}: memory must be the list of {depth} per-layer states returned by "
                             f"lm(tokens, return_state=True), got {got}")
        return int(getattr(memory[0], "length", 0) or 0)

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states (..., dim) -> logits (..., V)."""
        return self.head(h if self.head_proj is None else self.head_proj(h))

    def aux_losses(self) -> dict[str, AuxLoss]:
        return collect_aux_losses(self)

    def _check_length(self, n: int) -> None:
        if n > self.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds the model's max_seq_len={self.max_seq_len}")

    def _step(self, tokens: Tensor, states: list | None, offset: int) -> tuple[Tensor, list]:
        reset_aux_losses(self)
        x = self.embed(tokens, offset)  # (B, n, dim)
        h, states = self.stack(x, None, states, return_states=True)  # (B, n, dim)
        return self.logits(h[:, -1]), states  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        memory: list | None = None,
    ) -> Tensor:
        """prompt (B, N0) -> (B, N0 + max_new_tokens). top_k=1 is greedy decoding.

        `memory` (from `lm(tokens, memory=..., return_state=True)`): the prompt continues that stream,
        e.g. generation after evaluating a long text through Transformer-XL's memory."""
        check_tokens(prompt, self.vocab_size, "prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r} (use top_k=1 for greedy decoding)")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        self._check_length(prompt.shape[1] if self.streams_past_max_len else prompt.shape[1] + max_new_tokens)
        offset = self._check_memory(memory, prompt.shape[0])
        was_training = self.training
        self.eval()
        try:
            out = prompt
            if max_new_tokens == 0:
                return out
            logits, states = self._step(prompt, None if memory is None else list(memory), offset)  # prefill: (B, V)
            for i in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, generator)  # (B, 1)
                out = torch.cat([out, nxt], dim=1)
                if i + 1 < max_new_tokens:
                    logits, states = self._step(nxt, states, offset + out.shape[1] - 1)
            return out
        finally:
            self.train(was_training)


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    logits = logits.float() / temperature  # (B, V)
    if top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
