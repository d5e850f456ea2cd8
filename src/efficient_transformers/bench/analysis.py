"""Derived figures of `eft bench`, computed from the rows alone (pure functions, no torch).

- **slope**: least-squares fit of log(value) against log(N) over the `points` largest lengths where
  the configuration ran (default 3); t = c N^p gives p. This is the survey's complexity column,
  measured: about 2 for quadratic, 1 for linear work. Small N is left out on purpose: there, fixed
  costs (projections, Python, kernel launches) flatten every curve.
- **stated exponent**: the power of N in the card's complexity string, read by a small parser
  (`O(N^2)` -> 2, `O(N log N)` -> 1 plus a log, `O(N√N)` -> 1.5, `O(n(k+m))` -> 1; symbols other than
  N and N_c, the compressed length N/c, count as constants; no N at all -> None).
- **check**: a measured slope above the stated exponent (+ 0.3 for memory and FLOPs, + 0.5 for the
  noisier time; + 0.15 more with a log factor) is flagged: the implementation does more work or
  keeps more memory than its complexity says (DESIGN.md section 3: "quadratic in disguise"). The
  FLOPs slope is exact (no noise) but sees only matrix products; memory sees everything.
- **crossover length**: per mode, the smallest measured N from which the mechanism is faster than
  vanilla at that N and at every larger measured N. "Faster" at N means the mechanism ran and either
  its paired time ratio to vanilla is below 1 or vanilla did not run there (out of memory or time);
  lengths where neither ran are skipped. Null when it is not faster at the largest such N.
- **ceiling fraction median**: per mode, the median over the lengths where it ran of the row's
  fraction of its ceiling (its matrix products alone / its step, `products.py`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

SLOPE_POINTS = 3
SLOPE_TOLERANCE = 0.3  # memory and FLOPs
TIME_SLOPE_TOLERANCE = 0.5  # time: noisier on a shared machine, and caches bend it
LOG_ALLOWANCE = 0.15
BASELINE = "vanilla"
LENGTH_SYMBOLS = {"n", "n_c"}  # proportional to the sequence length (N_c = N / compression)


def fit_loglog_slope(points: Iterable[tuple[float, float | None]], top: int = SLOPE_POINTS) -> float | None:
    """Slope of log(value) on log(N) over the `top` largest N with a positive value; None below 2 points."""
    usable = sorted((n, v) for n, v in points if v is not None and v > 0 and n > 0)[-top:]
    if len({n for n, _ in usable}) < 2:
        return None
    xs = [math.log(n) for n, _ in usable]
    ys = [math.log(v) for _, v in usable]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ---------------------------------------------------------------------------------------- stated complexity
_TOKEN = re.compile(r"\s*(log|sqrt|√|[a-z](?:_[a-z0-9]+)?|\d+(?:\.\d+)?|[()^+/])")


def expected_exponent(complexity: str) -> tuple[float, bool] | None:
    """(power of N, whether a log factor appears) for a complexity like "O(N log N)"; None if unreadable
    or if N does not appear."""
    text = complexity.strip().lower()
    for plain, ascii_form in (("²", "^2"), ("³", "^3"), ("**", "^"), ("·", ""), ("×", ""), ("*", "")):
        text = text.replace(plain, ascii_form)
    match = re.fullmatch(r"o\s*\((.*)\)", text)
    if not match or re.search(r"[a-z]{4,}", re.sub(r"log|sqrt", " ", match.group(1))):
        return None  # not an expression in single-letter symbols (e.g. "O(layers x segment length)")
    tokens, pos, body = [], 0, match.group(1)
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    parser = _ExponentParser(tokens)
    try:
        exponent = parser.expression()
    except (IndexError, ValueError):
        return None
    if parser.pos != len(tokens) or exponent <= 0:
        return None
    return exponent, parser.saw_log


class _ExponentParser:
    """expression := term ('+' term)* ; term := factor+ ('/' factor)* ; factor := atom ('^' number)? ;
    atom := symbol | number | '(' expression ')' | ('sqrt' | '√') atom | 'log' atom. Value: power of N."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos, self.saw_log = tokens, 0, False

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expression(self) -> float:
        value = self.term()
        while self._peek() == "+":
            self._take()
            value = max(value, self.term())
        return value

    def term(self) -> float:
        value = self.factor()
        while self._peek() not in (None, "+", ")"):
            if self._peek() == "/":
                self._take()
                value -= self.factor()
            else:
                value += self.factor()
        return value

    def factor(self) -> float:
        value = self.atom()
        if self._peek() == "^":
            self._take()
            value *= float(self._take())
        return value

    def atom(self) -> float:
        token = self._take()
        if token == "(":
            value = self.expression()
            if self._take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if token in ("sqrt", "√"):
            return 0.5 * self.atom()
        if token == "log":
            self.saw_log = True
            self.atom()
            return 0.0
        if token[0].isdigit():
            return 0.0
        if token in (")", "^", "+", "/"):
            raise ValueError(f"unexpected {token!r}")
        return 1.0 if token in LENGTH_SYMBOLS else 0.0


