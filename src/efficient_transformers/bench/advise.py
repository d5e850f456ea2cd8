"""`eft advise`: which attention mechanism for this length and budget, measured on this machine.

    eft advise --length 4096 --causal                          # train step, batch 1, dim 256, 4 heads
    eft advise --length 2k --mode inference --max-memory-mb 64 --json
    eft advise --length 1024 --bench eft-report/bench.json --lra lra/lra.json

The survey's closing point: lower complexity is not higher throughput, and only a measurement on the
hardware at hand says which mechanism to use. The figures come from

1. a given `eft bench` JSON (`--bench FILE`) when it covers the setting (same batch, dim, heads,
   dtype, device and causality, the mode, and the length N among its lengths), measured on this
   machine (the file's device name must be this machine's; `--any-machine` overrides);
2. otherwise a short, focused benchmark: `run_benchmark` (the same isolated memory probe and
   interleaved timing as `eft bench`) at N and one neighbour (N/2; 2N when N = 1), so that each
   mechanism's time ratio to vanilla has a slope and a crossover can be estimated. The result is
   cached as an ordinary bench folder under the user's cache folder (`$EFT_CACHE_DIR/advise`, else
   `$XDG_CACHE_HOME/efficient-transformers/advise`, else `~/.cache/efficient-transformers/advise`; or
   `--cache-dir`), keyed by the machine (CPU model and core count, OS and architecture; the GPU on
   cuda), the torch and package versions, a digest of the package's source files (a changed
   implementation measures again), the switches that choose its code paths (`EFT_MATMUL`,
   `EFT_NATIVE`, `EFT_BUFFER_POOL_MIB`), the torch thread count and every setting. The next run
   with the same key reuses it; any difference measures again (`--refresh` forces it).

Ranking: among the mechanisms that ran at N in the requested mode (train = forward + backward,
inference = forward; causal mechanisms only with `--causal`), those whose peak memory fits
`--max-memory-mb` (the step's memory above parameters and inputs, as `eft bench` measures it), by
median time per step. Everything else is listed with the reason (unsupported mode, out of memory or
time, error, over the budget). The crossover is the N at which the power-law fit of the paired time
ratio to vanilla through the measured lengths (at most N) crosses 1, or else the measured crossover
of `bench.analysis` (the smallest measured N from which it is faster).

Output: a table and a one-paragraph recommendation on stdout (`--json`: the advice as pure JSON on
stdout, messages on stderr), and OUT/advise.json, OUT/advise.md, OUT/advise.png (time and memory
against N, the user's N and budget marked). Exit status: 0 advice given; 2 bad input (unknown
mechanism, a length nothing can take, a budget nothing meets, a bench or LRA file of another schema
or machine); 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__ as PACKAGE_VERSION
from .. import registry
from . import analysis, harness
from .benchfile import BenchFileError, check_same_machine, load_bench_file
from ..formatting import aligned_table
from ..argtypes import length_list as _length_list, name_list as _name_list, positive_float
from ..argtypes import positive_int as _positive_int, threads as _threads
from .runner import QUICK_EFFORT, _cpu_name, load_average, machine_is_busy, run_benchmark

MODES = {"train": "train", "inference": "forward"}  # advise's names -> the benchmark's modes
MODE_TEXT = {"train": "training step (forward + backward)", "inference": "inference (forward)"}
DEFAULT_REPEATS = 10
DEFAULT_TIMEOUT_S = QUICK_EFFORT.timeout_s
CACHE_ENV = "EFT_CACHE_DIR"
CACHE_SCHEMA = 1
EXTRAPOLATION_SPAN = 4  # a fitted crossover further than this factor outside the measured lengths: only bounded
CLOSE_CALL = 0.10  # runner-up within 10% of the best: said to be within the noise
BASELINE = analysis.BASELINE


class AdviseError(ValueError):
    """Bad input or no possible advice: printed as one message, exit status 2."""


@dataclass(frozen=True)
class Settings:
    """What the user asked about; every field is part of the cache key."""

    length: int
    causal: bool = False
    mode: str = "train"  # "train" | "inference"
    batch: int = 1
    dim: int = 256
    heads: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    mechanisms: tuple[str, ...] | None = None  # None: every registered mechanism
    repeats: int = DEFAULT_REPEATS
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def bench_mode(self) -> str:
        return MODES[self.mode]

    def describe(self) -> str:
        return (f"N = {self.length}, {'causal' if self.causal else 'bidirectional'}, {MODE_TEXT[self.mode]}, "
                f"batch {self.batch}, dim {self.dim}, {self.heads} heads, {self.dtype} on {self.device}")


# ---------------------------------------------------------------------------------------- the command


_megabytes = positive_float("number of MiB")
_seconds = positive_float("number of seconds")


def _one_length(text: str) -> int:
    values = _length_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one length like 4096 or 4k, got {text!r}")
    return values[0]






def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=_one_length, required=True, metavar="N",
                        help="the sequence length to choose for (e.g. 4096 or 4k)")
    parser.add_argument("--causal", action="store_true", help="a decoder: only mechanisms that can be causal")
    parser.add_argument("--mode", choices=list(MODES), default="train",
                        help="train (forward + backward, default) or inference (forward)")
    parser.add_argument("--batch", type=_positive_int, default=1, help="batch size B (default 1)")
    parser.add_argument("--dim", type=_positive_int, default=256, help="model dimension (default 256)")
    parser.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dtype", choices=list(harness.DTYPES), default="float32", help="default float32")
    parser.add_argument("--device", choices=list(harness.DEVICES), default="cpu", help="default cpu")
    parser.add_argument("--max-memory-mb", type=_megabytes, default=None, metavar="M",
                        help="memory budget: peak memory of one step in MiB (above parameters and inputs)")
    parser.add_argument("--mechanisms", type=_name_list, default=None,
                        help="comma-separated registry names to consider (default: all registered)")
    parser.add_argument("--bench", default=None, metavar="FILE",
                        help="use this `eft bench` JSON when it covers the setting (else measure)")
    parser.add_argument("--any-machine", action="store_true",
                        help="accept a --bench file measured on another machine")
    parser.add_argument("--lra", default=None, metavar="FILE", help="the lra.json of `eft lra`: adds accuracy")
    parser.add_argument("--threads", type=_threads, default="auto",
                        help="torch CPU threads for the measurement, or 'auto' (default): as `eft bench` chooses "
                             "(1 on a busy machine), reusing a cached measurement made with either")
    parser.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                        help=f"timing rounds per configuration (default {DEFAULT_REPEATS})")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, dest="timeout_s",
                        help=f"seconds per configuration before it counts as too slow (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache folder (default ${CACHE_ENV}/advise, $XDG_CACHE_HOME/efficient-transformers/"
                             "advise or ~/.cache/efficient-transformers/advise)")
    parser.add_argument("--refresh", action="store_true", help="measure again even when a cached result exists")
    parser.add_argument("--out", default="eft-advise", help="folder for advise.json, advise.md, advise.png "
                                                            "(default ./eft-advise)")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON on stdout (messages on stderr)")


def run(args: argparse.Namespace) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    except (AdviseError, BenchFileError) as err:
        print(f"eft advise: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # run_benchmark's verdict on bad arguments (e.g. heads not dividing dim)
        print(f"eft advise: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eft advise: interrupted (nothing cached for this setting)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    settings = Settings(length=args.length, causal=args.causal, mode=args.mode, batch=args.batch, dim=args.dim,
                        heads=args.heads, dtype=args.dtype, device=args.device,
                        mechanisms=_validate_mechanisms(args.mechanisms), repeats=args.repeats,
                        timeout_s=args.timeout_s)
    if settings.dim % settings.heads:
        raise AdviseError(f"--heads {settings.heads} does not divide --dim {settings.dim}; allowed heads: "
                          f"{[h for h in range(1, min(settings.dim, 64) + 1) if settings.dim % h == 0]}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise AdviseError("--device cuda, but torch.cuda.is_available() is False; allowed: cpu")
    lra = load_lra(args.lra) if args.lra else None  # bad files fail before anything is measured
    bench, source = None, None
    if args.bench:
        data = load_bench_file(args.bench)
        if not args.any_machine:
            check_same_machine(data, args.bench)
        gap = coverage_gap(data, settings)
        if gap:
            print(f"eft advise: {args.bench} does not cover this setting ({gap}); measuring instead", file=sys.stderr)
        else:
            bench, source = data, {"kind": "bench file", "path": str(args.bench)}
    if bench is None:
        bench, source = measure(settings, cache_dir=cache_root(args.cache_dir), threads=args.threads,
                                refresh=args.refresh)
    advice = advise(bench, settings, max_memory_mb=args.max_memory_mb, lra=lra, source=source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = ["advise.json", "advise.md"]
    if write_plot(advice, bench, out / "advise.png"):
        files.append("advise.png")
    advice["files"] = files
    (out / "advise.md").write_text(markdown(advice), encoding="utf-8")
    tmp = out / "advise.json.tmp"
    tmp.write_text(json.dumps(advice, indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(out / "advise.json")
    message = f"eft advise: wrote {', '.join(files)} to {out}/"
    if args.json:
        print(json.dumps(advice, indent=1, allow_nan=False))
        print(message, file=sys.stderr)
    else:
        print(text_report(advice))
        print(message)
    return 0


def _validate_mechanisms(names: list[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    registered = registry.mechanism_names()
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise AdviseError(f"unknown mechanism(s) {unknown}; registered: {registered}")
    wanted = set(names) | {BASELINE}
    return tuple(n for n in registered if n in wanted)


# ---------------------------------------------------------------------------------------- the cache
def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """Where cached measurements live (see the module docstring)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "advise"
    base = os.environ.get("XDG_CACHE_HOME")
    base_path = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return base_path / "efficient-transformers" / "advise"


