"""`eft search`: hardware-aware architecture search (HAT, survey section 4.3) with Optuna.

    eft search --task listops --trials 30 --max-len 256 --steps 200
    eft search --task listops --trials 30 --max-len 256 --max-latency-ms 80 --storage sqlite:///s.db
    eft search --task byte_lm --trials 20 --mechanisms performer,linear_transformer --json

The study: multi-objective, maximise the validation accuracy (minimise bits per byte for language
modelling) and minimise the training-step latency measured at the task's length on this machine. A
trial is one architecture:

- the mechanism: every registered mechanism that fits the task (bidirectional for classification and
  retrieval, causal for language modelling; read from the registry, never a fixed list), or those of
  `--mechanisms`; a mechanism whose smallest configuration cannot run here is left out at the start,
  with the reason (see the pre-check below);
- its main budget option: the first option of `BUDGET_OPTIONS` (below; in that order) that the
  mechanism's card has, with that entry's candidate values, the card's default added, values above
  the sequence length dropped for length-like budgets (window, k, blocks, buckets); causal-only knobs
  (the chunk of a causal scan) only for language modelling. A mechanism with none of these options
  has no budget parameter (vanilla). Options outside the map (variants, feature kinds, sharing) stay
  at their defaults: they change what is computed, not how much of it;
- depth, width and heads from `--depth`, `--dim`, `--heads` (every heads choice must divide every dim).

Pre-check, when the study is created: the smallest configuration of every candidate mechanism
(least depth, width and heads, the cheap end of its budget) is measured. A mechanism that cannot run
it (error, out of memory, over the probe's time limit) is left out of the space, with the reason;
with constraints, when not one of these smallest configurations meets them, nothing will: exit 2,
showing the closest, before any trial.

Each trial, in order:

1. cost, before any training: one training step (forward + backward) of the model's Transformer stack
   (`search_stack.build_stack`: the trial's model, all its blocks, without embeddings and output head)
   at the task's length (+1 for a CLS token) and the training batch (x2 for retrieval's two
   documents), measured by the benchmark's own code (`bench.memory`: peak memory in a fresh forked
   process, and the step's verdict; `bench.harness`: warm-up and the median over timed rounds): the
   same definitions as `eft bench --mode train`. Steps far over `--max-latency-ms` (over 3x in the
   probe's one step) are not timed further;
2. constraints: a configuration over `--max-latency-ms` or `--max-memory-mb` is not trained, and is
   recorded as a pruned trial with status "constraint" and its measured figures;
3. short training by the project's `Trainer` on generated data (the same data, seed and schedule for
   every trial; `--steps`, `--batch-size`, `--lr`, ...). Early stop for hopeless trials (Optuna's
   pruners serve single-objective studies only): after `--early-stop-at` of the steps (a fraction; 0
   turns it off) the validation metric must beat the baseline by `--early-stop-margin` (accuracy above
   the majority class + margin; bits per byte below 8, a uniform guess over the bytes, - margin), or
   the trial stops there, recorded as pruned with status "hopeless" and the reason;
4. the values: the best validation metric (the Trainer's best-checkpoint selection) and the latency.

Sampling: Optuna's TPE sampler (multi-objective), seeded by `--seed` and the number of trials so far.
A space of no more than K configurations is searched exhaustively instead (each configuration once,
in an order shuffled by the seed). A proposal that repeats a configuration already evaluated is not
trained again: it is answered from the earlier trial (`duplicate_of`), does not count, and a
configuration not yet evaluated is queued next, so K counts evaluations and the search cannot stall;
when every configuration is evaluated the search ends. Failures (a mechanism that cannot run a
configuration, divergence) are failed trials with the reason. Statuses: complete, hopeless,
constraint, error, interrupted.

Resume: the study lives in an Optuna RDB storage (default `sqlite:///OUT/search.db`; `--storage`,
`--study-name`), with the search's settings, search space and machine in its user attributes.
`--trials K` is the total number of trials (evaluations) in the study: running the same command
again runs only the remaining ones. A trial interrupted by Ctrl-C (or left running by a killed process) is recorded as
"interrupted", does not count, and its configuration runs first on resume. Settings not given on
resume are taken from the study (the torch thread count too); settings given differently are refused
(another --study-name starts a new search), and so is a study measured on another machine (its
latencies would not compare). One process at a time per study.

Outputs: OUT/search.json, OUT/search.md, OUT/search.png (latency against the metric, the Pareto front
joined, constraints marked), the Pareto front, and the best configuration (the best metric among the
trials within the constraints, ties by latency) as a ready `eft train` command line (the trial's
exact config; without --num-test the run also reports the test split). Trial run folders are kept in
OUT/trials/STUDY/NUMBER (results.json, metrics.jsonl; the weights only with --keep-weights).

Exit status: 0 done; 1 no trial finished training (all hopeless or failed); 2 bad input (unknown task
or mechanism, K < 1, a storage that cannot be opened, settings that contradict the stored study,
constraints nothing meets: the closest configurations are shown); 130 interrupted (the study keeps
every finished trial; run the same command to resume).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import re
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..formatting import json_safe
from ..argtypes import finite_float as _finite_float, fraction, non_negative_int as _non_negative_int
from ..argtypes import positive_float, positive_int as _positive_int, positive_int_list as _int_list
from .. import __version__ as PACKAGE_VERSION
from .. import registry
from . import checkpoint as ckpt
from .config import TrainConfig
from ..progress import progress_bar
from .search_report import (CONSTRAINT_FLAG, STATUSES, UNIT, _show, _summary_line, best_row, closest_text,
                            pareto_front, text_report, train_command, write_outputs)

STUDY_ATTR = "eft_search"  # the study's user attribute holding settings, space, machine
SCHEMA = 1
STACK_FILE = Path(__file__).with_name("search_stack.py")
MEASURE_TIMEOUT_S = 60.0  # per configuration, the probe's limit (build and one step)
FAR_OVER = 3.0  # a probe step this many times over --max-latency-ms is not timed further


class SearchError(ValueError):
    """Bad input or no possible search: printed as one message, exit status 2."""


# ---------------------------------------------------------------------------------------- budget options
@dataclass(frozen=True)
class BudgetOption:
    """Candidate values of one budget-like option.

    length_bound: values above the sequence length are dropped (a window, block or projected length
    longer than the sequence buys nothing); causal_only: the option only shapes a causal computation
    (searched for language modelling only); cheaper: which end of the values costs least ("smaller" or
    "larger"), for the pre-check of the constraints."""

    values: tuple[int, ...]
    length_bound: bool = False
    causal_only: bool = False
    cheaper: str = "smaller"


#: Option name -> candidates, in priority order: a mechanism's main budget is the first of these its
#: card has. Several spellings of one idea are listed so that mechanisms registered later are searched
#: without a change here; an option not listed is kept at its default.
BUDGET_OPTIONS: dict[str, BudgetOption] = {
    "nb_features": BudgetOption((16, 32, 64, 128, 256)),                     # Performer: random features
    "num_features": BudgetOption((16, 32, 64, 128, 256)),
    "k": BudgetOption((16, 32, 64, 128, 256), length_bound=True),            # Linformer: projected length
    "window": BudgetOption((16, 32, 64, 128, 256), length_bound=True),       # Longformer, local attention
    "window_size": BudgetOption((16, 32, 64, 128, 256), length_bound=True),
    "block_size": BudgetOption((8, 16, 32, 64, 128), length_bound=True),     # BigBird, Sparse, Image, Sinkhorn
    "bucket_size": BudgetOption((8, 16, 32, 64, 128), length_bound=True),    # Reformer, Sinkhorn buckets
    "query_block": BudgetOption((16, 32, 64, 128, 256), length_bound=True),  # Image Transformer query blocks
    "num_random_blocks": BudgetOption((1, 2, 3)),                            # BigBird
    "n_hashes": BudgetOption((1, 2, 4)),                                     # Reformer hash rounds
    "num_hashes": BudgetOption((1, 2, 4)),
    "num_buckets": BudgetOption((2, 4, 8, 16)),
    "n_buckets": BudgetOption((2, 4, 8, 16)),
    "num_clusters": BudgetOption((2, 4, 8, 16)),                             # Routing: k-means clusters
    "n_clusters": BudgetOption((2, 4, 8, 16)),
    "num_inducing": BudgetOption((8, 16, 32, 64)),                           # Set Transformer inducing points
    "num_inducing_points": BudgetOption((8, 16, 32, 64)),
    "num_inds": BudgetOption((8, 16, 32, 64)),
    "num_memory": BudgetOption((8, 16, 32, 64)),                             # memory / global tokens
    "num_global": BudgetOption((1, 2, 4, 8)),
    "memory_len": BudgetOption((16, 32, 64, 128)),                           # Transformer-XL, Compressive memory
    "mem_len": BudgetOption((16, 32, 64, 128)),
    "memory_size": BudgetOption((16, 32, 64, 128)),
    "compression": BudgetOption((2, 3, 4, 8), cheaper="larger"),             # Memory-compressed attention
    "compression_factor": BudgetOption((2, 3, 4, 8), cheaper="larger"),
    "compression_rate": BudgetOption((2, 3, 4, 8), cheaper="larger"),
    "stride": BudgetOption((8, 16, 32, 64, 128), length_bound=True),        # Sparse Transformer
    "chunk_size": BudgetOption((32, 64, 128, 256), length_bound=True, causal_only=True),  # chunked causal scans
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def budget_for(card: registry.Card, length: int, causal: bool) -> dict[str, Any]:
    """{"option": name or None, "values": [...], "default": card default, "cheaper": ...} for one card."""
    for name, spec in BUDGET_OPTIONS.items():
        if name not in (card.options or {}) or (spec.causal_only and not causal):
            continue
        default = card.options[name]
        if not (default is None or _is_int(default)):
            continue  # not an integer budget here (a different meaning of the name)
        values = [v for v in spec.values if not spec.length_bound or v <= length]
        if default is None or not spec.length_bound or default <= length:
            values.append(default)
        if not [v for v in values if v is not None]:
            values.append(length)  # every candidate is longer than the sequence: the sequence's length
        ints = sorted({v for v in values if v is not None})
        return {"option": name, "values": ([None] if None in values else []) + ints, "default": default,
                "cheaper": spec.cheaper}
    return {"option": None, "values": [], "default": None, "cheaper": None}


# ---------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """One point of the search space."""

    mechanism: str
    option: str | None
    value: Any
    depth: int
    dim: int
    heads: int

    def attention_options(self) -> dict[str, Any]:
        return {} if self.option is None else {self.option: self.value}

    def label(self) -> str:
        budget = f"({self.option}={self.value})" if self.option else ""
        return f"{self.mechanism}{budget} depth {self.depth} dim {self.dim} heads {self.heads}"

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mechanism": self.mechanism}
        if self.option:
            out[f"{self.mechanism}.{self.option}"] = self.value
        out.update(depth=self.depth, dim=self.dim, heads=self.heads)
        return out

    def key(self) -> str:
        return json.dumps(self.params(), sort_keys=True)


def suggest(trial: Any, space: dict[str, Any]) -> Arch:
    """Define-by-run: the mechanism, then its own budget parameter (named MECHANISM.OPTION, so every
    parameter keeps one fixed set of choices), then depth, dim, heads."""
    mechanism = trial.suggest_categorical("mechanism", list(space["mechanisms"]))
    entry = space["mechanisms"][mechanism]
    value = trial.suggest_categorical(f"{mechanism}.{entry['option']}", entry["values"]) if entry["option"] else None
    return Arch(mechanism, entry["option"], value, trial.suggest_categorical("depth", space["depth"]),
                trial.suggest_categorical("dim", space["dim"]), trial.suggest_categorical("heads", space["heads"]))


def arch_from_params(params: dict[str, Any], space: dict[str, Any]) -> Arch:
    mechanism = params["mechanism"]
    option = space["mechanisms"].get(mechanism, {}).get("option")
    return Arch(mechanism, option, params.get(f"{mechanism}.{option}") if option else None,
                params["depth"], params["dim"], params["heads"])


def cheapest(mechanism: str, space: dict[str, Any]) -> Arch:
    """The smallest configuration of one mechanism: least depth and width, most heads' smallest head
    size aside (the fewest heads), the cheap end of the budget."""
    entry = space["mechanisms"][mechanism]
    value = None
    if entry["option"]:
        ints = [v for v in entry["values"] if v is not None]
        value = (min(ints) if entry["cheaper"] == "smaller" else max(ints)) if ints else entry["values"][0]
    return Arch(mechanism, entry["option"], value, min(space["depth"]), min(space["dim"]), min(space["heads"]))


# ---------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that decides what a trial computes and measures; stored with the study."""

    task: str
    kind: str
    metric: str
    direction: str  # "maximize" (accuracy) | "minimize" (bits per byte)
    max_len: int
    steps: int
    batch_size: int
    lr: float
    dropout: float
    num_train: int
    num_val: int
    seed: int
    early_stop_at: float
    early_stop_margin: float
    max_latency_ms: float | None
    max_memory_mb: float | None
    device: str
    threads: int
    mechanisms: list[str]
    depth: list[int]
    dim: list[int]
    heads: list[int]

    @property
    def causal(self) -> bool:
        return self.kind == "language_model"

    @property
    def check_step(self) -> int | None:
        """The step of the early-stop check (None: no check)."""
        if self.early_stop_at <= 0:
            return None
        step = max(1, round(self.steps * self.early_stop_at))
        return step if step < self.steps else None

    def constraints(self) -> dict[str, float]:
        out = {}
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.max_latency_ms
        if self.max_memory_mb is not None:
            out["peak_mem_mb"] = self.max_memory_mb
        return out


