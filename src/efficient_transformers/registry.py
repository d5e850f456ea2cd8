"""The registry of attention mechanisms: cards, registration and construction.

Registering a mechanism is one decorator next to its class::

    @register(Card(name="performer", title="Performer", ...))
    class PerformerAttention(AttentionLayer):
        def __init__(self, dim, heads, causal=False, *, nb_features: int = 256, ...): ...

The card's `options` are the constructor's keyword-only parameters with their defaults, read at
registration, so they are written once.

`mechanisms()` lists the cards in the survey's Table 1 order (vanilla first), `card(name)` returns one,
and `build_attention(name, dim, heads, causal, **options)` builds the layer after checking every
argument against the card, so unknown names, unknown options and unsupported modes fail with a
`ValueError` that names the mechanism, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
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
    """What the survey says about a mechanism, plus what its layer accepts and needs.

    Survey facts: `name`, `title`, `paper`, `year`, `complexity`, `classes` (taxonomy codes), `causal`
    (usable as a decoder, with generation) and `bidirectional` (usable as an encoder).

    The layer's contract:
    - `options` maps every keyword option `build_attention` accepts to its default. Written once: it
      is derived at registration from the layer constructor's keyword-only defaults (a card that
      spells it out must agree, or registration fails).
    - `decoding`: how a causal layer carries `state` between generation steps: "kv_cache" (the keys
      and values that can still be attended), "recurrent" (a state of constant size: running sums, memories),
      "recompute" (no cheaper incremental form: the history is kept and the attention recomputed)
      or "none" (not causal).
    - `fixed_pattern`: the layer exposes `dense_mask(N)`, (N, N) or per head (H, N, N).
    - `global_tokens`: the layer takes a per-call `global_mask` (B, N) bool of positions that attend
      to all and are attended by all; models mark their CLS token global. Other layers refuse one.
    - `own_positions`: the mechanism brings its own (relative) positions, so models add no absolute
      position embedding by default.
    - `updates_buffers_in_training`: the layer changes buffers during training by design (moving-
      average centroids, feature redraw); the conformance suite then checks only that eval never
      changes them, instead of "train equals eval".
    - `test_options` (both modes) and `causal_test_options` (added when causal): options that make
      the layer small enough for the conformance suite's tiny shapes while exercising its structure
      (a block size of 4, 16 features). The suite also runs every mechanism at its defaults.
    - `uses_shape` (derived: the layer has a `shape` option): models pass their 2-D data shape.
    """

    name: str
    title: str
    paper: str
    year: int
    complexity: str
    classes: tuple[str, ...]
    causal: bool
    bidirectional: bool
    options: dict[str, Any] | None = None
    decoding: str = "none"
    fixed_pattern: bool = False
    global_tokens: bool = False
    own_positions: bool = False
    updates_buffers_in_training: bool = False
    test_options: dict[str, Any] = field(default_factory=dict)
    causal_test_options: dict[str, Any] = field(default_factory=dict)
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
        if self.causal_test_options and not self.causal:
            raise ValueError(f"card {self.name!r}: causal_test_options on a card that is not causal")

    @property
    def modes(self) -> tuple[bool, ...]:
        """The values of `causal` this mechanism supports."""
        return tuple(c for c, ok in ((False, self.bidirectional), (True, self.causal)) if ok)

    @property
    def uses_shape(self) -> bool:
        """The layer lays the sequence out on an n-D grid given by its `shape` option."""
        return "shape" in (self.options or {})

    def small_options(self, causal: bool) -> dict[str, Any]:
        """The conformance suite's options for one mode: test_options, plus causal_test_options when causal."""
        return {**self.test_options, **(self.causal_test_options if causal else {})}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        out["uses_shape"] = self.uses_shape
        return out


def constructor_options(cls: type) -> dict[str, Any]:
    """The keyword-only parameters of `cls.__init__` and their defaults (every one must have a default)."""
    options = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise ValueError(f"{cls.__name__}: keyword option {name!r} has no default; every option needs one")
        options[name] = p.default
    return options


_REGISTRY: dict[str, tuple[Card, type]] = {}


def register(card: Card) -> Callable[[type], type]:
    """Class decorator: register `cls` under `card.name` and attach the card as `cls.card`."""

    def decorate(cls: type) -> type:
        if card.name in _REGISTRY and _REGISTRY[card.name][1] is not cls:
            raise ValueError(f"mechanism {card.name!r} is registered twice")
        options = constructor_options(cls)
        if card.options is not None and card.options != options:
            raise ValueError(f"card {card.name!r}: options {card.options} differ from the constructor's {options}")
        full = dataclasses.replace(card, options=options)
        for label, given in (("test_options", full.test_options), ("causal_test_options", full.causal_test_options)):
            unknown = sorted(set(given) - set(options))
            if unknown:
                raise ValueError(f"card {card.name!r}: {label} names unknown options {unknown}; allowed: {sorted(options)}")
        cls.card = full
        _REGISTRY[card.name] = (full, cls)
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
