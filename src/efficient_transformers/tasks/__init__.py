"""Long-range tasks in the style of the Long Range Arena: offline generators and loaders for the
official released formats. Tasks only make and load data; they know nothing of models.

    from efficient_transformers.tasks import get_task, task_names
    task = get_task("listops")
    splits = task.datasets(seed=0, max_len=200, num_train=500)   # generated offline
    splits = task.datasets("/data/lra_release/listops-1000")     # the official files
    batch = task.collate([splits["train"][i] for i in range(8)])

Tasks (``task_names()``): listops, text, retrieval, image, pathfinder, byte_lm, max_of_set (sets of
continuous vectors, for the SetTransformer model); one module each.
"""

from .base import PAD_ID, Task, get_task, register_task, task_names

# Importing the task modules registers them; this order is the order of task_names().
from . import listops, text, retrieval, image, pathfinder, byte_lm, max_of_set  # noqa: E402,F401  isort: skip

__all__ = ["PAD_ID", "Task", "get_task", "register_task", "task_names"]
