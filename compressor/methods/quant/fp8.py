"""FP8 (E4M3) weights with one scale per output channel, and FP8 input activations.

Weights: scale = max|W_row| / 448 (E4M3's largest finite value), codes = W / scale cast to
float8_e4m3fn (round to nearest even). Inputs: per-token scales computed at run time by default
(no calibration needed), or with `act_static` one scale per linear, max|X| / 448 over the
calibration set (the calibration abs-max statistics).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, Method, MethodConfig, Record
from compressor.methods.quant.quantizer import dequantize_record
from compressor.models.adapters import LinearGroup

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class FP8Config(MethodConfig):
    act_static: bool = Field(False, description="calibrated per-tensor input scales instead of per-token ones")


@torch.no_grad()
def quantize_fp8_weight(w: torch.Tensor) -> Record:
    """E4M3 codes [out, in] and float32 scales [out, 1]."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"qweight": codes, "scale": scale}


def static_input_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """One float32 scale [1] for a tensor whose largest magnitude is max(act_absmax)."""
    scale = act_absmax.float().max().reshape(1) / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@METHODS.register("fp8")
class FP8(Method):
    name = "fp8"
    Config = FP8Config

    def __init__(self, config: FP8Config):
        super().__init__(config)
        # Dynamic inputs need no calibration data; static scales come from the inputs' abs-max.
        self.needs = frozenset({"absmax"}) if config.act_static else frozenset()

    def apply_group(
        self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear],
        stats: dict[str, torch.Tensor],
    ) -> dict[str, Record]:
        records = {}
        for name, linear in linears.items():
            record = quantize_fp8_weight(linear.weight.data)
            linear.weight.data = dequantize_record(record, linear.weight.dtype)
            if self.config.act_static:
                record["input_scale"] = static_input_scale(stats["absmax"])
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "fp8", "act_dynamic": not self.config.act_static}