#: CLI settings: argparse destination -> default (None: decided from the task or the machine).
DEFAULTS: dict[str, Any] = {
    "mechanisms": None, "depth": [1, 2, 4], "dim": [32, 64, 128], "heads": [2, 4], "max_len": None,
    "steps": 100, "batch_size": 32, "lr": 1e-3, "dropout": 0.0, "num_train": 1000, "num_val": 200, "seed": 0,
    "early_stop_at": 0.25, "early_stop_margin": 0.02, "max_latency_ms": None, "max_memory_mb": None,
    "device": "cpu", "threads": "auto",
}


def fitting_mechanisms(kind: str) -> list[str]:
    causal = kind == "language_model"
    return [c.name for c in registry.mechanisms() if (c.causal if causal else c.bidirectional)]


def new_settings(task: Any, given: dict[str, Any]) -> Settings:
    """The settings of a new study: the given values over the defaults, checked."""
    values = {**DEFAULTS, **given}
    fit = fitting_mechanisms(task.kind)
    if values["mechanisms"] is None:
        mechanisms = fit
    else:
        registered = registry.mechanism_names()
        unknown = [m for m in values["mechanisms"] if m not in registered]
        if unknown:
            raise SearchError(f"unknown mechanism(s) {unknown}; registered: {registered}")
        wrong = [m for m in values["mechanisms"] if m not in fit]
        if wrong:
            need = "a causal" if task.kind == "language_model" else "a bidirectional"
            raise SearchError(f"task {task.name!r} needs {need} mechanism; {wrong} cannot serve; allowed: {fit}")
        mechanisms = list(dict.fromkeys(values["mechanisms"]))
    if not mechanisms:
        raise SearchError(f"no registered mechanism fits task {task.name!r} ({task.kind})")
    bad = [(h, d) for h in values["heads"] for d in values["dim"] if d % h]
    if bad:
        h, d = bad[0]
        raise SearchError(f"--heads {h} does not divide --dim {d}: every heads choice must divide every dim choice "
                          f"(heads that divide all of {values['dim']}: "
                          f"{[x for x in range(1, min(values['dim']) + 1) if all(v % x == 0 for v in values['dim'])]})")
    natural = getattr(task, "natural_max_len", None)
    max_len = values["max_len"] or (natural({}) if natural else task.default_max_len)
    threads = values["threads"]
    if threads == "auto":
        from ..bench.runner import load_average, machine_is_busy

        threads = torch.get_num_threads()
        if values["device"] == "cpu" and threads > 1 and machine_is_busy(load_average()):
            threads = 1
    if values["device"] == "cuda" and not torch.cuda.is_available():
        raise SearchError("--device cuda, but torch.cuda.is_available() is False; allowed: cpu")
    return Settings(
        task=task.name, kind=task.kind, metric=task.metric,
        direction="minimize" if task.metric == "bits_per_byte" else "maximize", max_len=int(max_len),
        steps=values["steps"], batch_size=values["batch_size"], lr=values["lr"], dropout=values["dropout"],
        num_train=values["num_train"], num_val=values["num_val"], seed=values["seed"],
        early_stop_at=values["early_stop_at"], early_stop_margin=values["early_stop_margin"],
        max_latency_ms=values["max_latency_ms"], max_memory_mb=values["max_memory_mb"], device=values["device"],
        threads=int(threads), mechanisms=mechanisms, depth=sorted(set(values["depth"])),
        dim=sorted(set(values["dim"])), heads=sorted(set(values["heads"])))


