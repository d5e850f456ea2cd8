"""Data parallel helpers: one process per device, launched by `torchrun`.

    torchrun --nproc_per_node 2 -m efficient_transformers train --task listops --attention vanilla ...

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed` reads them and joins the process
group (NCCL on CUDA, gloo on CPU). Without them the run is a single process and every collective below
is the identity, so the trainer has one code path. Only rank 0 writes files (`DistEnv.is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of `values` over processes (float64 on the wire, so sums of counts stay exact)."""
        if not self.distributed:
            return values
        buf = values.to(self.device, torch.float64)  # gloo and NCCL both reduce float64
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(values.device, values.dtype)

    def all_gather_bytes(self, data: torch.Tensor) -> list[torch.Tensor]:
        """Every process's 1-D uint8 tensor (all of equal length), in rank order."""
        if not self.distributed:
            return [data]
        buf = data.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return [t.cpu() for t in out]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when available else CPU; "cuda" in a multi-process run -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; allowed here: cpu, auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    return device


def init_distributed(device_name: str = "auto") -> DistEnv:
    """Join the `torchrun` process group when launched by it; otherwise a single-process environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
