"""Training and evaluation on the long-range tasks (DESIGN.md section 5).

    config.py       TrainConfig: every hyperparameter of a run, validated, saved with checkpoints
    trainer.py      Trainer: the loop (AdamW, warm-up + decay, clipping, accumulation, bf16 / fp16, evaluation,
                    best-checkpoint selection, test of the best weights, exact resume, data parallel)
    checkpoint.py   safetensors + JSON checkpoints, atomic writes, journaled commits (never pickle)
    sampling.py     the deterministic data order and its sharding over processes
    objective.py    model and loss for classification, retrieval and language modelling
    optim.py        AdamW and the learning-rate schedule
    distributed.py  torchrun / DDP environment
    progress.py     progress bar and the metrics JSONL log
    command.py      `eft train`
    distill.py      `eft distill`: knowledge distillation (the trainer with a teacher, `objective.Distillation`)
    evaluate.py     `eft eval RUN_DIR [--int8]`: a run's test split, model size and CPU latency, float32 / int8
    transfer.py     using finished runs: teachers, --init-from bases (with adapters), DistilBERT initialisation
    lra.py          `eft lra`, the long-range suite
    search.py       `eft search`, hardware-aware architecture search with Optuna (search_report.py: its
                    Pareto front and outputs; search_stack.py: the measured unit, the model's stack)
"""

from .config import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
