"""The efficiency table of `eft lra` (LRA Table 2's layout): one training step of the suite's own encoder
(the Text task's depth, width, heads, FFN and batch, each mechanism with its suite budget) at the
suite's lengths, timed and probed for peak memory by the benchmark's machinery (`bench.harness`,
`bench.memory`), after all training has finished (never while runs train beside it).

A step is forward + backward of the encoder stack (the attention and feed-forward blocks) on random
embeddings of shape (batch, N, dim): what changes between mechanisms, without the embedding and the
head, which are the same for all. LRA's Table 2 times whole models on TPUs at 1K-4K; this one is the
same kind of measurement at the suite's lengths, on this machine.

Time: the mechanisms at one length are timed in interleaved rounds (`harness.time_interleaved`), and
the ratio to vanilla is the median of the per-round ratios (`harness.paired_ratio`), so load from other
processes that changes during the measurement largely cancels. Memory: each configuration runs once in
its own forked process (`bench.memory.ProbeServer`); peak = the step's high-water mark above the state
before it, in MiB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the layer factory the benchmark's workers import by path ("file.py:function", see `harness.load_factory`)
FACTORY = f"{Path(__file__).resolve()}:suite_encoder"


def suite_encoder(dim: int, heads: int, causal: bool = False, *, mechanism: str, depth: int, ff_mult: int,
                  max_seq_len: int, attention_options: dict[str, Any]):
    """The suite's encoder stack for `harness.Workload(factory=FACTORY)`: (B, N, dim) -> (B, N, dim).
    Imported by file path in the probe's process, hence the absolute import."""
    from efficient_transformers.models.blocks import TransformerStack

    return TransformerStack(dim, depth, heads, attention=mechanism, attention_options=dict(attention_options),
                            causal=causal, ff_mult=ff_mult, dropout=0.0, max_seq_len=max_seq_len)


def measure_efficiency(mechanisms: list[str], lengths: list[int], model: dict[str, Any], batch: int,
                       budgets: dict[str, dict[str, Any]], *, quick: bool, progress: bool | None = None,
                       timeout_s: float | None = None) -> dict[str, Any]:
    """Per mechanism and length: {"status", "time_ms", "peak_mem_mb", "speedup", "mem_ratio"}; ratios
    are against vanilla at the same length (speed-up = vanilla time / time, memory = peak / vanilla's)."""
    import torch

    from ..bench import harness
    from ..bench.memory import ProbeServer
    from ..progress import progress_bar

    names = ["vanilla"] + [m for m in mechanisms if m != "vanilla"]
    plan = harness.TimingPlan(repeats=3 if quick else 10, min_rounds=3, budget_s=1.0 if quick else 5.0,
                              timeout_s=float(timeout_s or (60 if quick else 600)), sample_min_s=0.05)
    threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table: dict[str, dict[str, Any]] = {m: {} for m in names}
    bar = progress_bar(len(names) * len(lengths) * 2, "eft lra: efficiency", enabled=progress, unit="measurement")
    with ProbeServer(threads) as server:
        for n in lengths:
            works = {m: harness.Workload(
                mechanism=m, seq_len=n, mode="train", batch=batch, dim=model["dim"], heads=model["heads"],
                device=device, factory=FACTORY,
                options=dict(mechanism=m, depth=model["depth"], ff_mult=model["ff_mult"], max_seq_len=n,
                             attention_options=budgets.get(m, {}))) for m in names}
            for m, work in works.items():
                bar.set_description_str(f"eft lra: {m} N={n} memory probe")
                answer = server.measure(work.to_json(), plan.timeout_s)
                table[m][str(n)] = {"status": answer.get("status", "error"), "peak_mem_mb": answer.get("peak_mem_mb"),
                                    **({"error": answer.get("error")} if answer.get("status") != "ok" else {})}
                bar.update(1)
            steps = {}
            for m, work in works.items():
                if table[m][str(n)]["status"] == "ok":
                    steps[m] = harness.make_step(harness.build_layer(work), work)
            bar.set_description_str(f"eft lra: N={n} timing {len(steps)} mechanism(s)")
            timing = harness.time_interleaved(steps, plan, device)
            ref = timing.samples.get("vanilla")
            for m in names:
                cell = table[m][str(n)]
                if m in timing.failures:
                    cell["status"], cell["error"] = harness.classify_failure(timing.failures[m])
                if cell["status"] != "ok":
                    cell.pop("peak_mem_mb", None)
                    continue
                median = harness.median_of(timing.samples[m])
                cell["time_ms"] = None if median is None else median * 1e3
                ratio = harness.paired_ratio(timing.samples[m], ref) if ref is not None else None
                cell["speedup"] = 1.0 / ratio if ratio else None
                base = table["vanilla"][str(n)].get("peak_mem_mb")
                cell["mem_ratio"] = (cell["peak_mem_mb"] / base if cell["peak_mem_mb"] is not None and base else None)
            bar.update(len(names))
    bar.close()
    return {"mode": "train", "lengths": list(lengths), "table": table, "bench_config": {
        "what": "forward + backward of the suite's encoder stack (Text task model), each mechanism at its budget",
        "batch": batch, "dim": model["dim"], "depth": model["depth"], "heads": model["heads"],
        "ff_mult": model["ff_mult"], "dtype": "float32", "device": device, "threads": threads,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}}
