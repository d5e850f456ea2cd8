"""`eft models NAME`: one mechanism's card in full, from the registry and the mechanism's own module.

    eft models linformer                                  # the card, as text
    eft models performer --json                           # the same as JSON
    eft models performer --bench eft-report/bench.json    # plus its measured rows on this machine

Everything shown is read, not written down here: the card's fields (registry.Card), the meaning of
its taxonomy classes (registry.TAXONOMY) and decoding kind, the options with their defaults (the
card), the allowed values of a choice option (the mechanism's own ValueError for a value it does not
take: DESIGN.md has every such error say what is allowed), each option's description (the bullet or
"Option `name`" sentence of the module docstring) and the method (the module docstring's first
paragraphs, through the one that states the cost). With `--bench FILE`, the rows and the summary
(slopes, crossover) that an `eft bench` JSON holds for the mechanism.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import re
import sys
import textwrap
import warnings
from typing import Any

from .formatting import aligned_table
from . import registry

DECODING_MEANING = {
    "kv_cache": "a KV cache: the keys and values that can still be attended",
    "recurrent": "a recurrent state of constant size whatever the prefix length (running sums for kernel attention, memories for recurrence)",
    "recompute": "recomputation: no cheaper incremental form, the history is kept and attention recomputed",
    "none": "cannot decode (not causal)",
}
_BAD_CHOICE = "<not-a-valid-choice>"
_COST = re.compile(r"\bcost|\bO\(", re.IGNORECASE)


class CardError(ValueError):
    """Unknown mechanism or a bench file without it: one message, exit status 2."""


# ---------------------------------------------------------------------------------------- reading
def allowed_values(name: str, option: str, default: Any) -> dict[str, Any] | None:
    """What the mechanism accepts for a string-valued option: {"values": [...] or None, "text": ...},
    read from the ValueError it raises for a value it does not take; None when it is not a choice."""
    if not isinstance(default, str):
        return None
    card = registry.card(name)
    options: dict[str, Any] = {option: _BAD_CHOICE}
    if "max_seq_len" in card.options and option != "max_seq_len":
        options["max_seq_len"] = 16  # keep whatever is built before the check small
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry.build_attention(name, 64, 4, card.modes[0], **options)
    except ValueError as err:
        match = re.search(r"allowed(?: values)?:\s*(.+)$", str(err), re.DOTALL)
        if not match or _BAD_CHOICE not in str(err):  # another complaint than about this value
            return None
        text = match.group(1).strip()
        values = None
        if text.startswith("["):
            depth = 0
            for i, ch in enumerate(text):
                depth += ch == "["
                depth -= ch == "]"
                if depth == 0:
                    try:
                        parsed = ast.literal_eval(text[: i + 1])
                    except (ValueError, SyntaxError):
                        break
                    if isinstance(parsed, list):
                        values, rest = parsed, text[i + 1:].strip()
                        text = rest[1:-1] if rest.startswith("(") and rest.endswith(")") else rest
                    break
        return {"values": values, "text": text or None}
    except Exception:  # noqa: BLE001  (any other failure: the allowed values are simply not known)
        return None
    return None  # the mechanism took the value: a free-form string


def option_doc(doc: str, option: str) -> str | None:
    """The module docstring's description of `option`: its "- `option` ..." bullet (with continuation
    lines) or the paragraph that begins "Option `option`"."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith(f"- `{option}`"):
            body = [stripped[len(f"- `{option}`"):].lstrip(" :,")]
            for nxt in lines[i + 1:]:
                nxt_stripped = nxt.lstrip()
                if not nxt_stripped or (nxt_stripped.startswith("- ") and len(nxt) - len(nxt_stripped) <= indent):
                    break
                body.append(nxt_stripped)
            return " ".join(" ".join(body).split()).rstrip(";").strip() or None
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        prefix = re.match(rf"Options? `{re.escape(option)}`[\s:,]*", text)
        if prefix:
            return text[prefix.end():] or None
    return None


