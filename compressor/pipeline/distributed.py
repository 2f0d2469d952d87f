"""Data-parallel calibration: each process embeds and propagates its own shard of the
calibration samples; statistics are summed (or maxed) across processes before a method sees
them, so every process quantizes identically and one artifact comes out. Launch with
`torchrun --nproc-per-node N -m compressor quantize ...` (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compressor.errors import CompressorError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    reduce_device: str = "cpu"  # where tensors must be for the backend's collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "World":
        """The process group torchrun describes in the environment; one process without it."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        nccl = device.startswith("cuda")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if nccl else "gloo")
        rank = dist.get_rank()
        return cls(rank, dist.get_world_size(), f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if nccl else "cpu")

    def device(self, device: str) -> str:
        """Each process of a multi-GPU run computes on its own GPU."""
        if self.size > 1 and device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
        return device

    def shard(self, samples: int, batch_size: int) -> slice:
        """This process's samples: a contiguous run of whole batches, so every batch is computed
        exactly as a single process computes it."""
        batches = -(-samples // batch_size)
        if batches < self.size:
            raise CompressorError(
                f"{samples} calibration samples make {batches} batches of {batch_size}, fewer than the "
                f"{self.size} processes", "use more --samples, a smaller --batch-size or fewer processes")
        first = self.rank * batches // self.size
        last = (self.rank + 1) * batches // self.size
        return slice(first * batch_size, min(last * batch_size, samples))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def merge(self, collectors: dict) -> None:
        """Combine every process's statistics ({group: {kind: Collector}}) in place."""
        if self.size > 1:
            for per_kind in collectors.values():
                for collector in per_kind.values():
                    collector.merge(self.all_reduce, self.reduce_device)

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64, device=self.reduce_device)).item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()
