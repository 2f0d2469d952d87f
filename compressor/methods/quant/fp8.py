"""FP8 (E4M3) weights with one scale per output channel, and FP8 input activations.

Weights: scale = max|W_row| / 448 (E4M3's largest finite value), codes = W / scale cast to
float8_e4m3fn (round to nearest even). Inputs: per-token scales computed at run time by default
(no calibration needed), or with `act_static` one scale per linear, max|X| / 448 over the
calibration set (the calibration abs-max statistics). With `gptq`, the weights are rounded to
the FP8 grid by GPTQ's error feedback instead of to nearest (needs the inputs' Hessians).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, BlockContext, Method, MethodConfig, Record
from compressor.methods.quant.gptq import inverse_hessian_cholesky, too_few_tokens
from compressor.methods.quant.quantizer import dequantize_record
from compressor.models.adapters import LinearGroup

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class FP8Config(MethodConfig):
    act_static: bool = Field(False, description="calibrated per-tensor input scales, or per-token at run time",
                             json_schema_extra={"flag": "--act-static/--act-dynamic"})
    gptq: bool = Field(False, description="round the weights with GPTQ error feedback (needs calibration)")
    damp: float = Field(0.01, gt=0, le=1.0, description="GPTQ: relative dampening of the Hessian")
    block_size: int = Field(128, ge=1, description="GPTQ: columns per lazy-update block")


@torch.no_grad()
def quantize_fp8_weight(w: torch.Tensor) -> Record:
    """E4M3 codes [out, in] and float32 scales [out, 1]."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"qweight": codes, "scale": scale}


def fp8_codes(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) rounded to E4M3, as float32."""
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


@torch.no_grad()
def gptq_fp8_weight(w: torch.Tensor, h: torch.Tensor, damp: float, block_size: int, name: str) -> Record:
    """E4M3 codes chosen column by column, each column's rounding error pushed onto the columns
    not yet rounded through the inverse Hessian of the inputs (the GPTQ update, Frantar et al.
    2022, on the FP8 grid). Scales stay those of round-to-nearest (row absmax / 448)."""
    scale = quantize_fp8_weight(w)["scale"]
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv, _ = inverse_hessian_cholesky(h, damp, name)
    hinv = hinv.float()
    codes = torch.zeros_like(w)
    s = scale[:, 0]
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = w_block[:, i]
            c = fp8_codes(col / s)
            codes[:, start + i] = c
            err = (col - c * s) / h_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
    return {"qweight": codes.to(torch.float8_e4m3fn), "scale": scale}


def static_input_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """One float32 scale [1] for a tensor whose largest magnitude is max(act_absmax)."""
    scale = act_absmax.float().max().reshape(1) / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@METHODS.register("fp8")
class FP8(Method):
    Config = FP8Config

    produces = "weights"

    def __init__(self, config: FP8Config):
        super().__init__(config)
        # Dynamic inputs need no calibration data; static scales come from the inputs' abs-max.
        self.kinds = ({"absmax"} if config.act_static else set()) | ({"hessian"} if config.gptq else set())
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def needs_calibration(self) -> bool:
        return bool(self.kinds)

    def on_block_start(self, ctx: BlockContext) -> None:
        # Input scales and Hessians of the block as it enters, all groups in one pass.
        self.stats = ctx.block_stats(self.kinds) if self.kinds else {}

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        stats = self.stats.get(group.name, {})
        gptq = self.config.gptq and not too_few_tokens(ctx, group, linears, stats)
        records = {}
        for name, linear in linears.items():
            if gptq:
                record = gptq_fp8_weight(linear.weight.data, stats["hessian"], self.config.damp,
                                         self.config.block_size, name)
            else:
                record = quantize_fp8_weight(linear.weight.data)
            linear.weight.data = dequantize_record(record, linear.weight.dtype)
            if self.config.act_static:
                record["input_scale"] = static_input_scale(stats["absmax"])
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "fp8", "act_dynamic": not self.config.act_static}
