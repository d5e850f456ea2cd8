"""Argument types shared by the `eft` subcommands: each parses one command-line value or raises
`argparse.ArgumentTypeError` with what was expected (argparse turns it into a message and exit 2)."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        return None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    value = _number(text)
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_float(what: str = "number"):
    """A parser of positive finite numbers; `what` names them in the error ("number of MiB")."""

    def parse(text: str) -> float:
        value = _number(text)
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value

    return parse


def fraction(what: str = "fraction in [0, 1)"):
    """A parser of numbers in [0, 1); `what` says what the value is for."""

    def parse(text: str) -> float:
        value = _number(text)
        if value is None or not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
        return value

    return parse


def positive_int_list(text: str) -> list[int]:
    values = [positive_int(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like '1,2,4', got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names like 'vanilla,performer', got {text!r}")
    return names


def length_list(text: str) -> list[int]:
    """'1024,4k' -> [1024, 4096]."""
    values = []
    for token in text.split(","):
        token = token.strip().lower()
        scale = 1024 if token.endswith("k") else 1
        value = _number(token[:-1] if scale > 1 else token, int)
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(
                f"bad length {token!r} in {text!r}: expected positive integers like '1024,4096' (or '1k,4k')")
        values.append(value * scale)
    return values


def threads(text: str) -> int | str:
    """A positive thread count or 'auto'."""
    if text == "auto":
        return text
    value = _number(text, int)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"bad thread count {text!r}: expected a positive int or 'auto'")
    return value
