"""What the engine spends: where the calibration activations live (the compute device when they
fit, the host otherwise, refused with the size they need when neither holds them), how large a
forward batch fills a GPU, and how long each phase of a block took."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from compressor.errors import CompressorError
from compressor.util import human_bytes

# Share of the device's free memory the activations may take (the rest: the block, its
# Hessians, the GPTQ solve and the forward passes' temporaries).
DEVICE_SHARE = 0.6
HOST_SHARE = 0.8
# Tokens per forward batch on a GPU: enough to keep the tensor cores busy on 1B–70B blocks.
GPU_BATCH_TOKENS = 65536
# "host" or "device": override the automatic choice (for hosts whose available memory grows as it
# is used, like ballooned VMs, where MemAvailable understates what the run can have).
FORCE_ENV = "COMPRESSOR_ACTIVATIONS"


def activation_bytes(tokens: int, hidden: int, widest: int, element_bytes: int, float_path: bool) -> int:
    """Peak bytes of calibration activations while a block is processed: its inputs, its
    outputs, and the cached inputs of the attention output and MLP down projections (widest
    linear input); the float model's path (when a method tracks it) doubles the lot."""
    per_token = (3 * hidden + widest) * element_bytes
    return tokens * per_token * (2 if float_path else 1)


def host_available() -> int:
    """Bytes the host can still give (MemAvailable), or a very large number where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def plan_activations(need: int, device: torch.device, device_free: int | None = None,
                     host_free: int | None = None) -> tuple[torch.device, str]:
    """(where the activations live, a phrase for the progress line). On a GPU they stay there
    when they fit (no copies per batch); otherwise they are offloaded to the host, and when the
    host cannot hold them either the run is refused before any work, with the size needed."""
    cpu = torch.device("cpu")
    force = os.environ.get(FORCE_ENV, "")
    host_free = host_available() if host_free is None else host_free
    if device.type == "cuda":
        if device_free is None:
            device_free = torch.cuda.mem_get_info(device)[0]
        if force != "host" and (need <= DEVICE_SHARE * device_free or force == "device"):
            return device, f"activations on {device} ({human_bytes(need)})"
        if need <= HOST_SHARE * host_free or force == "host":  # forced: the user vouches for the host
            return cpu, (f"activations offloaded to host memory ({human_bytes(need)}; {human_bytes(device_free)} "
                         f"free on {device})")
        raise CompressorError(
            f"the calibration activations need {human_bytes(need)}: more than {device} has free "
            f"({human_bytes(device_free)}) and than the host has available ({human_bytes(host_free)})",
            "lower --samples or --seq-len")
    if need > HOST_SHARE * host_free:
        raise CompressorError(
            f"the calibration activations need {human_bytes(need)}; the host has {human_bytes(host_free)} available",
            "lower --samples or --seq-len")
    return cpu, f"activations in host memory ({human_bytes(need)})"


def device_batch(batch_size: int, seq_len: int, device: torch.device) -> int:
    """Samples per forward pass: as asked on the CPU; on a GPU at least GPU_BATCH_TOKENS tokens
    (statistics are float64 sums, so the batching does not change them beyond rounding)."""
    if device.type != "cuda":
        return batch_size
    return max(batch_size, GPU_BATCH_TOKENS // max(seq_len, 1))


class PhaseClock:
    """Seconds per named phase, device work included (synchronized at each boundary)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - started

    def take(self) -> dict[str, float]:
        """The totals since the last call, then reset."""
        out = dict(self.totals)
        self.totals.clear()
        return out


class HostCopier:
    """Device tensors copied to pinned host memory on a side stream, so the copies overlap the next
    block's compute instead of queueing behind it on the compute stream as pageable copies do.
    Whoever reads the host copies first waits on the returned event. On the CPU: the tensors as they are."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.device = device

    def __call__(self, tree: Any) -> tuple[Any, torch.cuda.Event | None]:
        if self.stream is None:
            return tree, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copied = self._map(tree)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return copied, ready

    @contextmanager
    def side(self) -> Iterator[None]:
        """Copies made in this block (by this thread) go on the side stream, after what was queued
        when the last copies were taken: a large pageable copy then no longer stalls the compute."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def _map(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._map(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._map(v) for v in value)
        if not isinstance(value, torch.Tensor) or not value.is_cuda:
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        value.record_stream(self.stream)  # its memory is not reused before the copy is done
        return host
