"""The registry of attention mechanisms: cards, registration and construction.

Registering a mechanism is one decorator next to its class::

    @register(Card(name="performer", title="Performer", ...))
    class PerformerAttention(AttentionLayer):
        ...

`mechanisms()` lists the cards in the survey's Table 1 order (vanilla first), `card(name)` returns one,
and `build_attention(name, dim, heads, causal, **options)` builds the layer after checking every
argument against the card, so unknown names, unknown options and unsupported modes fail with a
`ValueError` that names the mechanism, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

# The survey's Table 1 order (after the baseline). Registration order does not matter: listings follow this.
SURVEY_ORDER: tuple[str, ...] = (
    "vanilla",
    "memory_compressed",
    "image_transformer",
    "set_transformer",
    "transformer_xl",
    "sparse_transformer",
    "reformer",
    "routing",
    "axial",
    "compressive",
    "sinkhorn",
    "longformer",
    "etc",
    "synthesizer",
    "performer",
    "linformer",
    "linear_transformer",
    "bigbird",
)

TAXONOMY: dict[str, str] = {
    "Dense": "dense exact attention (the baseline)",
    "FP": "fixed patterns",
    "CP": "combination of patterns",
    "LP": "learnable patterns",
    "M": "(neural) memory",
    "LR": "low rank",
    "KR": "kernels",
    "RC": "recurrence",
    "DS": "downsampling",
}

DECODING_KINDS = ("kv_cache", "recurrent", "recompute", "none")


@dataclass(frozen=True)
class Card:
    """What the survey says about a mechanism, plus the options its layer accepts.

    `options` maps every keyword option `build_attention` accepts for this mechanism to its default.
    `decoding` says how a causal layer carries `state` between generation steps: "kv_cache" (the keys
    and values that can still be attended), "recurrent" (running sums of constant size), "recompute"
    (no cheaper incremental form: the history is kept and the attention recomputed) or "none"
    (not causal). `fixed_pattern` is True when the layer exposes `dense_mask(N)`.
    """

    name: str
    title: str
    paper: str
    year: int
    complexity: str
    classes: tuple[str, ...]
    causal: bool
    bidirectional: bool
    options: dict[str, Any] = field(default_factory=dict)
    decoding: str = "none"
    fixed_pattern: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.name not in SURVEY_ORDER:
            raise ValueError(f"card name {self.name!r} is not one of the survey's mechanisms {list(SURVEY_ORDER)}")
        unknown = [c for c in self.classes if c not in TAXONOMY]
        if unknown:
            raise ValueError(f"card {self.name!r}: unknown taxonomy classes {unknown}; allowed: {list(TAXONOMY)}")
        if self.decoding not in DECODING_KINDS:
            raise ValueError(f"card {self.name!r}: decoding={self.decoding!r}; allowed: {list(DECODING_KINDS)}")
        if self.causal == (self.decoding == "none"):
            raise ValueError(f"card {self.name!r}: a causal card needs a decoding kind, a non-causal one 'none'")

    @property
    def modes(self) -> tuple[bool, ...]:
        """The values of `causal` this mechanism supports."""
        return tuple(c for c, ok in ((False, self.bidirectional), (True, self.causal)) if ok)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        return out


_REGISTRY: dict[str, tuple[Card, type]] = {}


def register(card: Card) -> Callable[[type], type]:
    """Class decorator: register `cls` under `card.name` and attach the card as `cls.card`."""

    def decorate(cls: type) -> type:
        if card.name in _REGISTRY and _REGISTRY[card.name][1] is not cls:
            raise ValueError(f"mechanism {card.name!r} is registered twice")
        cls.card = card
        _REGISTRY[card.name] = (card, cls)
        return cls

    return decorate


def _ensure_loaded() -> None:
    from . import attention  # noqa: F401  (importing registers every mechanism)


def mechanisms() -> list[Card]:
    """Every registered mechanism's card, in the survey's Table 1 order."""
    _ensure_loaded()
    return [_REGISTRY[name][0] for name in SURVEY_ORDER if name in _REGISTRY]


def mechanism_names() -> list[str]:
    return [c.name for c in mechanisms()]


def _lookup(name: str) -> tuple[Card, type]:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attention mechanism {name!r}; registered: {mechanism_names()}")
    return _REGISTRY[name]


def card(name: str) -> Card:
    """The card of one registered mechanism."""
    return _lookup(name)[0]


def mechanism_class(name: str) -> type:
    return _lookup(name)[1]


def build_attention(name: str, dim: int, heads: int, causal: bool = False, **options: Any):
    """Build the attention layer `name` (an `nn.Module`) after validating every argument against its card."""
    the_card, cls = _lookup(name)
    if not isinstance(causal, bool):
        raise ValueError(f"{name}: causal must be a bool, got {causal!r}")
    if causal and not the_card.causal:
        raise ValueError(
            f"{name}: causal=True is not supported ({the_card.title} cannot be used as a decoder: "
            f"{the_card.notes or 'the survey marks it as not decodable'}); allowed: causal=False"
        )
    if not causal and not the_card.bidirectional:
        raise ValueError(f"{name}: causal=False is not supported; allowed: causal=True")
    unknown = sorted(set(options) - set(the_card.options))
    if unknown:
        allowed = sorted(the_card.options) or "none"
        raise ValueError(f"{name}: unknown option(s) {unknown}; allowed options: {allowed}")
    merged = {**the_card.options, **options}
    return cls(dim=dim, heads=heads, causal=causal, **merged)
