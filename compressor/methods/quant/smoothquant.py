"""SmoothQuant W8A8 (Xiao et al., 2023): migrate activation outliers into the weights, then
quantize weights to int8 per output channel and inputs to int8 per token at run time.

Written from the paper. For a linear group fed by a norm (q/k/v after the input norm, gate/up
after the MLP's pre-norm), each input channel j gets a smoothing factor

    s_j = max|X_j|^α / max_k |W_kj|^(1−α)

from the calibration abs-max of the group's input and the largest weight of that column over
the group's linears. The norm's output is divided by s (its weight w becomes w/s, or for a
(1 + w) RMSNorm such as Gemma's, (1 + w)/s − 1) and the linears' columns are multiplied by s,
so the float model computes the same function while the activations become easier to quantize.
Linears without a norm in front (o_proj, down_proj) are quantized unsmoothed. The smoothing is
its own method; `w8a8` quantizes after it (with `gptq`, rounding the int8 weights by GPTQ against
the Hessian of the smoothed inputs, true-sequentially, instead of to nearest).

α = 0 leaves the activations alone (s from the weights only), α = 1 moves all of the range into
the weights. Channels whose activation or weight maximum is zero keep s = 1.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, BlockContext, Method, MethodConfig, Record
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize, too_few_tokens
from compressor.methods.quant.quantizer import dequantize_record, quantize_weight
from compressor.models.adapters import LinearGroup
from compressor.schemes import WeightScheme

# Weights: symmetric int8 with one float32 scale per output channel.
INT8_PER_CHANNEL = WeightScheme(8, -1, True, "float32")


class SmoothQuantConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength, 0..1")


class Int8Config(MethodConfig):
    gptq: bool = Field(False, description="round the int8 weights with GPTQ instead of to nearest")
    damp: float = Field(0.01, gt=0, le=1.0, description="GPTQ: relative dampening of the Hessian")


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel factors s = max|X|^α / max|W|^(1−α) (float32; 1 where either max is 0)."""
    a = act_absmax.float()
    w = torch.stack([x.float().abs().amax(dim=0) for x in weights]).amax(dim=0)
    s = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, offset: float) -> None:
    """Divide the norm's output by `scales` and multiply the linears' input columns by them.

    `offset` is the norm's weight offset: 0 for w·x̂ norms (Llama), 1 for (1 + w)·x̂ (Gemma)."""
    weight = norm.weight.data
    norm.weight.data = ((weight.float() + offset) / scales - offset).to(weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.float() / scales).to(norm.bias.dtype)
    for linear in linears:
        w = linear.weight.data
        linear.weight.data = (w.float() * scales).to(w.dtype)


@METHODS.register("smoothquant")
class SmoothQuant(Method):
    """The smoothing: fold s into each norm-fed group, from the block's input abs-max."""

    Config = SmoothQuantConfig
    needs_calibration = True
    default_quantizer = "w8a8"

    def on_block_start(self, ctx: BlockContext) -> None:
        stats = ctx.block_stats({"absmax"})  # every group of the unmodified block, in one pass
        linears = ctx.linears()
        for group in ctx.groups:
            if group.norm is None:
                continue
            mods = [linears[n] for n in group.linears]
            scales = smoothing_scales(stats[group.name]["absmax"], [m.weight.data for m in mods], self.config.alpha)
            fold_smoothing(ctx.block.get_submodule(group.norm), mods, scales.to(mods[0].weight.device),
                           ctx.adapter.norm_weight_offset)


@METHODS.register("w8a8")
class Int8WeightsInt8Inputs(Method):
    """int8 weights, one float32 scale per output channel; int8 inputs per token at run time."""

    Config = Int8Config
    produces = "weights"

    @property
    def needs_calibration(self) -> bool:
        return self.config.gptq

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        records = {}
        stats = ctx.group_stats(group, {"hessian"}) if self.config.gptq else {}
        gptq = self.config.gptq and not too_few_tokens(ctx, group, linears, stats)
        for name, linear in linears.items():
            if gptq:
                settings = GPTQConfig(bits=8, group_size=-1, sym=True, scale_dtype="float32", damp=self.config.damp)
                record, _ = gptq_quantize(linear.weight.data, stats["hessian"], settings, name)
            else:
                record = quantize_weight(linear.weight.data, INT8_PER_CHANNEL)
            linear.weight.data = dequantize_record(record, linear.weight.dtype)
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "w8a8-int", "act_dynamic": True}