def format_exponent(parsed: tuple[float, bool] | None) -> str:
    if parsed is None:
        return "?"
    exponent, has_log = parsed
    text = f"{exponent:g}"
    return f"{text} (+log)" if has_log else text


def exceeds_stated(slope: float | None, parsed: tuple[float, bool] | None,
                   tolerance: float = SLOPE_TOLERANCE) -> bool | None:
    """True when a measured slope is above the stated exponent by more than the tolerance."""
    if slope is None or parsed is None:
        return None
    exponent, has_log = parsed
    return slope > exponent + tolerance + (LOG_ALLOWANCE if has_log else 0.0)


# ---------------------------------------------------------------------------------------- crossover
def crossover_length(rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]) -> int | None:
    """See the module docstring. `rows` and `baseline_rows`: one mode's rows of the mechanism and of
    vanilla (any order)."""
    baseline = {r["seq_len"]: r for r in baseline_rows}
    verdicts: list[tuple[int, bool]] = []
    for row in sorted(rows, key=lambda r: r["seq_len"]):
        ref = baseline.get(row["seq_len"])
        ref_ok = ref is not None and ref["status"] == "ok"
        if row["status"] != "ok":
            if ref_ok:
                verdicts.append((row["seq_len"], False))
            continue  # neither ran: no evidence either way
        ratio = row.get("time_ratio_vs_vanilla")
        verdicts.append((row["seq_len"], (not ref_ok) or (ratio is not None and ratio < 1.0)))
    crossover = None
    for n, faster in reversed(verdicts):
        if not faster:
            break
        crossover = n
    return crossover


# ---------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], complexities: dict[str, str], points: int = SLOPE_POINTS) -> dict[str, Any]:
    """summary[mechanism][mode] with slopes, their check against the stated complexity, the crossover
    length and the figures at the largest length where the mechanism ran."""
    summary: dict[str, Any] = {}
    for mechanism in dict.fromkeys(r["mechanism"] for r in rows):
        parsed = expected_exponent(complexities.get(mechanism, ""))
        per_mode: dict[str, Any] = {}
        for mode in dict.fromkeys(r["mode"] for r in rows if r["mechanism"] == mechanism):
            mine = [r for r in rows if r["mechanism"] == mechanism and r["mode"] == mode]
            ok = sorted((r for r in mine if r["status"] == "ok"), key=lambda r: r["seq_len"])
            baseline = [r for r in rows if r["mechanism"] == BASELINE and r["mode"] == mode]
            time_slope = fit_loglog_slope([(r["seq_len"], r["time_ms"]) for r in ok], points)
            mem_slope = fit_loglog_slope([(r["seq_len"], r["peak_mem_mb"]) for r in ok], points)
            flops_slope = fit_loglog_slope([(r["seq_len"], r["flops"]) for r in ok], points)
            last = ok[-1] if ok else None
            per_mode[mode] = {
                "time_slope": time_slope,
                "mem_slope": mem_slope,
                "flops_slope": flops_slope,
                "slope_lengths": [r["seq_len"] for r in ok][-points:],
                "stated_complexity": complexities.get(mechanism),
                "stated_exponent": None if parsed is None else parsed[0],
                "stated_has_log": None if parsed is None else parsed[1],
                "time_exceeds_stated": exceeds_stated(time_slope, parsed, TIME_SLOPE_TOLERANCE),
                "mem_exceeds_stated": exceeds_stated(mem_slope, parsed),
                "flops_exceeds_stated": exceeds_stated(flops_slope, parsed),
                "crossover_len": None if mechanism == BASELINE or not baseline else crossover_length(mine, baseline),
                "max_len_run": last["seq_len"] if last else None,
                "speedup_at_max_len": last.get("speedup_vs_vanilla") if last else None,
                "mem_ratio_at_max_len": last.get("mem_ratio_vs_vanilla") if last else None,
                "ceiling_fraction_median": _median([r.get("ceiling_fraction") for r in ok]),
                "statuses": {s: sum(r["status"] == s for r in mine) for s in dict.fromkeys(r["status"] for r in mine)},
            }
        summary[mechanism] = per_mode
    return summary


def _median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


def add_memory_ratios(rows: list[dict[str, Any]]) -> None:
    """Set `mem_ratio_vs_vanilla` on every row: its peak over vanilla's at the same (N, mode)."""
    baseline = {(r["seq_len"], r["mode"]): r.get("peak_mem_mb") for r in rows
                if r["mechanism"] == BASELINE and r["status"] == "ok"}
    for row in rows:
        ref = baseline.get((row["seq_len"], row["mode"]))
        mine = row.get("peak_mem_mb")
        row["mem_ratio_vs_vanilla"] = mine / ref if (row["status"] == "ok" and mine is not None and ref) else None
