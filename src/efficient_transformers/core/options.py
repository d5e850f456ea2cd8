"""Option checks shared by every mechanism: one wording for every error.

Each check returns the value when it is allowed and otherwise raises a `ValueError` that names the
mechanism, the option, the bad value and what is allowed, e.g.

    linformer: k must be a positive int, got 0; allowed: an int >= 1

Booleans are never accepted where an int is asked (`True` is an int in Python), and None only where
the check says so (`optional_positive_int`, `choice` with None among the choices).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(mechanism: str, option: str, value: Any, *, what: str = "") -> int:
    """An int >= 1. `what` adds a short gloss after the option's name ("k (the projected length)")."""
    if not _is_int(value) or value < 1:
        label = f"{option} ({what})" if what else option
        raise ValueError(f"{mechanism}: {label} must be a positive int, got {value!r}; allowed: an int >= 1")
    return value


def optional_positive_int(mechanism: str, option: str, value: Any, *, none_means: str = "") -> int | None:
    """None or an int >= 1; `none_means` says what None does ("no redraw")."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        gloss = f" ({none_means})" if none_means else ""
        raise ValueError(f"{mechanism}: {option} must be None{gloss} or a positive int, got {value!r}; "
                         f"allowed: None or an int >= 1")
    return value


def int_in_range(mechanism: str, option: str, value: Any, low: int, high: int | None = None) -> int:
    """An int with low <= value (<= high when given)."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{mechanism}: {option} must be {allowed}, got {value!r}; allowed: {allowed}")
    return value


def number_in_range(mechanism: str, option: str, value: Any, low: float, high: float | None = None,
                    *, low_inclusive: bool = True) -> float:
    """A real number (not a bool) in [low, high] ((low, high] with low_inclusive=False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        left = "[" if low_inclusive else "("
        allowed = f"a number in {left}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{mechanism}: {option} must be {allowed}, got {value!r}; allowed: {allowed}")
    return float(value)


def boolean(mechanism: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{mechanism}: {option} must be a bool, got {value!r}; allowed: True or False")
    return value


def choice(mechanism: str, option: str, value: Any, allowed: Iterable[Any], *, hint: str = "") -> Any:
    """One of `allowed` (compared with ==; None may be among them). `hint` is appended to the error."""
    allowed = list(allowed)
    if not any(value is a or (value == a and type(value) is type(a)) for a in allowed):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{mechanism}: unknown {option} {value!r}; allowed: {allowed}{extra}")
    return value


def positive_int_tuple(mechanism: str, option: str, value: Any, *, length: int | None = None,
                       min_length: int = 1) -> tuple[int, ...]:
    """A tuple (or list) of ints >= 1, e.g. a data shape (H, W); `length` fixes how many."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and all(_is_int(v) and v >= 1 for v in value)
    ok = ok and (len(value) == length if length is not None else len(value) >= min_length)
    if not ok:
        count = f"{length}" if length is not None else f"at least {min_length}"
        raise ValueError(f"{mechanism}: {option} must be a tuple of {count} positive ints, got {value!r}; "
                         f"allowed: e.g. {tuple([32] * (length or max(min_length, 2)))}")
    return tuple(int(v) for v in value)