def machine_key(device: str = "cpu") -> dict[str, Any]:
    """What identifies this machine for the cache: CPU model and logical CPUs, OS, architecture (GPU on cuda)."""
    key: dict[str, Any] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "system": platform.system(),
                           "machine": platform.machine()}
    if device == "cuda":
        key["gpu"] = torch.cuda.get_device_name()
    return key


#: environment switches that change which code a measurement ran (core.gemm, native, core.buffer_pool)
PATH_SWITCHES = ("EFT_MATMUL", "EFT_NATIVE", "EFT_BUFFER_POOL_MIB")


def torch_version() -> str:
    return torch.__version__


def neighbour_lengths(n: int) -> list[int]:
    """N and the one neighbour measured with it: N/2, or 2N for N = 1."""
    return sorted({n, n // 2 if n >= 2 else 2 * n})


def _measured_names(settings: Settings) -> list[str]:
    return list(settings.mechanisms) if settings.mechanisms is not None else registry.mechanism_names()


def cache_key(settings: Settings, threads: int) -> dict[str, Any]:
    """Everything a cached measurement depends on."""
    measured = {k: v for k, v in asdict(settings).items() if k not in ("length", "mechanisms", "mode")}
    measured.update(mode=settings.bench_mode, lengths=neighbour_lengths(settings.length),
                    mechanisms=_measured_names(settings))
    return {"schema": CACHE_SCHEMA, "machine": machine_key(settings.device), "torch": torch_version(),
            "package": PACKAGE_VERSION, "code": source_digest(), "switches": path_switches(), "threads": threads,
            "settings": measured}


def source_digest() -> str:
    """sha256 over the package's Python and C++ sources (paths and contents): the code that was measured."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h") and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def path_switches() -> dict[str, str]:
    """The environment switches that choose the library's code paths, as set (unset: "")."""
    return {name: os.environ.get(name, "").strip().lower() for name in PATH_SWITCHES}


def cache_entry(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    s = key["settings"]
    return root / f"N{max(s['lengths'])}-{s['mode']}-{'causal' if s['causal'] else 'bidir'}-{digest}"


def _cached(entry: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached bench result of `entry` if it was made with exactly `key` and completed."""
    try:
        stored = json.loads((entry / "key.json").read_text(encoding="utf-8"))
        result = json.loads((entry / "bench.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stored != key or not isinstance(result, dict) or not result.get("config", {}).get("complete"):
        return None
    return result


def measure(settings: Settings, *, cache_dir: Path, threads: int | str = "auto", refresh: bool = False,
            progress: bool | None = None, say: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict]:
    """The focused benchmark for `settings`: from the cache when a measurement with the same key exists
    (unless `refresh`), else measured now and cached. Returns (bench result, source description)."""
    say = say or (lambda text: print(f"eft advise: {text}", file=sys.stderr))
    default = torch.get_num_threads()
    if threads == "auto":
        candidates = list(dict.fromkeys([default, 1]))
    else:
        candidates = [int(threads)]
    if not refresh:
        for t in candidates:
            key = cache_key(settings, t)
            entry = cache_entry(cache_dir, key)
            result = _cached(entry, key)
            if result is not None:
                say(f"using the measurement cached on {result['config'].get('started_at', '?')} in {entry} "
                    f"({t} thread{'' if t == 1 else 's'}; --refresh measures again)")
                return result, {"kind": "cache", "path": str(entry / "bench.json"), "threads": t}
    chosen = candidates[0]
    if threads == "auto" and settings.device == "cpu" and default > 1:
        load = load_average()
        if machine_is_busy(load):
            chosen = 1
            say(f"the machine is busy (load average {load:.1f} on {os.cpu_count()} CPUs): measuring with 1 thread "
                "(pass --threads to choose)")
    key = cache_key(settings, chosen)
    entry = cache_entry(cache_dir, key)
    lengths = key["settings"]["lengths"]
    names = key["settings"]["mechanisms"]
    say(f"measuring {len(names)} mechanism(s) at N = {', '.join(map(str, lengths))} ({settings.bench_mode}); "
        f"cached in {entry}")
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "key.json").unlink(missing_ok=True)  # an interrupted measurement must not look complete
    torch.set_num_threads(chosen)
    try:
        result = run_benchmark(
            mechanisms=names, lengths=lengths, modes=(settings.bench_mode,), batch=settings.batch, dim=settings.dim,
            heads=settings.heads, dtype=settings.dtype, causal=settings.causal, device=settings.device,
            out_dir=entry, quick=True, repeats=settings.repeats, timeout_s=settings.timeout_s, progress=progress)
    finally:
        torch.set_num_threads(default)
    if result["config"].get("complete"):
        tmp = entry / "key.json.tmp"
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(entry / "key.json")
    say(f"measured in {result['config'].get('wall_time_s') or 0:.0f} s")
    return result, {"kind": "measured", "path": str(entry / "bench.json"), "threads": chosen}


# ---------------------------------------------------------------------------------------- bench and LRA files
def coverage_gap(bench: dict[str, Any], settings: Settings) -> str | None:
    """Why `bench` cannot answer for `settings` (None: it covers it)."""
    config = bench["config"]
    for field, wanted in (("causal", settings.causal), ("batch", settings.batch), ("dim", settings.dim),
                          ("heads", settings.heads), ("dtype", settings.dtype), ("device", settings.device)):
        if config.get(field) != wanted:
            return f"it was measured with {field}={config.get(field)!r}, not {wanted!r}"
    if settings.bench_mode not in config["modes"]:
        return f"it has modes {config['modes']}, not {settings.bench_mode!r}"
    if not any(r["seq_len"] == settings.length and r["mode"] == settings.bench_mode for r in bench["rows"]):
        return f"it has lengths {config['lengths']}, not {settings.length}"
    return None


def load_lra(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Average test accuracy per mechanism over the tasks of an `eft lra` lra.json:
    {mechanism: {"accuracy", "tasks" (that ran), "of" (in the suite)}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise AdviseError(f"cannot read the LRA file {str(path)!r}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise AdviseError(f"{path} is not JSON ({err.msg} at line {err.lineno}); expected the lra.json of `eft lra`") from None
    results = data.get("accuracy", {}).get("results") if isinstance(data, dict) and isinstance(data.get("accuracy"), dict) else None
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        hint = " (it looks like an `eft bench` result: pass it with --bench)" if isinstance(data, dict) and "rows" in data else ""
        raise AdviseError(f"{path} is not an `eft lra` result: it has no accuracy.results{{task: {{mechanism: ...}}}}"
                          f"{hint}; expected the lra.json that `eft lra --out DIR` writes")
    tasks = list(results)
    per: dict[str, list[float]] = {}
    for task in tasks:
        for mechanism, r in results[task].items():
            per.setdefault(mechanism, [])
            if isinstance(r, dict) and r.get("status") == "ok" and isinstance(r.get("test_accuracy"), (int, float)):
                per[mechanism].append(float(r["test_accuracy"]))
    return {m: {"accuracy": sum(v) / len(v) if v else None, "tasks": len(v), "of": len(tasks)} for m, v in per.items()}


# ---------------------------------------------------------------------------------------- the advice
def crossover(rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The crossover of one mechanism against vanilla (one mode's rows): `measured` by
    `analysis.crossover_length`, `estimate` where the log-log line of the paired time ratio through the
    two largest measured lengths up to N (else the two smallest) crosses 1, when the ratio falls with N."""
    measured = analysis.crossover_length(rows, baseline_rows) if baseline_rows else None
    points = sorted((r["seq_len"], r["time_ratio_vs_vanilla"]) for r in rows
                    if r["status"] == "ok" and r.get("time_ratio_vs_vanilla"))
    lengths = sorted({r["seq_len"] for r in rows if r["status"] == "ok"})
    usable = [p for p in points if p[0] <= n][-2:]
    if len(usable) < 2:
        usable = points[:2]
    slope = analysis.fit_loglog_slope(usable, top=2) if len(usable) == 2 else None
    estimate = None
    if slope is not None and slope < -1e-3:
        n_ref, ratio_ref = usable[-1]
        value = n_ref * math.exp(-math.log(ratio_ref) / slope)  # ratio(N) = ratio_ref (N / n_ref)^slope = 1
        if math.isfinite(value) and value < 1e12:
            estimate = max(1, round(value))
    extrapolated = estimate is not None and not (lengths and lengths[0] <= estimate <= lengths[-1])
    if estimate is not None and lengths and estimate > EXTRAPOLATION_SPAN * lengths[-1]:
        text = f">{EXTRAPOLATION_SPAN * lengths[-1]} (ext.)"
    elif estimate is not None and lengths and estimate * EXTRAPOLATION_SPAN < lengths[0]:
        text = f"<{max(1, lengths[0] // EXTRAPOLATION_SPAN)} (ext.)"
    elif estimate is not None:
        text = f"≈{estimate}" + (" (ext.)" if extrapolated else "")
    elif measured is not None:
        text = f"≤{measured}" if lengths and measured == lengths[0] else str(measured)
    else:
        text = "none"
    return {"measured": measured, "estimate": estimate, "extrapolated": extrapolated, "ratio_slope": slope,
            "from_lengths": [p[0] for p in usable] if slope is not None else [], "text": text}


def advise(bench: dict[str, Any], settings: Settings, *, max_memory_mb: float | None = None,
           lra: dict[str, dict[str, Any]] | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank the mechanisms of `bench` for `settings` (see the module docstring); a pure function of its
    inputs. AdviseError when nothing can be recommended (nothing ran at N, or nothing fits the budget)."""
    mode, n = settings.bench_mode, settings.length
    config = bench["config"]
    rows = [r for r in bench["rows"] if r["mode"] == mode]
    at_n = {r["mechanism"]: r for r in rows if r["seq_len"] == n}
    baseline_rows = [r for r in rows if r["mechanism"] == BASELINE]
    cards = {c.name: c for c in registry.mechanisms()}
    file_cards = config.get("cards", {})
    if settings.mechanisms is not None:  # the ones asked for, measured or not
        names = list(settings.mechanisms)
    else:  # everything measured, and every registered mechanism (those not measured are listed as such)
        names = list(dict.fromkeys(list(config["mechanisms"]) + list(cards)))
    vanilla = at_n.get(BASELINE)
    vanilla_ok = vanilla is not None and vanilla["status"] == "ok"

    candidates, excluded = [], []
    for name in names:
        row = at_n.get(name)
        card = cards.get(name)
        title = card.title if card else file_cards.get(name, {}).get("title", name)
        if row is None:
            excluded.append({"mechanism": name, "title": title, "status": "not measured",
                             "reason": f"no row at N = {n} ({mode}) in the measurement"})
            continue
        if row["status"] != "ok":
            excluded.append({"mechanism": name, "title": title, "status": row["status"],
                             "reason": row.get("error") or row["status"]})
            continue
        mine = [r for r in rows if r["mechanism"] == name]
        ratio = row.get("time_ratio_vs_vanilla")
        if ratio is None and vanilla_ok and vanilla["time_ms"] and row["time_ms"]:
            ratio = row["time_ms"] / vanilla["time_ms"]
        mem_ratio = row.get("mem_ratio_vs_vanilla")
        if mem_ratio is None and vanilla_ok and vanilla.get("peak_mem_mb") and row.get("peak_mem_mb") is not None:
            mem_ratio = row["peak_mem_mb"] / vanilla["peak_mem_mb"]
        decodes = card.causal if card else bool(file_cards.get(name, {}).get("causal"))
        entry = {
            "mechanism": name, "title": title, "time_ms": row["time_ms"], "time_ratio_vs_vanilla": ratio,
            "speedup_vs_vanilla": (1.0 / ratio) if ratio else None, "peak_mem_mb": row.get("peak_mem_mb"),
            "mem_ratio_vs_vanilla": mem_ratio, "decodes": decodes,
            "decoding": (card.decoding if card else ("yes" if decodes else "none")),
            "complexity": card.complexity if card else file_cards.get(name, {}).get("complexity"),
            "crossover": None if name == BASELINE else crossover(mine, baseline_rows, n),
            "time_slope": analysis.fit_loglog_slope([(r["seq_len"], r["time_ms"]) for r in mine if r["status"] == "ok"]),
            "noisy": (row.get("time_spread") or 0) > config.get("noisy_spread", 0.25),
            "lra_accuracy": (lra or {}).get(name, {}).get("accuracy"),
            "lra_tasks": (lra or {}).get(name, {}).get("tasks"), "lra_of": (lra or {}).get(name, {}).get("of"),
        }
        if max_memory_mb is not None and entry["peak_mem_mb"] is None:
            excluded.append({**entry, "status": "memory unknown",
                             "reason": "its peak memory was not measured, so it cannot be checked against the budget"})
        elif max_memory_mb is not None and entry["peak_mem_mb"] > max_memory_mb:
            excluded.append({**entry, "status": "over budget",
                             "reason": f"needs {entry['peak_mem_mb']:.1f} MiB > the budget of {max_memory_mb:g} MiB"})
        else:
            candidates.append(entry)
    ranking = sorted(candidates, key=lambda e: e["time_ms"])
    for i, entry in enumerate(ranking, 1):
        entry["rank"] = i

    advice = {
        "settings": {**asdict(settings), "mechanisms": names, "bench_mode": mode,
                     "max_memory_mb": max_memory_mb},
        "source": {**(source or {}), "lengths": sorted({r["seq_len"] for r in rows}),
                   "device_name": config.get("device_name"), "threads": config.get("threads"),
                   "torch_version": config.get("torch_version"), "started_at": config.get("started_at"),
                   "load_average_start": config.get("load_average_start")},
        "ranking": ranking,
        "excluded": excluded,
        "notes": list(config.get("notes") or []),
        "lra_given": lra is not None,
    }
    if config.get("torch_version") and config["torch_version"] != torch_version():
        advice["notes"].append(f"measured with torch {config['torch_version']}; this is torch {torch_version()}")
    if not ranking:
        raise AdviseError(_no_choice_message(advice, candidates))
    advice["recommendation"] = {"mechanism": ranking[0]["mechanism"], "text": recommendation(advice)}
    return advice


def _no_choice_message(advice: dict[str, Any], candidates: list) -> str:
    s = advice["settings"]
    over = [e for e in advice["excluded"] if e["status"] in ("over budget", "memory unknown")]
    if over:
        closest = sorted((e for e in over if e.get("peak_mem_mb") is not None), key=lambda e: e["peak_mem_mb"])
        lines = [f"no mechanism fits the budget of {s['max_memory_mb']:g} MiB at N = {s['length']} ({s['mode']}); "
                 "the closest:"]
        lines += [f"  {e['mechanism']}: {e['peak_mem_mb']:.1f} MiB, {e['time_ms']:.2f} ms per step" for e in closest[:3]]
        others = [e for e in advice["excluded"] if e not in over]
        if others:
            lines.append("not run at this length: " + ", ".join(f"{e['mechanism']} ({e['status']})" for e in others))
        lines.append("raise --max-memory-mb, or lower --batch or --length")
        return "\n".join(lines)
    lines = [f"no mechanism can take N = {s['length']} ({'causal' if s['causal'] else 'bidirectional'}, {s['mode']}) "
             "on this machine; excluded:"]
    lines += [f"  {e['mechanism']}: {e['status']}: {e['reason']}" for e in advice["excluded"]]
    if any(e["status"] == "timeout" for e in advice["excluded"]):
        lines.append(f"(--timeout raises the limit of {s['timeout_s']:g} s per configuration)")
    return "\n".join(lines)


def _x(value: float) -> str:
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def recommendation(advice: dict[str, Any]) -> str:
    """One paragraph: the choice and why, with the measured numbers."""
    s, ranking = advice["settings"], advice["ranking"]
    best = ranking[0]
    n = s["length"]
    where = f"At N = {n}, {'causal' if s['causal'] else 'bidirectional'}, for a {MODE_TEXT[s['mode']]}"
    lengths = advice["source"]["lengths"]
    vanilla = next((e for e in ranking if e["mechanism"] == BASELINE), None)
    vanilla_out = next((e for e in advice["excluded"] if e["mechanism"] == BASELINE), None)
    parts = []
    if best["mechanism"] == BASELINE:
        parts.append(f"{where}, exact attention (vanilla) is the fastest here: {best['time_ms']:.2f} ms per step.")
        if len(ranking) > 1:
            alt = ranking[1]
            ratio = alt["time_ratio_vs_vanilla"] or alt["time_ms"] / best["time_ms"]
            text = f"The fastest alternative, {alt['mechanism']}, takes {_x(ratio)} as long"
            if alt["mem_ratio_vs_vanilla"] is not None:
                text += f" with {_x(alt['mem_ratio_vs_vanilla'])} the memory"
            closing = sorted((e for e in ranking[1:] if (e["crossover"] or {}).get("estimate")
                              and e["crossover"]["estimate"] > n), key=lambda e: e["crossover"]["estimate"])
            if closing:
                first, cross = closing[0], closing[0]["crossover"]
                who = "it" if first is alt else first["mechanism"]
                text += (f"; {who} should overtake exact attention from about N ≈ {cross['estimate']} (the power-law "
                         f"fit of the time ratio through N = {' and '.join(map(str, cross['from_lengths']))}"
                         f"{', extrapolated' if cross['extrapolated'] else ''})")
            else:
                text += "; no alternative is closing the gap at the measured lengths"
            parts.append(text + ".")
    else:
        speed = best["speedup_vs_vanilla"]
        if speed is not None and vanilla is not None:
            text = (f"{where}, {best['mechanism']} is {_x(speed)} {'faster' if speed >= 1 else 'slower'} than exact "
                    f"attention here ({best['time_ms']:.2f} ms vs {vanilla['time_ms']:.2f} ms per step)")
        elif speed is not None:
            text = (f"{where}, {best['mechanism']} is the fastest that fits ({best['time_ms']:.2f} ms per step, "
                    f"{_x(speed)} faster than exact attention, which does not fit: {vanilla_out['reason']})"
                    if vanilla_out else f"{where}, {best['mechanism']} is the fastest ({best['time_ms']:.2f} ms per step)")
        else:
            why = f" ({vanilla_out['status']}: {vanilla_out['reason']})" if vanilla_out else ""
            text = f"{where}, {best['mechanism']} is the fastest ({best['time_ms']:.2f} ms per step); exact attention did not run{why}"
        if best["mem_ratio_vs_vanilla"] is not None and best["peak_mem_mb"] is not None:
            text += f" and needs {_x(best['mem_ratio_vs_vanilla'])} its peak memory ({best['peak_mem_mb']:.1f} MiB)"
        parts.append(text + ".")
        cross = best["crossover"] or {}
        if cross.get("estimate") and cross["estimate"] <= n and not cross["extrapolated"]:
            parts.append(f"Below N ≈ {cross['estimate']} use exact attention (the crossover, from the power-law fit "
                         f"of the time ratio through N = {' and '.join(map(str, cross['from_lengths']))}).")
        elif cross.get("estimate") and cross["estimate"] <= n:
            parts.append(f"It is faster at every measured length ({', '.join(map(str, lengths))}); the fit puts the "
                         f"crossover with exact attention near N ≈ {cross['estimate']}.")
        elif cross.get("measured") is not None:
            parts.append(f"It is faster than exact attention from N = {cross['measured']} on among the measured "
                         f"lengths ({', '.join(map(str, lengths))}).")
    if s["causal"]:
        kinds = {"kv_cache": "a KV cache", "recurrent": "a constant-size recurrent state",
                 "recompute": "recomputation over the kept history (no cheaper incremental form)"}
        parts.append(f"It decodes with {kinds.get(best['decoding'], best['decoding'])}.")
    if len(ranking) > 1 and ranking[1]["time_ms"] <= best["time_ms"] * (1 + CLOSE_CALL):
        second = ranking[1]
        parts.append(f"{second['mechanism']} is within {CLOSE_CALL:.0%} ({second['time_ms']:.2f} ms), about the "
                     "noise of a shared machine: choose between them by accuracy.")
    if best["lra_accuracy"] is not None:
        ref = vanilla or next((e for e in advice["excluded"] if e["mechanism"] == BASELINE and "lra_accuracy" in e), None)
        text = f"On the given LRA suite it averages {100 * best['lra_accuracy']:.1f}% test accuracy"
        if best["mechanism"] != BASELINE and ref and ref.get("lra_accuracy") is not None:
            text += f" (exact attention {100 * ref['lra_accuracy']:.1f}%)"
        parts.append(text + ".")
    over = [e for e in advice["excluded"] if e["status"] == "over budget"]
    if over:
        parts.append(f"Over the budget of {s['max_memory_mb']:g} MiB: " +
                     ", ".join(f"{e['mechanism']} ({e['peak_mem_mb']:.1f} MiB)" for e in over) + ".")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- rendering
def _num(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def table_rows(advice: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["#", "mechanism", "time ms", "time vs vanilla", "peak MiB", "memory vs vanilla", "decodes",
              "crossover N"]
    with_lra = advice.get("lra_given", False)
    if with_lra:
        header.append("LRA acc. %")
    rows = []
    for e in advice["ranking"]:
        cells = [str(e["rank"]), e["mechanism"], _num(e["time_ms"]) + ("*" if e["noisy"] else ""),
                 "1.00×" if e["mechanism"] == BASELINE else (_x(e["time_ratio_vs_vanilla"])
                                                            if e["time_ratio_vs_vanilla"] else "—"),
                 _num(e["peak_mem_mb"], 1),
                 _x(e["mem_ratio_vs_vanilla"]) if e["mem_ratio_vs_vanilla"] is not None else "—",
                 (e["decoding"].replace("_", " ") if e["decodes"] else "no"),
                 "baseline" if e["mechanism"] == BASELINE else e["crossover"]["text"]]
        if with_lra:
            acc = e["lra_accuracy"]
            cells.append("—" if acc is None else f"{100 * acc:.1f}" + ("" if e["lra_tasks"] == e["lra_of"]
                                                                        else f" ({e['lra_tasks']}/{e['lra_of']} tasks)"))
        rows.append(cells)
    return header, rows



def _source_line(advice: dict[str, Any]) -> str:
    src = advice["source"]
    kind = {"cache": "cached measurement", "measured": "measured now", "bench file": "bench file"}.get(src.get("kind"),
                                                                                                      src.get("kind"))
    threads = src.get("threads")
    return (f"Source: {kind} {src.get('path', '')} (N = {', '.join(map(str, src['lengths']))}; {src.get('device_name')}, "
            f"{threads} torch thread{'' if threads == 1 else 's'}, torch {src.get('torch_version')}, "
            f"{src.get('started_at')})")


def _excluded_lines(advice: dict[str, Any]) -> list[str]:
    return [f"- {e['mechanism']}: {e['status']}: {e['reason']}" for e in advice["excluded"]]


def text_report(advice: dict[str, Any]) -> str:
    s = advice["settings"]
    settings = Settings(**{k: v for k, v in s.items() if k in Settings.__dataclass_fields__})
    budget = f", budget {s['max_memory_mb']:g} MiB" if s["max_memory_mb"] is not None else ""
    out = [f"eft advise: {settings.describe()}{budget}", _source_line(advice), ""]
    out.append(aligned_table(*table_rows(advice)))
    out += ["", "time: median per step; vs vanilla: paired ratio to exact attention at the same N (below 1 is "
            "better); peak: memory of one step above parameters and inputs; crossover: N where the mechanism "
            "becomes faster than exact attention (≈ fitted through the measured lengths, ext. = outside them); "
            "* = noisy timing."]
    if advice["excluded"]:
        out += ["", "Excluded:"] + _excluded_lines(advice)
    if advice["notes"]:
        out += ["", "Notes:"] + [f"- {n}" for n in advice["notes"]]
    out += ["", "Recommendation: " + advice["recommendation"]["text"]]
    return "\n".join(out)


def markdown(advice: dict[str, Any]) -> str:
    s = advice["settings"]
    settings = Settings(**{k: v for k, v in s.items() if k in Settings.__dataclass_fields__})
    budget = f"; memory budget {s['max_memory_mb']:g} MiB per step" if s["max_memory_mb"] is not None else ""
    header, rows = table_rows(advice)
    out = ["# eft advise: which attention mechanism", "", f"Setting: {settings.describe()}{budget}.", "",
           _source_line(advice) + ".", "", "## Recommendation", "", advice["recommendation"]["text"], "",
           "## Ranking", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    out += ["", "Time: median per step (one attention layer as `et.build_attention` builds it, projections "
            "included); vs vanilla: the paired time ratio to exact attention at the same N; peak memory of one step "
            "above parameters and inputs, measured in a fresh process; crossover: the N at which the power-law fit "
            "of the time ratio through the measured lengths crosses 1 (ext.: outside the measured lengths), else the "
            "measured crossover; * noisy timing.", ""]
    if advice["excluded"]:
        out += ["## Excluded", ""] + [line.replace("|", "\\|") for line in _excluded_lines(advice)] + [""]
    if advice["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in advice["notes"]] + [""]
    if "advise.png" in advice.get("files", []):
        out += ["## Time and memory against N", "", "![advise](advise.png)", ""]
    return "\n".join(out)


def write_plot(advice: dict[str, Any], bench: dict[str, Any], path: Path) -> bool:
    """Time and peak memory against N (log-log) for every mechanism that ran, vanilla dashed, the best
    bold, the user's N and the budget marked. False (and a message) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        advice["notes"].append("advise.png not written: matplotlib is not installed "
                               "(pip install 'efficient-transformers[plots]')")
        print(f"eft advise: {advice['notes'][-1]}", file=sys.stderr)
        return False
    s = advice["settings"]
    mode, n, best = s["bench_mode"], s["length"], advice["recommendation"]["mechanism"]
    shown = [e["mechanism"] for e in advice["ranking"]] + [e["mechanism"] for e in advice["excluded"]
                                                          if e["status"] in ("over budget", "memory unknown")]
    ranked = {e["mechanism"] for e in advice["ranking"]}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    lengths = sorted({r["seq_len"] for r in bench["rows"] if r["mode"] == mode})
    for i, (metric, label) in enumerate((("time_ms", "time per step (ms)"), ("peak_mem_mb", "peak memory (MiB)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in shown:
            points = sorted((r["seq_len"], r[metric]) for r in bench["rows"] if r["mechanism"] == name
                            and r["mode"] == mode and r["status"] == "ok" and r.get(metric) and r[metric] > 0)
            if not points:
                continue
            style = "k--" if name == BASELINE else ("-" if name in ranked else ":")
            suffix = " (best)" if name == best else ("" if name in ranked else " (over budget)")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                    linewidth=2.8 if name == best else 1.3, label=name + suffix)
        ax.axvline(n, color="tab:red", linewidth=1, alpha=0.7, label=f"your N = {n}")
        if metric == "peak_mem_mb" and s["max_memory_mb"] is not None:
            ax.axhline(s["max_memory_mb"], color="tab:purple", linestyle=":", label=f"budget {s['max_memory_mb']:g} MiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if lengths:
            ax.set_xticks(lengths, [str(v) for v in lengths])
            ax.minorticks_off()
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(f"eft advise: {MODE_TEXT[s['mode']]}, {'causal' if s['causal'] else 'bidirectional'}, batch "
                 f"{s['batch']}, dim {s['dim']}, {s['heads']} heads ({advice['source'].get('device_name')})", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


__all__ = ["AdviseError", "Settings", "advise", "cache_key", "cache_root", "configure", "crossover", "load_lra",
           "machine_key", "measure", "neighbour_lengths", "recommendation", "run"]