def stored_settings(stored: dict[str, Any], given: dict[str, Any], where: str) -> Settings:
    """A resumed study's settings; given values that contradict them raise SearchError."""
    settings = Settings(**stored["settings"])
    requested = stored.get("requested", {})
    conflicts = []
    for name, value in given.items():
        resolved = getattr(settings, name)
        if isinstance(resolved, list) and isinstance(value, list) and name != "mechanisms":
            resolved, value_cmp = sorted(resolved), sorted(set(value))
        else:
            value_cmp = value
        if value_cmp != resolved and value != requested.get(name, object()):
            flag = "--" + name.replace("_", "-")
            conflicts.append(f"{flag} {_show(value)} (the study has {_show(resolved)})")
    if conflicts:
        raise SearchError(f"study {where} was created with other settings: " + "; ".join(conflicts) +
                          ". Omit them to resume with the study's settings, or pass another --study-name for a "
                          "new search")
    return settings


# ---------------------------------------------------------------------------------------- one search
class SearchRun:
    """The shared state of one `eft search` process: the task's data, the baseline, the probe server,
    the measured costs (each architecture measured once per process)."""

    def __init__(self, settings: Settings, task: Any, out: Path, study_name: str, *, keep_weights: bool = False,
                 say: Callable[[str], None] | None = None) -> None:
        from .distributed import DistEnv, resolve_device

        self.settings, self.task, self.out, self.keep_weights = settings, task, out, keep_weights
        self.say = say or (lambda text: print(f"eft search: {text}", file=sys.stderr))
        self.trial_root = out / "trials" / _safe_name(study_name)
        self.env = DistEnv(device=resolve_device(settings.device))
        s = settings
        try:
            self.splits = task.datasets(None, seed=s.seed, max_len=s.max_len, num_train=s.num_train,
                                        num_val=s.num_val, num_test=0)
        except (ValueError, FileNotFoundError) as err:
            raise SearchError(f"task {task.name!r} cannot make its data with these settings: {err}") from None
        for split in ("train", "val"):
            if len(self.splits[split]) == 0:
                raise SearchError(f"task {task.name!r}: the {split} split is empty (check --num-{split})")
        self.baseline = compute_baseline(task, self.splits)
        self.costs: dict[str, dict[str, Any]] = {}
        self._probe = None
        from ..bench import harness
        from ..bench.runner import QUICK_EFFORT

        self.plan = harness.TimingPlan(repeats=QUICK_EFFORT.repeats, min_rounds=QUICK_EFFORT.min_rounds,
                                       budget_s=QUICK_EFFORT.budget_s, timeout_s=MEASURE_TIMEOUT_S,
                                       sample_min_s=QUICK_EFFORT.sample_min_s)

    # ------------------------------------------------------------------ pieces the trial functions use
    def train_config(self, arch: Arch, out_dir: Path | str) -> TrainConfig:
        s = self.settings
        check = s.check_step
        return TrainConfig(
            task=s.task, attention=arch.mechanism, out=str(out_dir), steps=s.steps, seed=s.seed, dim=arch.dim,
            depth=arch.depth, heads=arch.heads, max_len=s.max_len, dropout=s.dropout,
            attention_options=arch.attention_options(), num_train=s.num_train, num_val=s.num_val, num_test=0,
            batch_size=s.batch_size, lr=s.lr, eval_every=check or max(1, s.steps // 4), device=s.device,
            progress="off")

    def workload(self, arch: Arch):
        """The benchmark workload of one architecture: its model's stack, one training step."""
        from ..bench import harness
        from .objective import model_config

        spec = model_config(self.train_config(arch, self.out / "unused"), self.task, self.settings.max_len)
        extra = 1 if spec["class"] != "TransformerLM" and spec.get("pooling") == "cls" else 0
        batch = self.settings.batch_size * (2 if spec["class"] == "RetrievalModel" else 1)
        return harness.Workload(mechanism=arch.mechanism, seq_len=self.settings.max_len + extra, mode="train",
                                batch=batch, dim=arch.dim, heads=arch.heads, causal=self.settings.causal,
                                device=self.settings.device, options={"model_spec": spec},
                                factory=f"{STACK_FILE}:build_stack")

    def probe(self):
        if self._probe is None:
            from ..bench.memory import ProbeServer

            self._probe = ProbeServer(threads=self.settings.threads)
        return self._probe

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def cost(self, arch: Arch) -> dict[str, Any]:
        key = arch.key()
        if key not in self.costs:
            self.costs[key] = measure_cost(arch, self)
        return self.costs[key]

    def violations(self, cost: dict[str, Any]) -> list[str]:
        out = []
        for metric, limit in self.settings.constraints().items():
            value = cost.get(metric)
            if value is None:
                continue  # unmeasurable here (no /proc): noted in the report, not a violation
            if value > limit:
                out.append(f"{metric.split('_')[0] if metric == 'latency_ms' else 'peak memory'} "
                           f"{value:.1f} {UNIT[metric]} > {CONSTRAINT_FLAG[metric]} {limit:g}")
        return out

    def hopeless(self, value: float | None) -> str | None:
        """Why a validation metric at the early-stop check is hopeless (None: it is not)."""
        base, margin = self.baseline["value"], self.settings.early_stop_margin
        if value is None:
            return "no validation metric at the check"
        if base is None:
            return None
        if self.settings.direction == "maximize" and value <= base + margin:
            return (f"validation accuracy {value:.4f} after {self.settings.check_step} of {self.settings.steps} steps "
                    f"is not above the majority-class baseline {base:.4f} + margin {margin:g}")
        if self.settings.direction == "minimize" and value >= base - margin:
            return (f"validation bits per byte {value:.4f} after {self.settings.check_step} of {self.settings.steps} "
                    f"steps is not below {base:g} (a uniform guess over the bytes) - margin {margin:g}")
        return None

    def trial_dir(self, number: int) -> Path:
        return self.trial_root / f"{number:04d}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "study"


def compute_baseline(task: Any, splits: dict[str, Any]) -> dict[str, Any]:
    """The bar a trial must clear at the early-stop check: the majority class's validation accuracy
    (classification, retrieval), or for language modelling 8 bits per byte, a uniform guess over the
    256 byte values: a model not below it has learned nothing. (The best context-free model, the
    training bytes' unigram distribution, is reported beside it: short runs often reach it only after
    the check, so it is not the bar.)"""
    if task.kind == "language_model":
        counts = torch.ones(task.vocab_size, dtype=torch.float64)  # add-one smoothing
        train, val = splits["train"], splits["val"]
        for i in range(min(len(train), 2000)):
            counts += torch.bincount(train[i]["targets"].flatten(), minlength=task.vocab_size)[: task.vocab_size]
        logp = torch.log2(counts / counts.sum())
        total, n = 0.0, 0
        for i in range(min(len(val), 2000)):
            t = val[i]["targets"].flatten()
            total -= float(logp[t].sum())
            n += t.numel()
        return {"kind": "uniform bytes", "value": 8.0, "unigram_bits_per_byte": total / max(n, 1)}
    from .sampling import majority_baseline
    from .trainer import split_labels

    base = majority_baseline(split_labels(splits["train"]), split_labels(splits["val"]))
    return {"kind": "majority class", "value": base["accuracy"], "label": base["label"]}


def measure_cost(arch: Arch, run: SearchRun) -> dict[str, Any]:
    """Latency and peak memory of one training step of `arch`'s stack (see the module doc):
    {"status", "error", "latency_ms", "peak_mem_mb", "latency_source", "spread"}."""
    from ..bench import harness

    work = run.workload(arch)
    answer = run.probe().measure(work.to_json(), MEASURE_TIMEOUT_S)
    cost = {"status": answer.get("status", "error"), "error": answer.get("error"),
            "peak_mem_mb": answer.get("peak_mem_mb"), "latency_ms": None, "latency_source": None, "spread": None,
            "memory_note": answer.get("memory_note")}
    if cost["status"] != "ok":
        return cost
    first_ms = answer.get("first_step_ms")
    limit = run.settings.max_latency_ms
    if limit is not None and first_ms is not None and first_ms > FAR_OVER * limit:
        cost.update(latency_ms=first_ms, latency_source=f"one step in the probe (over {FAR_OVER:g}x the limit)")
        return cost
    try:
        step = harness.make_step(harness.build_layer(work), work)
    except Exception as err:  # noqa: BLE001 - recorded as the trial's failure
        cost["status"], cost["error"] = harness.classify_failure(err)
        return cost
    gc.collect()
    gc.disable()
    try:
        timing = harness.time_interleaved({"candidate": step}, run.plan, run.settings.device,
                                          estimates_s={"candidate": (first_ms or 0.0) / 1e3})
    finally:
        gc.enable()
    if timing.failures:
        cost["status"], cost["error"] = harness.classify_failure(timing.failures["candidate"])
        return cost
    samples = [s for s in timing.samples["candidate"] if s is not None]
    median = harness.median_of(samples)
    cost.update(latency_ms=median * 1e3, latency_source=f"median of {len(samples)} timed rounds",
                spread=(max(samples) - min(samples)) / median if median else None)
    return cost


def train_candidate(arch: Arch, run: SearchRun, out_dir: Path) -> dict[str, Any]:
    """Short training of `arch` with the project's Trainer, with the early stop of hopeless trials:
    {"status": "complete" | "hopeless", "val_metric", "reason", "check", "best_step", "parameters", "config"}."""
    from .trainer import Trainer

    config = run.train_config(arch, out_dir)
    trainer = Trainer(config, env=run.env, task=run.task, splits=run.splits, overwrite=True)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    out: dict[str, Any] = {"config": config.to_json(), "parameters": parameters, "check": None}
    check = run.settings.check_step
    if check is not None:
        trainer.fit(stop_at=check)
        value = trainer.best["value"] if trainer.best else None
        out["check"] = {"step": check, "val_metric": value, "baseline": run.baseline["value"],
                        "margin": run.settings.early_stop_margin}
        reason = run.hopeless(value)
        if reason:
            return {**out, "status": "hopeless", "val_metric": value, "reason": reason, "best_step": check}
        trainer = Trainer(config, env=run.env, task=run.task, splits=run.splits, resume=True)
    results = trainer.fit()
    return {**out, "status": "complete", "val_metric": results["best"]["value"], "reason": None,
            "best_step": results["best"]["step"]}


def _drop_weights(out_dir: Path) -> None:
    """Keep results.json and metrics.jsonl of a finished trial; the weights and the resume state go."""
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.BEST_FILE, ckpt.STATE_FILE):
        (out_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- the study
def _optuna():
    try:
        import optuna
    except ImportError:
        raise SearchError("eft search needs Optuna: pip install 'efficient-transformers[search]' "
                          "(or pip install optuna)") from None
    return optuna


def open_storage(url: str):
    """Optuna's RDB storage at `url`; SearchError (exit 2) when it cannot be opened."""
    optuna = _optuna()
    if "://" not in url:
        raise SearchError(f"--storage {url!r} is not a database URL; expected e.g. sqlite:///search.db")
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:") and not path.parent.is_dir():
            raise SearchError(f"cannot open the storage {url!r}: the folder {str(path.parent)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(url)
            optuna.get_all_study_names(storage)  # a first read: a file that is no database fails here at the latest
            return storage
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SearchError(f"cannot open the storage {url!r}: {first[:300]}") from None


def counted(trial: Any) -> bool:
    """A trial that counts towards --trials: an evaluation that finished (not interrupted, not a repeat)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and \
        trial.user_attrs.get("status") != "interrupted" and "duplicate_of" not in trial_info(trial)


def trial_info(trial: Any) -> dict[str, Any]:
    """What eft search recorded on a trial: the user attribute "eft" (one dict, one write), plus
    "status" and, for queued trials, "retry_of" / "after_repeat_of" (kept apart for Optuna's tools)."""
    attrs = trial.user_attrs
    return {**attrs.get("eft", {}), **{k: attrs[k] for k in ("status", "retry_of", "after_repeat_of") if k in attrs}}


def prepare_resume(study: Any, storage: Any = None) -> list[int]:
    """Trials left RUNNING by a killed process become interrupted; every interrupted trial not yet
    queued again is queued (its configuration runs first). Returns the numbers queued."""
    from optuna.trial import TrialState

    storage = study._storage if storage is None else storage
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "status", "interrupted")
            storage.set_trial_user_attr(trial_id, "eft", {"reason": "left running by a process that stopped"})
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.user_attrs.get("status") == "interrupted" and t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


COPIED_ATTRS = ("status", "reason", "label", "latency_ms", "peak_mem_mb", "latency_source", "spread", "val_metric",
                "check", "best_step", "parameters", "config", "error")


def evaluate(trial: Any, run: SearchRun, space: dict[str, Any], seen: dict[str, dict[str, Any]]):
    """One trial: (state, values, user attributes)."""
    from optuna.trial import TrialState

    arch = suggest(trial, space)
    attrs: dict[str, Any] = {"label": arch.label()}
    original = seen.get(arch.key())
    if original is not None:
        attrs.update({k: v for k, v in original["attrs"].items() if k in COPIED_ATTRS})
        attrs["duplicate_of"] = original["number"]
        return original["state"], original["values"], attrs
    cost = run.cost(arch)
    attrs.update({k: cost.get(k) for k in ("latency_ms", "peak_mem_mb", "latency_source", "spread")})
    if cost["status"] != "ok":
        attrs.update(status="error", reason=f"{cost['status']} in the cost measurement: {cost.get('error')}")
        return TrialState.FAIL, None, attrs
    violated = run.violations(cost)
    if violated:
        attrs.update(status="constraint", reason="; ".join(violated) + " (not trained)")
        return TrialState.PRUNED, None, attrs
    out_dir = run.trial_dir(trial.number)
    started = time.monotonic()
    try:
        result = train_candidate(arch, run, out_dir)
    except (ValueError, FloatingPointError, RuntimeError) as err:
        attrs.update(status="error", reason=f"training failed: {type(err).__name__}: {err}"[:500],
                     train_s=time.monotonic() - started)
        return TrialState.FAIL, None, attrs
    finally:
        if not run.keep_weights and out_dir.is_dir():
            _drop_weights(out_dir)
    attrs.update({k: result.get(k) for k in ("status", "reason", "val_metric", "check", "best_step", "parameters",
                                             "config")})
    attrs.update(train_s=time.monotonic() - started, out=str(out_dir))
    if result["status"] == "hopeless":
        return TrialState.PRUNED, None, attrs
    return TrialState.COMPLETE, [float(result["val_metric"]), float(cost["latency_ms"])], attrs


def enumerate_space(space: dict[str, Any]) -> list[Arch]:
    """Every configuration of the space, in a fixed order."""
    out = []
    for name, entry in space["mechanisms"].items():
        for value in (entry["values"] if entry["option"] else [None]):
            for depth in space["depth"]:
                for dim in space["dim"]:
                    out.extend(Arch(name, entry["option"], value, depth, dim, heads) for heads in space["heads"])
    return out


def optimize(study: Any, run: SearchRun, space: dict[str, Any], total: int, *, progress: bool | None = None,
             notes: list[str] | None = None) -> int:
    """Run trials until `total` evaluations count (or every configuration of the space is evaluated);
    returns how many trials ran in this call.

    A space of at most `total` configurations is searched exhaustively: every configuration not yet
    evaluated is queued, in an order shuffled by the seed. Otherwise the sampler (TPE) proposes; a
    proposal that repeats an evaluated configuration is answered from it (`duplicate_of`, not
    counted), and an unevaluated configuration, drawn by the seed, is queued next, so that every
    counted trial is a new evaluation and the search cannot stall."""
    import random

    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    seen = {arch_from_params(t.params, space).key(): _record(t) for t in trials if counted(t) and t.params}
    done = sum(counted(t) for t in trials)
    configurations = enumerate_space(space)

    def waiting() -> set[str]:
        return {arch_from_params(t.system_attrs["fixed_params"], space).key()
                for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if t.system_attrs.get("fixed_params")}

    if len(configurations) <= total:
        order = list(configurations)
        random.Random(run.settings.seed).shuffle(order)
        queued = waiting()
        for arch in order:
            if arch.key() not in seen and arch.key() not in queued:
                study.enqueue_trial(arch.params())
        if notes is not None:
            notes.append(f"the space holds {len(configurations)} configurations, no more than --trials {total}: "
                         "searched exhaustively, each configuration once")
    ran = 0
    bar = progress_bar(total, "eft search", enabled=progress, initial=done, unit="trial")
    try:
        while done < total and len(seen) < len(configurations):
            trial = study.ask()
            try:
                state, values, attrs = evaluate(trial, run, space, seen)
            except KeyboardInterrupt:
                trial.set_user_attr("status", "interrupted")
                trial.set_user_attr("eft", {"reason": "interrupted (Ctrl-C): runs again first on resume"})
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as err:  # noqa: BLE001 - one trial's surprise must not end the study
                state, values = TrialState.FAIL, None
                attrs = {"status": "error", "reason": f"{type(err).__name__}: {err}"[:500]}
            trial.set_user_attr("status", attrs.get("status"))
            trial.set_user_attr("eft", json_safe({k: v for k, v in attrs.items() if k != "status"}))
            study.tell(trial, values, state=state if values is None else None)
            ran += 1
            if "duplicate_of" in attrs:
                queued = waiting()
                fresh = [a for a in configurations if a.key() not in seen and a.key() not in queued]
                if fresh and not queued:
                    pick = random.Random(run.settings.seed * 1_000_003 + trial.number).choice(fresh)
                    study.enqueue_trial(pick.params(), user_attrs={"after_repeat_of": attrs["duplicate_of"]})
                continue
            seen.setdefault(arch_from_params(trial.params, space).key(), {
                "number": trial.number, "state": TrialState.COMPLETE if values is not None else state,
                "values": values, "attrs": {**trial_info(trial), **attrs}})
            done += 1
            bar.update(1)
            bar.set_postfix_str(f"trial #{trial.number} {attrs.get('status')}", refresh=False)
    finally:
        bar.close()
    if notes is not None and done < total and len(seen) >= len(configurations):
        notes.append(f"every one of the {len(configurations)} configurations of the space is evaluated: "
                     f"stopped at {done} of --trials {total}")
    return ran


def _record(t: Any) -> dict[str, Any]:
    return {"number": t.number, "state": t.state, "values": list(t.values) if t.values else None,
            "attrs": trial_info(t)}


# ---------------------------------------------------------------------------------------- the report
def trial_rows(study: Any, space: dict[str, Any]) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) or not t.params:
            continue
        a, arch = trial_info(t), arch_from_params(t.params, space)
        rows.append({
            "number": t.number, "state": t.state.name, "status": a.get("status"), "reason": a.get("reason"),
            "mechanism": arch.mechanism, "budget": {"option": arch.option, "value": arch.value} if arch.option else None,
            "depth": arch.depth, "dim": arch.dim, "heads": arch.heads, "label": arch.label(),
            "val_metric": a.get("val_metric"), "latency_ms": a.get("latency_ms"), "peak_mem_mb": a.get("peak_mem_mb"),
            "latency_source": a.get("latency_source"), "check": a.get("check"), "best_step": a.get("best_step"),
            "parameters": a.get("parameters"), "train_s": a.get("train_s"), "out": a.get("out"),
            "duplicate_of": a.get("duplicate_of"), "retry_of": a.get("retry_of"), "config": a.get("config"),
        })
    return rows


def build_report(study: Any, stored: dict[str, Any], settings: Settings, *, study_name: str, storage: str,
                 total: int, started: float, interrupted: bool, notes: list[str]) -> dict[str, Any]:
    space = stored["space"]
    rows = trial_rows(study, space)
    front = pareto_front(rows, settings.direction)
    best = best_row(rows, settings.direction)
    if best is not None and best.get("config"):
        out = f"runs/{settings.task}-{best['mechanism']}-search"
        argv = train_command(best["config"], out)
        best = {**best, "command": shlex.join(argv), "argv": argv}
    evaluations = [r for r in rows if r["duplicate_of"] is None]
    summary = {status: sum(r["status"] == status for r in evaluations) for status in STATUSES}
    summary.update(counted=sum(r["status"] != "interrupted" for r in evaluations),
                   duplicates=len(rows) - len(evaluations), requested=total)
    import optuna

    config = {
        "schema": SCHEMA, "study_name": study_name, "storage": storage, "trials": total, **asdict(settings),
        "space": space, "excluded": stored.get("excluded", []), "preflight": stored.get("preflight", []),
        "baseline": stored.get("baseline"), "machine": stored.get("machine"), "created_at": stored.get("created_at"),
        "measure": ("one training step (forward + backward) of the model's Transformer stack at N = "
                    f"{stored.get('stack_len', settings.max_len)}, batch {stored.get('stack_batch', settings.batch_size)}: "
                    "peak memory in an isolated probe process, median time over interleaved rounds (the eft bench "
                    "harness)"),
        "objectives": [f"{settings.direction} validation {settings.metric}", "minimize latency_ms"],
        "torch_version": torch.__version__, "optuna_version": optuna.__version__, "package_version": PACKAGE_VERSION,
        "wall_time_s": time.monotonic() - started, "interrupted": interrupted, "notes": notes,
        "files": ["search.json", "search.md"],
    }
    return {"config": config, "trials": rows, "pareto_front": front, "best": best, "summary": summary}


# ---------------------------------------------------------------------------------------- the command










_positive_float = positive_float()
_fraction = fraction("fraction in [0, 1) (0: no early stop)")


def _dropout(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a dropout rate in [0, 1), got {text!r}")
    return value




def configure(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import name_list as _name_list, threads as _threads

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (__doc__ or "").split("\n\n")[0] + "\n\n" + (__doc__ or "").split("\n\n")[1]
    S = argparse.SUPPRESS  # settings not given on resume come from the study
    d = DEFAULTS
    parser.add_argument("--task", required=True, help="task name (listops, text, retrieval, image, pathfinder, byte_lm)")
    parser.add_argument("--trials", type=_positive_int, required=True, metavar="K",
                        help="total trials in the study (a resumed study runs only the remaining ones)")
    parser.add_argument("--max-latency-ms", type=_positive_float, default=S, metavar="L",
                        help="constraint: training-step latency of the model's stack, ms (default none)")
    parser.add_argument("--max-memory-mb", type=_positive_float, default=S, metavar="M",
                        help="constraint: peak memory of one training step of the stack, MiB (default none)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna RDB storage, e.g. sqlite:///search.db (default sqlite:///OUT/search.db)")
    parser.add_argument("--study-name", default=None, metavar="NAME", help="study in the storage (default search-TASK)")
    parser.add_argument("--steps", type=_positive_int, default=S, help=f"training steps per trial (default {d['steps']})")
    parser.add_argument("--out", default="eft-search", help="output folder (default ./eft-search)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout (messages on stderr)")
    parser.add_argument("--seed", type=_non_negative_int, default=S,
                        help="seed of the sampler, the data and every trial's training (default 0)")
    space = parser.add_argument_group("search space")
    space.add_argument("--mechanisms", type=_name_list, default=S,
                       help="comma-separated registry names (default: every registered mechanism that fits the task)")
    space.add_argument("--depth", type=_int_list, default=S, help=f"depth choices (default {_show(d['depth'])})")
    space.add_argument("--dim", type=_int_list, default=S, help=f"width choices (default {_show(d['dim'])})")
    space.add_argument("--heads", type=_int_list, default=S, help=f"heads choices (default {_show(d['heads'])})")
    train = parser.add_argument_group("training of each trial")
    train.add_argument("--max-len", type=_positive_int, default=S, help="sequence length (default: the task's)")
    train.add_argument("--batch-size", type=_positive_int, default=S, help=f"(default {d['batch_size']})")
    train.add_argument("--lr", type=_positive_float, default=S, help=f"peak learning rate (default {d['lr']:g})")
    train.add_argument("--dropout", type=_dropout, default=S, help=f"(default {d['dropout']:g})")
    train.add_argument("--num-train", type=_positive_int, default=S, help=f"generated training examples (default {d['num_train']})")
    train.add_argument("--num-val", type=_positive_int, default=S, help=f"generated validation examples (default {d['num_val']})")
    train.add_argument("--early-stop-at", type=_fraction, default=S, metavar="F",
                       help=f"check hopeless trials after this fraction of the steps, 0 = never (default {d['early_stop_at']:g})")
    train.add_argument("--early-stop-margin", type=_finite_float, default=S, metavar="M",
                       help=f"how far the check must beat the baseline (default {d['early_stop_margin']:g})")
    train.add_argument("--device", choices=("cpu", "cuda"), default=S, help="where trials train and are measured (default cpu)")
    train.add_argument("--threads", type=_threads, default=S,
                       help="torch CPU threads, or 'auto' (default): torch's default, 1 on a busy machine (as eft bench)")
    train.add_argument("--keep-weights", action="store_true", help="keep every trial's weights in OUT/trials")


def run(args: argparse.Namespace) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    except (SearchError, ValueError) as err:  # ValueError: a library check on bad arguments outside any trial
        print(f"eft search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the study exists (the pre-check); later ones are handled in _run
        print("eft search: interrupted before the search started; nothing was stored", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)


SETTING_ARGS = tuple(DEFAULTS)


def _run(args: argparse.Namespace) -> int:
    from ..tasks import get_task, task_names

    optuna = _optuna()
    try:
        task = get_task(args.task)
    except ValueError:
        raise SearchError(f"unknown task {args.task!r}; allowed tasks: {task_names()}") from None
    if task.kind not in ("classification", "retrieval", "language_model"):  # e.g. max_of_set: the SetTransformer
        searchable = [n for n in task_names() if get_task(n).kind in ("classification", "retrieval", "language_model")]
        raise SearchError(f"task {task.name!r} ({task.kind}) trains a fixed model, not a mechanism of the search; "
                          f"allowed tasks: {searchable}")
    given = {name: getattr(args, name) for name in SETTING_ARGS if hasattr(args, name)}
    out = Path(args.out)
    storage_url = args.storage or f"sqlite:///{out / 'search.db'}"
    if args.storage is None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SearchError(f"cannot create the output folder {str(out)!r}: {err.strerror or err}") from None
    study_name = args.study_name or f"search-{task.name}"
    where = f"{study_name!r} in {storage_url}"
    say = lambda text: print(f"eft search: {text}", file=sys.stderr)  # noqa: E731

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(storage_url)
        directions = ["minimize" if task.metric == "bits_per_byte" else "maximize", "minimize"]
        existing = None
        if study_name in optuna.get_all_study_names(storage):
            existing = optuna.load_study(study_name=study_name, storage=storage)
            stored = existing.user_attrs.get(STUDY_ATTR)
            if not isinstance(stored, dict) or stored.get("schema") != SCHEMA:
                raise SearchError(f"study {where} was not made by this version of eft search; pass another --study-name")
            if [d.name.lower() for d in existing.directions] != directions:
                raise SearchError(f"study {where} optimises {[d.name.lower() for d in existing.directions]}, "
                                  f"not {directions}; pass another --study-name")
            settings = stored_settings(stored, given, where)
            if settings.task != task.name:
                raise SearchError(f"study {where} searches task {settings.task!r}, not {task.name!r}")
            from ..bench.advise import machine_key

            here = machine_key(settings.device)
            if stored.get("machine") != here:
                raise SearchError(f"study {where} was measured on {stored.get('machine')}, this machine is {here}: "
                                  "its latencies would not compare; pass another --study-name")
        else:
            settings = new_settings(task, given)
        torch.set_num_threads(settings.threads)
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        search = SearchRun(settings, task, out, study_name, keep_weights=args.keep_weights, say=say)
        notes: list[str] = []
        interrupted = False
        try:
            if existing is None:
                stored = _create(optuna, storage, study_name, directions, settings, given, search, where)
                study = optuna.load_study(study_name=study_name, storage=storage)
                say(f"new study {where}: {args.trials} trials over {len(stored['space']['mechanisms'])} mechanism(s)")
            else:
                study = existing
                queued = prepare_resume(study, storage)
                done = sum(counted(t) for t in study.get_trials(deepcopy=False))
                say(f"resuming study {where}: {done} of {args.trials} trials done" +
                    (f"; interrupted trial(s) {queued} run again first" if queued else ""))
            study.sampler = optuna.samplers.TPESampler(
                seed=settings.seed * 100_003 + len(study.get_trials(deepcopy=False)),
                n_startup_trials=max(2, min(10, args.trials // 3)))
            space = stored["space"]
            try:
                optimize(study, search, space, args.trials, progress=None, notes=notes)
            except KeyboardInterrupt:
                interrupted = True
            if any(m.get("memory_note") for m in search.costs.values()):
                notes.append(next(m["memory_note"] for m in search.costs.values() if m.get("memory_note")))
            report = build_report(study, stored, settings, study_name=study_name, storage=storage_url,
                                  total=args.trials, started=started, interrupted=interrupted, notes=notes)
            write_outputs(report, out)
        finally:
            search.close()
    finally:
        optuna.logging.set_verbosity(verbosity)
    files = ", ".join(report["config"]["files"])
    if interrupted:
        print(f"eft search: interrupted; {report['summary']['counted']} of {args.trials} trials are kept in "
              f"{where}; run the same command to resume. Report so far: {files} in {out}/", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(json_safe(report), indent=1))
    else:
        print(text_report(report))
    say(f"wrote {files} to {out}/")
    if report["best"] is None:
        rows = report["trials"]
        constraints = settings.constraints()
        met = [r for r in rows if r["status"] in ("complete", "hopeless")]
        if constraints and not met and any(r["status"] == "constraint" for r in rows):
            lines = ["no configuration met the constraints (" + ", ".join(
                f"{CONSTRAINT_FLAG[m]} {v:g}" for m, v in constraints.items()) + "); the closest:"]
            lines += closest_text([r for r in rows if r["status"] == "constraint"], constraints)
            print("eft search: error: " + "\n".join(lines), file=sys.stderr)
            return 2
        print(f"eft search: no trial finished training ({_summary_line(report)}); raise --steps, lower "
              "--early-stop-margin or --early-stop-at 0 to train every trial to the end", file=sys.stderr)
        return 1
    return 0


def _create(optuna, storage, study_name: str, directions: list[str], settings: Settings, given: dict[str, Any],
            search: SearchRun, where: str) -> dict[str, Any]:
    """Pre-check every mechanism's smallest configuration (the space keeps those that run; with
    constraints, something must meet them), then create the study with its settings and space."""
    from ..bench.advise import machine_key

    space = {"mechanisms": {}, "depth": settings.depth, "dim": settings.dim, "heads": settings.heads}
    cards = {c.name: c for c in registry.mechanisms()}
    for name in settings.mechanisms:
        space["mechanisms"][name] = budget_for(cards[name], settings.max_len, settings.causal)
    constraints = settings.constraints()
    preflight, excluded = [], []
    bar = progress_bar(len(space["mechanisms"]), "eft search: pre-check", enabled=None, unit="mechanism")
    for i, name in enumerate(list(space["mechanisms"])):
        arch = cheapest(name, space)
        cost = search.cost(arch)
        preflight.append({"mechanism": name, "label": arch.label(), **{k: cost.get(k) for k in (
            "status", "error", "latency_ms", "peak_mem_mb")}})
        if cost["status"] != "ok":
            excluded.append({"mechanism": name, "reason": f"{cost['status']} at its smallest configuration "
                             f"({arch.label()}): {cost.get('error')}"})
            del space["mechanisms"][name]
        bar.update(1)
        bar.set_postfix_str(name, refresh=False)
    bar.close()
    if not space["mechanisms"]:
        raise SearchError(f"no mechanism can run task {settings.task!r} at N = {settings.max_len} here:\n" +
                          "\n".join(f"  {e['mechanism']}: {e['reason']}" for e in excluded))
    for e in excluded:
        search.say(f"left out {e['mechanism']}: {e['reason']}")
    if constraints:
        ok = [p for p in preflight if p["status"] == "ok"]
        meets = [p for p in ok if not search.violations(p)]
        if not meets:
            lines = ["no configuration can meet " + ", ".join(f"{CONSTRAINT_FLAG[m]} {v:g}" for m, v in constraints.items())
                     + f": even the smallest configuration of every mechanism is over (N = {settings.max_len}, batch "
                     f"{settings.batch_size}); the closest:"]
            lines += closest_text(ok, constraints)
            lines.append("raise the limits, or lower --max-len, --batch-size, --dim or --depth")
            raise SearchError("\n".join(lines))
    work = search.workload(cheapest(next(iter(space["mechanisms"])), space))
    stored = {
        "schema": SCHEMA, "settings": asdict(settings), "requested": given, "space": space, "excluded": excluded,
        "preflight": preflight, "baseline": search.baseline, "machine": machine_key(settings.device),
        "stack_len": work.seq_len, "stack_batch": work.batch,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "version": PACKAGE_VERSION,
    }
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions)
    study.set_user_attr(STUDY_ATTR, json_safe(stored))
    return stored


__all__ = ["Arch", "BUDGET_OPTIONS", "BudgetOption", "SearchError", "SearchRun", "Settings", "best_row",
           "budget_for", "configure", "measure_cost", "pareto_front", "run", "train_candidate", "train_command"]
