"""The efficiency benchmark (`eft bench`, DESIGN.md section 4).

    from efficient_transformers.bench import run_benchmark
    result = run_benchmark(mechanisms=["vanilla", "performer"], lengths=(1024, 4096), out_dir="eft-report")

Per mechanism, length N and mode ("forward", "train"): median wall time (mechanisms interleaved in
rounds, paired with vanilla), peak memory in an isolated process, FLOPs by FlopCounterMode; derived:
ratios to vanilla (the LRA Table 2 layout), log-log slopes beside the stated complexity, the crossover
length, achieved GFLOP/s against the machine's measured matmul rate. Modules: `runner` (the loop),
`harness` (steps, timing, FLOPs), `memory` (the isolated probe), `analysis` (slopes, crossover),
`report` (Markdown and plots), `command` (the CLI); the progress bar is tqdm (`efficient_transformers.progress`).
"""

from .runner import DEFAULT_LENGTHS, QUICK_LENGTHS, run_benchmark

__all__ = ["DEFAULT_LENGTHS", "QUICK_LENGTHS", "run_benchmark"]