def description(doc: str) -> list[str]:
    """The docstring's first paragraphs, through the first that states the cost (at least two)."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    paragraphs = [p for p in paragraphs if p.strip()]
    out = []
    for p in paragraphs:
        out.append(p)
        if len(out) >= 2 and _COST.search(p):
            break
    return out


def _bench_part(name: str, bench: dict[str, Any], path: str) -> dict[str, Any]:
    rows = [r for r in bench["rows"] if r["mechanism"] == name]
    if not rows:
        measured = bench["config"].get("mechanisms") or sorted({r["mechanism"] for r in bench["rows"]})
        raise CardError(f"{path} has no rows for {name!r}; it measured: {measured}")
    keep = ("seq_len", "mode", "status", "error", "time_ms", "speedup_vs_vanilla", "time_ratio_vs_vanilla",
            "peak_mem_mb", "mem_ratio_vs_vanilla", "flops", "gflops_per_s")
    config = bench["config"]
    return {"mechanism": name, "path": path, "device_name": config.get("device_name"), "threads": config.get("threads"),
            "torch_version": config.get("torch_version"), "started_at": config.get("started_at"),
            "setting": {k: config.get(k) for k in ("batch", "dim", "heads", "dtype", "causal", "device")},
            "rows": [{k: r.get(k) for k in keep} for r in sorted(rows, key=lambda r: (r["mode"], r["seq_len"]))],
            "summary": bench["summary"].get(name, {})}


def _check_name(name: str) -> None:
    names = registry.mechanism_names()
    if name not in names:
        close = [n for n in names if isinstance(name, str) and name and name.lower() in n] or \
            difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CardError(f"unknown mechanism {name!r}{hint}; registered: {names}")


def card_info(name: str, bench: dict[str, Any] | None = None, bench_path: str | None = None) -> dict[str, Any]:
    """Everything `eft models NAME` shows, as a JSON-ready dict. CardError for an unknown name."""
    _check_name(name)
    card = registry.card(name)
    cls = registry.mechanism_class(name)
    module = inspect.getmodule(cls)
    doc = inspect.cleandoc(module.__doc__ or cls.__doc__ or "")
    options = []
    for option, default in card.options.items():
        allowed = allowed_values(name, option, default)
        options.append({"name": option, "default": default,
                        "allowed": allowed["values"] if allowed else ([True, False] if isinstance(default, bool) else None),
                        "allowed_text": allowed["text"] if allowed else None, "doc": option_doc(doc, option)})
    return {
        "card": card.to_json(),
        "taxonomy": {c: registry.TAXONOMY[c] for c in card.classes},
        "decoding_meaning": DECODING_MEANING.get(card.decoding, card.decoding),
        "options": options,
        "module": module.__name__ if module else None,
        "class": cls.__name__,
        "description": description(doc) if doc else [],
        "docstring": doc,
        "bench": _bench_part(name, bench, bench_path or "the bench file") if bench is not None else None,
    }


# ---------------------------------------------------------------------------------------- rendering
def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def card_text(info: dict[str, Any], width: int = 100) -> str:
    c = info["card"]
    yes_no = lambda v: "yes" if v else "no"  # noqa: E731
    out = [f"{c['title']} (`{c['name']}`), {c['year']}", c["paper"], ""]
    facts = [
        ("complexity", c["complexity"]),
        ("taxonomy", "; ".join(f"{k}: {v}" for k, v in info["taxonomy"].items())),
        ("causal (decoder)", yes_no(c["causal"]) + ("" if c["causal"] or not c["notes"] else f": {c['notes']}")),
        ("bidirectional", yes_no(c["bidirectional"])),
        ("decoding", f"{c['decoding']}: {info['decoding_meaning']}"),
        ("fixed pattern", yes_no(c["fixed_pattern"]) + (" (exposes dense_mask(N))" if c["fixed_pattern"] else "")),
        ("implementation", f"{info['module']}.{info['class']}"),
    ]
    if c["notes"] and c["causal"]:
        facts.append(("notes", c["notes"]))
    key_width = max(len(k) for k, _ in facts)
    out += [f"{k.ljust(key_width)}  {v}" for k, v in facts]
    out += ["", "Options (keywords of build_attention, with defaults):" if info["options"] else "Options: none"]
    for o in info["options"]:
        line = f"  {o['name']} = {o['default']!r}"
        if o["allowed"] is not None:
            line += "    allowed: " + ", ".join(repr(v) for v in o["allowed"])
            if o["allowed_text"]:
                line += f" ({o['allowed_text']})"
        elif o["allowed_text"]:
            line += f"    allowed: {o['allowed_text']}"
        out.append(line)
        if o["doc"]:
            out += textwrap.wrap(o["doc"], width=width, initial_indent="      ", subsequent_indent="      ",
                                 break_on_hyphens=False)
    if info["description"]:
        out += ["", f"Method (from the docstring of {info['module']}):", ""]
        for p in info["description"]:
            if p.startswith(" "):  # an equation block: keep its layout
                out += ["  " + line for line in p.splitlines()]
            else:
                out += textwrap.wrap(" ".join(p.split()), width=width, initial_indent="  ", subsequent_indent="  ",
                                     break_on_hyphens=False)
            out.append("")
        out.pop()
    if info["bench"]:
        out += ["", *_bench_text(info["bench"])]
    return "\n".join(out)


def _bench_text(b: dict[str, Any]) -> list[str]:
    s = b["setting"]
    out = [f"Measured ({b['path']}, {b['started_at']}): one layer, batch {s['batch']}, dim {s['dim']}, {s['heads']} heads, "
           f"{s['dtype']}, causal={s['causal']}, on {s['device']} ({b['device_name']}, {b['threads']} torch threads, "
           f"torch {b['torch_version']})", ""]
    header = ["mode", "N", "time ms", "speed-up vs vanilla", "peak MiB", "memory vs vanilla", "GFLOP/s"]
    rows = []
    for r in b["rows"]:
        if r["status"] != "ok":
            rows.append([r["mode"], str(r["seq_len"]), f"{r['status']}: {(r['error'] or '')[:60]}", "", "", "", ""])
            continue
        rows.append([r["mode"], str(r["seq_len"]), _num(r["time_ms"]),
                     "—" if r["speedup_vs_vanilla"] is None else f"{r['speedup_vs_vanilla']:.2f}×",
                     _num(r["peak_mem_mb"], 1),
                     "—" if r["mem_ratio_vs_vanilla"] is None else f"{r['mem_ratio_vs_vanilla']:.2f}×",
                     _num(r["gflops_per_s"], 1)])
    out += aligned_table(header, rows).split("\n")
    for mode, summary in b["summary"].items():
        slope = lambda key: "—" if summary.get(key) is None else f"{summary[key]:.2f}"  # noqa: E731
        cross = summary.get("crossover_len")
        cross_text = ("baseline" if b["mechanism"] == "vanilla" else
                      f"N = {cross}" if cross is not None else "none in the measured range")
        out.append(f"{mode}: time slope {slope('time_slope')}, memory slope {slope('mem_slope')}, FLOPs slope "
                   f"{slope('flops_slope')} (stated {summary.get('stated_complexity')}); faster than vanilla from: "
                   f"{cross_text}")
    return out


def run(args) -> int:
    """`eft models NAME [--json] [--bench FILE] [--any-machine]`."""
    from .bench.benchfile import BenchFileError, check_same_machine, load_bench_file

    try:
        _check_name(args.name)
        bench = None
        if args.bench:
            bench = load_bench_file(args.bench)
            if not args.any_machine:
                check_same_machine(bench, args.bench)
        info = card_info(args.name, bench, args.bench)
    except (CardError, BenchFileError) as err:
        print(f"eft models: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=repr) if args.json else card_text(info))
    return 0
