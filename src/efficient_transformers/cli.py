"""The `eft` command line (also `python -m efficient_transformers`).

    eft models [--json]      the survey's Table 1, produced from the registry
    eft models NAME ...      one mechanism's card in full       (efficient_transformers.model_card)
    eft bench ...            the efficiency benchmark           (efficient_transformers.bench.command)
    eft train ...            train and evaluate one model        (efficient_transformers.train.command)
    eft eval RUN_DIR ...     a run's test split, float32 / int8  (efficient_transformers.train.evaluate)
    eft distill ...          knowledge distillation              (efficient_transformers.train.distill)
    eft lra ...              the long-range suite                (efficient_transformers.train.lra)
    eft advise ...           which mechanism for a length/budget (efficient_transformers.bench.advise)
    eft search ...           hardware-aware architecture search  (efficient_transformers.train.search)

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`, so the
CLI stays a thin dispatcher and the dependency direction stays cli -> (bench, train) -> models.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .formatting import aligned_table
from .registry import mechanisms

SUBCOMMANDS = {
    "bench": ("efficient_transformers.bench.command", "the efficiency benchmark: time, memory, FLOPs, slopes, crossover"),
    "train": ("efficient_transformers.train.command", "train and evaluate one model on one task"),
    "eval": ("efficient_transformers.train.evaluate", "evaluate a run folder on its test split (--int8: beside int8)"),
    "distill": ("efficient_transformers.train.distill", "knowledge distillation into a student of any mechanism"),
    "lra": ("efficient_transformers.train.lra", "the long-range suite over all mechanisms"),
    "advise": ("efficient_transformers.bench.advise", "which mechanism for this length and budget, measured here"),
    "search": ("efficient_transformers.train.search", "hardware-aware architecture search (Optuna), resumable"),
}


def models_table() -> str:
    rows = [("Model", "Year", "Complexity", "Decode", "Class")]
    for c in mechanisms():
        rows.append((c.title, str(c.year), c.complexity, "yes" if c.causal else "no", "+".join(c.classes)))
    return aligned_table(rows[0], rows[1:])


def _run_models(args: argparse.Namespace) -> int:
    if args.name is not None:
        from . import model_card

        return model_card.run(args)
    if args.bench:
        print("eft models: error: --bench needs a mechanism NAME (eft models NAME --bench FILE)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([c.to_json() for c in mechanisms()], indent=2))
    else:
        print(models_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft", description="efficient-transformers: the survey's models, measured.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(["models", *SUBCOMMANDS]) + "}")
    p = sub.add_parser("models", help="the survey's Table 1 from the registry; with NAME, one card in full",
                       description="the survey's Table 1 from the registry; with NAME, one mechanism's card in full")
    p.add_argument("name", nargs="?", metavar="NAME", help="a registry name, e.g. linformer: its card in full")
    p.add_argument("--json", action="store_true", help="print the cards as a JSON list (with NAME: the card)")
    p.add_argument("--bench", default=None, metavar="FILE", help="with NAME: its measured rows from this bench.json")
    p.add_argument("--any-machine", action="store_true", help="accept a --bench file measured on another machine")
    p.set_defaults(run=_run_models)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("efficient_transformers"):
                raise
            p = sub.add_parser(name, help=f"{help_text} (not available in this build)")
            p.set_defaults(run=lambda a, n=name: _unavailable(n))
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(run=module.run)
    return parser


def _unavailable(name: str) -> int:
    print(f"eft {name}: not available in this build", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
