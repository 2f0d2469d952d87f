"""Lazy checkpoints: the model's skeleton on the meta device, its decoder blocks read from the
safetensors files one at a time when the engine reaches them.

Host memory then holds what is outside the blocks (embedding, final norm, head) and one or two
blocks, whatever the model's size. Blocks are read with plain reads (no file pages stay mapped
beside the copies) into pinned memory when the target is a GPU, so the copy to the device runs
asynchronously, and the next block can be read in a background thread while one is computed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.safetensors_file import TensorEntry, read_header, read_into, torch_dtype


class LazyWeights:
    """Where every tensor of a checkpoint lives, and the reads that materialise a block."""

    def __init__(self, files: list[Path], dtype: torch.dtype):
        self.dtype = dtype
        self.entries: dict[str, tuple[Path, TensorEntry]] = {}
        for f in files:
            entries, _ = read_header(f)
            for name, entry in entries.items():
                self.entries[name] = (f, entry)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.entries if n.startswith(prefix))

    def read(self, names: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
        """The named tensors as stored (their own dtype), in fresh (optionally pinned) memory."""
        out = {}
        for name in names:
            path, entry = self.entries[name]
            out[name] = read_into(path, entry, pin=pin)
        return out

    def finite(self, name: str, chunk: int = 1 << 26) -> bool:
        """Whether a stored floating-point tensor holds no NaN or Inf, read in chunks of `chunk`
        bytes into one buffer (memory stays at the chunk, whatever the tensor's size)."""
        path, entry = self.entries[name]
        dtype = torch_dtype(entry.dtype)
        if not dtype.is_floating_point:
            return True
        size = torch.empty(0, dtype=dtype).element_size()
        buffer = torch.empty(max(chunk // size, 1), dtype=dtype)
        raw = memoryview(buffer.view(torch.uint8).numpy())
        with open(path, "rb") as f:
            f.seek(entry.start)
            left = entry.end - entry.start
            while left > 0:
                n = min(len(raw), left)
                if f.readinto(raw[:n]) != n:
                    raise CompressorError(f"{path} is truncated inside tensor {name!r}", "re-create the file")
                if not torch.isfinite(buffer[:n // size]).all():
                    return False
                left -= n
        return True

    def prefetch(self, prefix: str, pin: bool) -> None:
        """Start reading a block's tensors in the background (one reader thread)."""
        if prefix in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending[prefix] = self._pool.submit(self.read, self.names(prefix), pin)

    def take(self, prefix: str, pin: bool) -> dict[str, torch.Tensor]:
        """A block's tensors (names relative to the block), prefetched or read now."""
        future = self._pending.pop(prefix, None)
        tensors = future.result() if future is not None else self.read(self.names(prefix), pin)
        return {name[len(prefix):]: t for name, t in tensors.items()}

    def materialize(self, block: nn.Module, prefix: str, device: torch.device) -> None:
        """Give a meta-device block its weights from the checkpoint, on `device` in the compute dtype."""
        pin = device.type == "cuda"
        stored = self.take(prefix, pin)
        state = {name: (t.to(device, non_blocking=pin).to(self.dtype) if t.is_floating_point() else t.to(device))
                 for name, t in stored.items()}
        wanted = set(block.state_dict())
        if set(state) != wanted:
            missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
            raise CompressorError(f"the checkpoint's tensors for {prefix} do not match its config "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})",
                                  "the checkpoint is damaged or was written for another architecture")
        block.load_state_dict(state, strict=True, assign=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def release(block: nn.Module) -> None:
    """Drop a block's weights (back to the meta device): its memory is freed once nothing else holds it."""
    block.to("meta")
