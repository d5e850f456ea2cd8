"""`run_benchmark`: the efficiency benchmark over mechanisms x lengths x modes (DESIGN.md section 4).

For each length N (ascending) and each mode, one *block*:

1. every mechanism's configuration goes through the isolated memory probe (`memory.py`): peak
   memory, one step's time, and the verdict (ok / oom / timeout / error / unsupported), each in a
   fresh process under the per-configuration time limit;
2. the mechanisms that passed are timed in the parent, interleaved in rounds (`harness.py`), with
   vanilla in the same rounds so that the time ratio to vanilla is paired round by round; their FLOPs
   are counted on the warm-up call.

A mechanism that ran out of memory or time at N is not tried again at larger N in that mode (its rows
say so). Results are written to `out_dir/bench.json` after every block, and the full report
(bench.json, bench.md, PNG plots) in a `finally`, so an interrupt leaves the partial results.
Vanilla is always measured, as the baseline, even when not asked for (the config says so).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..formatting import json_safe
from .. import registry
from . import analysis, harness, products, report
from .memory import ProbeServer, reset_cpu_high_water_mark
from ..progress import progress_bar

DEFAULT_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
STATUSES = ("ok", "oom", "timeout", "error", "unsupported")


@dataclass(frozen=True)
class Effort:
    """How hard to measure: rounds, the time budget per configuration, the limit, the sample length."""

    repeats: int
    min_rounds: int
    budget_s: float
    timeout_s: float
    sample_min_s: float
    matmul_probe_s: float  # at start-up; a tenth of it again before every block (the best run counts)


FULL_EFFORT = Effort(repeats=10, min_rounds=3, budget_s=15.0, timeout_s=300.0, sample_min_s=0.02, matmul_probe_s=1.0)
QUICK_EFFORT = Effort(repeats=5, min_rounds=3, budget_s=1.0, timeout_s=30.0, sample_min_s=0.01, matmul_probe_s=0.3)
NOISY_SPREAD = 0.25  # (max - min) / median of a row's samples above this: marked as noisy in the report
CEILING_SUFFIX = " (ceiling)"  # the timing key of a mechanism's product replay
BUSY_LOAD_FRACTION = 0.5  # load average above this fraction of the CPUs at start: a note says the machine is busy


def run_benchmark(
    *,
    mechanisms: Iterable[str] | str | None = None,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    modes: Sequence[str] = ("forward", "train"),
    batch: int = 1,
    dim: int = 256,
    heads: int = 4,
    dtype: str = "float32",
    causal: bool = False,
    device: str = "cpu",
    out_dir: str | os.PathLike = "eft-report",
    quick: bool = False,
    repeats: int | None = None,
    timeout_s: float | None = None,
    progress: bool | None = None,
    ceiling: bool = True,
) -> dict[str, Any]:
    """Measure every requested mechanism; write bench.json, bench.md and plots into `out_dir`; return
    the JSON object `{"config", "rows", "summary"}`.

    `quick` uses `QUICK_LENGTHS` (unless other lengths are given) and `QUICK_EFFORT` (fewer rounds,
    shorter budgets). `repeats` and `timeout_s` override the effort's rounds and per-configuration
    limit. `progress`: None draws a bar when stderr is a terminal. `ceiling`: also time every row's
    ceiling, its matrix products replayed alone (`products.py`; up to about twice the timing time).
    Bad arguments raise ValueError before anything runs.
    """
    effort = QUICK_EFFORT if quick else FULL_EFFORT
    if quick and tuple(lengths) == DEFAULT_LENGTHS:
        lengths = QUICK_LENGTHS
    names, baseline_added = _validate_mechanisms(mechanisms, causal)
    lengths = _validate_lengths(lengths)
    modes = _validate_modes(modes)
    for label, value in (("batch", batch), ("dim", dim), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"bench: {label} must be a positive int, got {value!r}")
    if dim % heads:
        raise ValueError(f"bench: heads={heads} does not divide dim={dim}; allowed heads: "
                         f"{[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]}")
    if dtype not in harness.DTYPES:
        raise ValueError(f"bench: unknown dtype {dtype!r}; allowed: {list(harness.DTYPES)}")
    if not isinstance(causal, bool):
        raise ValueError(f"bench: causal must be a bool, got {causal!r}")
    if device not in harness.DEVICES:
        raise ValueError(f"bench: unknown device {device!r}; allowed: {list(harness.DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench: device 'cuda' requested but torch.cuda.is_available() is False; allowed: 'cpu'")
    if repeats is not None and (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1):
        raise ValueError(f"bench: repeats must be a positive int, got {repeats!r}")
    if not isinstance(ceiling, bool):
        raise ValueError(f"bench: ceiling must be a bool, got {ceiling!r}")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ValueError(f"bench: timeout_s must be a positive number of seconds, got {timeout_s!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plan = harness.TimingPlan(
        repeats=repeats or effort.repeats, min_rounds=min(effort.min_rounds, repeats or effort.repeats),
        budget_s=effort.budget_s, timeout_s=float(timeout_s or effort.timeout_s), sample_min_s=effort.sample_min_s)
    config = _config(names, baseline_added, lengths, modes, batch, dim, heads, dtype, causal, device, quick, plan, effort)
    config["ceiling"] = ceiling
    bench = _Benchmark(config, plan, out, progress)
    return bench.run()


# ---------------------------------------------------------------------------------------- validation
def _validate_mechanisms(mechanisms: Iterable[str] | str | None, causal: bool) -> tuple[list[str], bool]:
    registered = registry.mechanism_names()
    if mechanisms is None:
        return registered, False
    requested = [m.strip() for m in mechanisms.split(",")] if isinstance(mechanisms, str) else list(mechanisms)
    if not requested or any(not isinstance(m, str) or not m for m in requested):
        raise ValueError(f"bench: mechanisms must be registered names, got {mechanisms!r}; registered: {registered}")
    unknown = [m for m in requested if m not in registered]
    if unknown:
        raise ValueError(f"bench: unknown mechanism(s) {unknown}; registered: {registered}")
    baseline_added = analysis.BASELINE not in requested
    wanted = set(requested) | {analysis.BASELINE}
    return [m for m in registered if m in wanted], baseline_added


def _validate_lengths(lengths: Sequence[int]) -> list[int]:
    values = list(lengths) if not isinstance(lengths, (str, bytes)) else None
    if not values or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in values):
        raise ValueError(f"bench: lengths must be a non-empty list of positive ints, got {lengths!r}")
    return sorted(set(values))


def _validate_modes(modes: Sequence[str]) -> list[str]:
    values = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in values if m not in harness.MODES]
    if not values or bad:
        raise ValueError(f"bench: unknown mode(s) {bad or values}; allowed: {list(harness.MODES)}")
    return [m for m in harness.MODES if m in values]


def _config(names, baseline_added, lengths, modes, batch, dim, heads, dtype, causal, device, quick,
            plan: harness.TimingPlan, effort: Effort) -> dict[str, Any]:
    cards = {c.name: c for c in registry.mechanisms()}
    if device == "cuda":
        memory_method = "cuda: torch.cuda.max_memory_allocated() - memory_allocated() before the step, fresh forked process"
        device_name = torch.cuda.get_device_name()
    else:
        memory_method = reset_cpu_high_water_mark()[1]
        device_name = _cpu_name()
    return {
        "mechanisms": names,
        "baseline": analysis.BASELINE,
        "baseline_added": baseline_added,
        "cards": {n: {"title": cards[n].title, "classes": list(cards[n].classes), "complexity": cards[n].complexity,
                      "causal": cards[n].causal, "bidirectional": cards[n].bidirectional} for n in names},
        "lengths": lengths,
        "modes": modes,
        "batch": batch,
        "dim": dim,
        "heads": heads,
        "head_dim": dim // heads,
        "dtype": dtype,
        "causal": causal,
        "device": device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "repeats": plan.repeats,
        "min_rounds": plan.min_rounds,
        "time_budget_s": plan.budget_s,
        "timeout_s": plan.timeout_s,
        "sample_min_s": plan.sample_min_s,
        "matmul_probe_s": effort.matmul_probe_s,
        "matmul_gflops": None,
        "matmul_probe": None,
        "memory_method": memory_method,
        "memory_unit": "MiB (2^20 bytes), above the resident size before the step (parameters and inputs excluded)",
        "ceiling_method": "the step's matrix products (forward + backward, without what the backward pass recomputes), "
                          "recorded under a TorchDispatchMode on the warm-up call and replayed alone on preallocated "
                          "buffers in the same rounds as the step, each shape on the faster of PyTorch's product and "
                          "oneDNN's (core/gemm.py); fraction = median over rounds of replay / step "
                          "(bench/products.py); FLOP-rate bound = their 2mnk FLOPs at the matrix-multiply rate",
        "flops_method": "torch.utils.flop_counter.FlopCounterMode over one step (matrix products and fused attention; "
                        "elementwise ops not counted; fused attention counted as dense even when causal)",
        "forward_mode": "layer.eval() under torch.no_grad()",
        "train_mode": "layer.train(), forward + backward, x.requires_grad, parameter grads reset to None each step",
        "slope_points": analysis.SLOPE_POINTS,
        "noisy_spread": NOISY_SPREAD,
        "slope_tolerance": analysis.SLOPE_TOLERANCE,
        "time_slope_tolerance": analysis.TIME_SLOPE_TOLERANCE,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": None,
        "complete": False,
        "interrupted": False,
        "files": [],
        "notes": [],
    }


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_is_busy(load: float | None) -> bool:
    """Other processes occupy more than `BUSY_LOAD_FRACTION` of the CPUs."""
    return load is not None and load > BUSY_LOAD_FRACTION * (os.cpu_count() or 1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------------------------------- the run
class _Benchmark:
    def __init__(self, config: dict[str, Any], plan: harness.TimingPlan, out: Path, progress: bool | None) -> None:
        self.config, self.plan, self.out = config, plan, out
        config.setdefault("ceiling", True)
        self.rows: list[dict[str, Any]] = []
        self.cards = {c.name: c for c in registry.mechanisms()}
        self.given_up: dict[tuple[str, str], tuple[str, str]] = {}  # (mechanism, mode) -> (status, why) at larger N
        total = len(config["lengths"]) * len(config["modes"]) * len(config["mechanisms"]) * 2
        self.bar = progress_bar(total, "eft bench", enabled=progress, unit="measurement")

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            self._note_machine_load("start")
            self.bar.set_description_str("measuring the matrix-multiply rate")
            self._probe_matmul(self.config["matmul_probe_s"])
            with ProbeServer(threads=self.config["threads"]) as server:
                for n in self.config["lengths"]:
                    for mode in self.config["modes"]:
                        self._probe_matmul(self.config["matmul_probe_s"] / 10)
                        self.rows.extend(self._block(server, n, mode))
                        self._write_json(self._result())
            self.config["complete"] = True
        except KeyboardInterrupt:
            self.config["interrupted"] = True
            self.config["notes"].append("interrupted (Ctrl-C): the rows hold the configurations finished before it")
            raise
        finally:
            self.bar.set_description_str("writing the report")
            self._note_machine_load("end")
            self.config["wall_time_s"] = time.perf_counter() - started
            result = self._result()
            self.config["files"] = ["bench.json", "bench.md"] + report.write_plots(result, self.out, self.config["notes"])
            (self.out / "bench.md").write_text(report.markdown(result))
            result = json_safe(result)
            self._write_json(result)
            self.bar.set_description_str(f"done: {self.out}/")
            self.bar.close()
        return result

    def _probe_matmul(self, seconds: float) -> None:
        """The machine's matmul rate is the best of short probes at start-up and before every block: on a
        shared machine a single probe can land in a busy moment."""
        probe = harness.matmul_rate(self.config["device"], seconds=seconds)
        previous = self.config["matmul_probe"] or {"samples_gflops": []}
        probe["samples_gflops"] = previous["samples_gflops"] + [probe["gflops"]]
        probe["gflops"] = max(probe["samples_gflops"])
        self.config["matmul_gflops"], self.config["matmul_probe"] = probe["gflops"], probe

    def _note_machine_load(self, when: str) -> None:
        load = load_average()
        self.config[f"load_average_{when}"] = load
        if when == "start" and self.config["device"] == "cpu" and machine_is_busy(load):
            self.config["notes"].append(
                f"the machine was busy at the start (1-minute load average {load:.1f} on {os.cpu_count()} CPUs): other "
                "processes compete for the cores, so times are inflated and noisy, multi-threaded small steps the most "
                "(a parallel region waits for its slowest thread); `eft bench` then uses 1 thread unless --threads is "
                f"given. This run: {self.config['threads']} thread{'' if self.config['threads'] == 1 else 's'}.")

    def _result(self) -> dict[str, Any]:
        for row in self.rows:
            if row["gflops_per_s"] is not None and self.config["matmul_gflops"]:
                row["matmul_fraction"] = row["gflops_per_s"] / self.config["matmul_gflops"]
            if row.get("ceiling_flops") is not None and row["status"] == "ok" and self.config["matmul_gflops"]:
                row["flop_bound_ms"] = row["ceiling_flops"] / (self.config["matmul_gflops"] * 1e9) * 1e3
        analysis.add_memory_ratios(self.rows)
        complexities = {n: c["complexity"] for n, c in self.config["cards"].items()}
        return {"config": self.config, "rows": self.rows, "summary": analysis.summarize(self.rows, complexities)}

    def _write_json(self, result: dict[str, Any]) -> None:
        tmp = self.out / "bench.json.tmp"
        tmp.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
        tmp.replace(self.out / "bench.json")

    # ------------------------------------------------------------------ one (N, mode) block
    def _workload(self, name: str, n: int, mode: str) -> harness.Workload:
        cfg = self.config
        options = {"max_seq_len": max(cfg["lengths"])} if "max_seq_len" in self.cards[name].options else {}
        return harness.Workload(mechanism=name, seq_len=n, mode=mode, batch=cfg["batch"], dim=cfg["dim"],
                                heads=cfg["heads"], dtype=cfg["dtype"], causal=cfg["causal"], device=cfg["device"],
                                options=options)

    def _block(self, server: ProbeServer, n: int, mode: str) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        works: dict[str, harness.Workload] = {}
        for name in self.config["mechanisms"]:
            work = works[name] = self._workload(name, n, mode)
            row = rows[name] = _empty_row(work)
            card = self.cards[name]
            if self.config["causal"] not in card.modes:
                allowed = ", ".join(f"causal={c}" for c in card.modes)
                _fail(row, "unsupported", f"{name}: causal={self.config['causal']} is not supported by "
                      f"{card.title}; allowed: {allowed}")
            elif (name, mode) in self.given_up:
                status, why = self.given_up[name, mode]
                _fail(row, status, f"not run: {why}")
            else:
                self.bar.set_description_str(f"{name} N={n} {mode}: memory probe")
                answer = server.measure(work.to_json(), self.plan.timeout_s)
                row.update({k: answer.get(k) for k in ("status", "error", "peak_mem_mb", "first_step_ms",
                                                       "probe_wall_s")})
                row["warnings"] = answer.get("warnings") or []
                if answer.get("memory_note") and answer["memory_note"] not in self.config["notes"]:
                    self.config["notes"].append(answer["memory_note"])
                headroom = _available_memory_mb()
                if (row["status"] == "ok" and headroom is not None and row["peak_mem_mb"] is not None
                        and row["peak_mem_mb"] > TIMING_MEMORY_SHARE * headroom):
                    _fail(row, "oom", f"{name}: the probe's peak of {row['peak_mem_mb']:.0f} MiB is over "
                          f"{TIMING_MEMORY_SHARE:.0%} of the {headroom:.0f} MiB available; timing it in the "
                          "benchmark's own process (beside its buffers and replays) could bring the "
                          "out-of-memory killer onto the whole run")
                if row["status"] in ("oom", "timeout"):
                    self.given_up[name, mode] = (row["status"], f"{row['status']} at N={n} ({row['error']})")
            self.bar.update()
        runnable = [name for name, row in rows.items() if row["status"] == "ok"]
        self._time(rows, {name: works[name] for name in runnable}, n, mode)
        return list(rows.values())

    def _time(self, rows: dict[str, dict[str, Any]], works: dict[str, harness.Workload], n: int, mode: str) -> None:
        steps = {}
        for name, work in works.items():
            try:
                steps[name] = harness.make_step(harness.build_layer(work), work)
            except Exception as err:
                _fail(rows[name], *harness.classify_failure(err))
        self.bar.set_description_str(f"N={n} {mode}: timing {len(steps)} mechanism(s), warm-up")
        ceilings = {name: products.CeilingStep(self.config["device"]) for name in steps} if self.config.get("ceiling", True) else {}

        def count_flops_on_warm_up(name: str, step) -> None:
            if name in ceilings:  # the mechanism's warm-up call also records its products (bench/products.py)
                try:
                    rows[name]["flops"] = ceilings[name].record(step, harness.count_flops)
                    return
                except Exception as err:
                    rows[name]["warnings"].append(f"FLOP count or product recording failed: {type(err).__name__}: {err}"[:300])
                    ceilings[name].products = None
            elif name.endswith(CEILING_SUFFIX):
                step()
                return
            try:
                rows[name]["flops"] = harness.count_flops(step)
            except Exception as err:  # the plain call below decides whether the step itself fails
                rows[name]["warnings"].append(f"FLOP count failed: {type(err).__name__}: {err}"[:300])
                step()

        estimates_s = {name: rows[name]["first_step_ms"] / 1e3 for name in steps if rows[name]["first_step_ms"]}
        for name, ceiling in ceilings.items():  # timed in the same rounds, after every mechanism's warm-up
            steps[name + CEILING_SUFFIX] = ceiling
            if name in estimates_s:
                estimates_s[name + CEILING_SUFFIX] = estimates_s[name]  # an upper bound: the replay is shorter
        gc.collect()
        gc.disable()
        try:
            timing = harness.time_interleaved(
                steps, self.plan, self.config["device"],
                on_round=lambda r, total: self.bar.set_description_str(f"N={n} {mode}: timing round {r}/{total}"),
                first_call=count_flops_on_warm_up, estimates_s=estimates_s)
        finally:
            gc.enable()
        del steps
        for ceiling in ceilings.values():
            ceiling.release()
        gc.collect()
        for name, err in timing.failures.items():
            if name.endswith(CEILING_SUFFIX):
                rows[name[: -len(CEILING_SUFFIX)]]["warnings"].append(f"ceiling replay failed: {harness.classify_failure(err)[1]}"[:300])
            else:
                _fail(rows[name], *harness.classify_failure(err))
        reference = timing.samples.get(analysis.BASELINE)
        for name in works:
            row = rows[name]
            if row["status"] != "ok":
                continue
            samples = timing.samples[name]
            median_s = harness.median_of(samples)
            row["time_ms"] = median_s * 1e3
            row["time_samples_ms"] = [None if s is None else s * 1e3 for s in samples]
            present = [s for s in samples if s is not None]
            row["time_spread"] = (max(present) - min(present)) / median_s
            row["rounds"] = sum(s is not None for s in samples)
            row["inner"] = timing.inner[name]
            ratio = harness.paired_ratio(samples, reference) if reference else None
            row["time_ratio_vs_vanilla"] = ratio
            row["speedup_vs_vanilla"] = 1.0 / ratio if ratio else None
            if row["flops"] is not None:
                row["gflops_per_s"] = row["flops"] / median_s / 1e9
            recorded = ceilings[name].products if name in ceilings else None
            if recorded is not None:
                row["ceiling_flops"] = recorded.flops
                row["ceiling_products"] = recorded.summary()
                row["product_gflops_per_s"] = recorded.flops / median_s / 1e9
                ceiling_samples = timing.samples.get(name + CEILING_SUFFIX)
                if ceiling_samples and name + CEILING_SUFFIX not in timing.failures:
                    ceiling_s = harness.median_of(ceiling_samples)
                    row["ceiling_ms"] = None if ceiling_s is None else ceiling_s * 1e3
                    row["ceiling_fraction"] = harness.paired_ratio(ceiling_samples, samples)
        self.bar.update(len(rows))


def _empty_row(work: harness.Workload) -> dict[str, Any]:
    return {
        "mechanism": work.mechanism, "seq_len": work.seq_len, "mode": work.mode, "batch": work.batch,
        "dim": work.dim, "heads": work.heads, "dtype": work.dtype, "causal": work.causal, "device": work.device,
        "options": work.options, "status": "ok", "error": None,
        "time_ms": None, "time_samples_ms": [], "time_spread": None, "rounds": 0, "inner": None,
        "time_ratio_vs_vanilla": None, "speedup_vs_vanilla": None,
        "peak_mem_mb": None, "mem_ratio_vs_vanilla": None,
        "flops": None, "gflops_per_s": None, "matmul_fraction": None,
        "ceiling_ms": None, "ceiling_fraction": None, "ceiling_flops": None, "flop_bound_ms": None,
        "product_gflops_per_s": None, "ceiling_products": None,
        "first_step_ms": None, "probe_wall_s": None, "warnings": [],
    }


#: a configuration whose probed peak memory is over this share of the memory available is not timed:
#: the timing runs in the benchmark's own process, which holds other buffers, and an out-of-memory kill
#: there would end the whole run (Synthesizer at N = 16K: ~22 GiB on a 24 GiB machine). Its row says
#: "oom" with the probe's peak.
TIMING_MEMORY_SHARE = 0.5


def _available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB; None where there is no /proc (then nothing is refused)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _fail(row: dict[str, Any], status: str, message: str) -> None:
    row["status"], row["error"] = status, message
    for key in ("time_ms", "time_spread", "time_ratio_vs_vanilla", "speedup_vs_vanilla", "gflops_per_s", "matmul_fraction",
                "ceiling_ms", "ceiling_fraction", "product_gflops_per_s", "flop_bound_ms"):
        row[key] = None
