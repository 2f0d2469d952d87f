"""The engine for structured pruning: embed the calibration set once, then hand a method the
decoder's block inputs and a way to run one block over them. Unlike quantization, a structured
method changes the widths between blocks, so it drives the block order itself (each block's
inputs are the previous block's pruned outputs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.calib.data import TokenSet
from compressor.models.adapters import Adapter
from compressor.pipeline.progress import Progress
from compressor.pipeline.sequential import capture_block_kwargs, capture_inputs


class BlockRunner:
    """Runs one block over every calibration sample in batches; the outputs stay on the CPU."""

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                 stop: type[BaseException] | None = None) -> torch.Tensor | None:
        """The block's outputs; with `stop`, a hook ends each pass early and nothing is returned."""
        block.to(self.device)
        outputs = []
        try:
            for start in range(0, hidden.shape[0], self.batch_size):
                x = hidden[start:start + self.batch_size].to(self.device)
                if stop is not None:
                    try:
                        block(x, **kwargs)
                    except stop:
                        pass
                    continue
                out = block(x, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outputs.append(out.to("cpu"))
        finally:
            block.to("cpu")
        return torch.cat(outputs) if outputs else None

    @torch.no_grad()
    def map(self, block: nn.Module, fn, *inputs: torch.Tensor) -> torch.Tensor | None:
        """fn(*batch) over aligned batches of `inputs` with the block on the compute device;
        concatenated tensor results on the CPU (None if fn returns nothing)."""
        block.to(self.device)
        outputs = []
        try:
            for start in range(0, inputs[0].shape[0], self.batch_size):
                out = fn(*(t[start:start + self.batch_size].to(self.device) for t in inputs))
                if out is not None:
                    outputs.append(out.to("cpu"))
        finally:
            block.to("cpu")
        return torch.cat(outputs) if outputs else None


@torch.no_grad()
def run_structured(model: nn.Module, adapter: Adapter, method, calibration: TokenSet, *, device: str = "cpu",
                   batch_size: int = 8, progress: Progress | None = None) -> dict:
    """Calibrate and apply a structured method in place; returns the method's spec of the result."""
    progress = progress or Progress()
    device = torch.device(device)
    ids = calibration.input_ids
    kwargs = capture_block_kwargs(model, adapter, ids, device)
    progress.log(f"embedding {ids.shape[0]} calibration samples of {ids.shape[1]} tokens")
    hidden = capture_inputs(model, adapter, ids, batch_size, device)
    return method.slice(model, adapter, hidden, kwargs, BlockRunner(batch_size, device), progress)
