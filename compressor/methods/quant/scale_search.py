"""Per-input-channel scale search for weight quantization (AWQ, SmoothQuant+).

Scaling a linear's input channels by 1/s and its weight columns by s leaves its output
unchanged, but changes what rounding does: salient channels (large activations) get finer
steps. The scale is folded into whatever produces the input: the norm in front of the group,
or a linear whose output rows are the group's input channels (up_proj for down_proj).
Candidates come from a one-parameter family s(α); each is judged by replaying the recorded
module (or block) with the group's weights quantized-then-unscaled, and the best α wins.
α = 0 gives s = 1, plain quantization, so the search never does worse on its own data.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compressor.methods.base import Replay
from compressor.models.adapters import LinearGroup

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # weight -> its quantized-dequantized copy


def alpha_grid(points: int) -> list[float]:
    return [i / points for i in range(points)]


def awq_scales(alpha: float, act_mean: torch.Tensor, weights: list[torch.Tensor], duo: bool) -> torch.Tensor:
    """AWQ: s = mean|x|^α, or with `duo` mean|x|^α / mean|ŵ|^(1−α) (ŵ: rows normalised to max 1)."""
    s = act_mean.float().clamp(min=1e-4).pow(alpha)
    if duo:
        w = torch.cat(weights).float().abs()
        w_mean = (w / w.amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(dim=0)
        s = s / w_mean.clamp(min=1e-4).pow(1 - alpha)
    return _normalised(s)


def smoothquant_scales(alpha: float, act_max: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """SmoothQuant: s = max|x|^α / max|w|^(1−α) per input channel."""
    w_max = torch.cat(weights).float().abs().amax(dim=0).clamp(min=1e-5)
    return _normalised(act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha))


def _normalised(s: torch.Tensor) -> torch.Tensor:
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


class ScaledTrial:
    """Temporarily replace each linear's weight by quantize(W·s)/s; restore on exit."""

    def __init__(self, linears: dict[str, nn.Linear], quantize: Quantizer):
        self.linears = linears
        self.quantize = quantize
        self.originals = {n: l.weight.data for n, l in linears.items()}

    def set(self, s: torch.Tensor) -> None:
        for name, linear in self.linears.items():
            w = self.originals[name]
            scale = s.to(w.device, torch.float32)
            linear.weight.data = (self.quantize(w.float() * scale) / scale).to(w.dtype)

    def restore(self) -> None:
        for name, linear in self.linears.items():
            linear.weight.data = self.originals[name]


def search(trials: list[tuple[ScaledTrial, Callable[[float], torch.Tensor]]], replay: Replay,
           grid: list[float]) -> tuple[float, list[torch.Tensor], list[float]]:
    """The α (shared by all trials) whose scales minimise the replay error; its scales and all errors."""
    errors = []
    try:
        for alpha in grid:
            for trial, scales in trials:
                trial.set(scales(alpha))
            errors.append(replay.error())
    finally:
        for trial, _ in trials:
            trial.restore()
    best = min(range(len(grid)), key=errors.__getitem__)
    return grid[best], [scales(grid[best]) for _, scales in trials], errors


@torch.no_grad()
def fold(block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear], s: torch.Tensor,
         norm_offset: float) -> None:
    """Apply scale s for good: the group's weight columns ×s, the producer of its input ÷s."""
    if group.norm is not None:
        norm = block.get_submodule(group.norm)
        w = norm.weight.data.float()
        norm.weight.data = ((w + norm_offset) / s.to(w.device) - norm_offset).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.data.float() / s.to(w.device)).to(norm.bias.dtype)
    elif group.source is not None:
        source = block.get_submodule(group.source)
        source.weight.data = (source.weight.data.float() / s.to(source.weight.device)[:, None]).to(source.weight.dtype)
        if source.bias is not None:
            source.bias.data = (source.bias.data.float() / s.to(source.bias.device)).to(source.bias.dtype)
    else:
        raise ValueError(f"group {group.name} has no norm or source linear to fold a scale into")
    for linear in linears.values():
        linear.weight.data = (linear.weight.data.float() * s.to(linear.weight.device)).to(linear.weight.dtype)


def scalable(group: LinearGroup) -> bool:
    return group.norm is not None or group.source is not None
