"""SmoothQuant W8A8 (Xiao et al., 2023): migrate activation outliers into the weights, then
quantize weights to int8 per output channel and inputs to int8 per token at run time.

Written from the paper. For a linear group fed by a norm (q/k/v after the input norm, gate/up
after the MLP's pre-norm), each input channel j gets a smoothing factor

    s_j = max|X_j|^α / max_k |W_kj|^(1−α)

from the calibration abs-max of the group's input and the largest weight of that column over
the group's linears. The norm's output is divided by s (its weight w becomes w/s, or for a
(1 + w) RMSNorm such as Gemma's, (1 + w)/s − 1) and the linears' columns are multiplied by s,
so the float model computes the same function while the activations become easier to quantize.
Linears without a norm in front (o_proj, down_proj) are quantized unsmoothed. With `gptq`, the
int8 weights are rounded by GPTQ against the Hessian of the smoothed inputs instead of to nearest.

α = 0 leaves the activations alone (s from the weights only), α = 1 moves all of the range into
the weights. Channels whose activation or weight maximum is zero keep s = 1.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, Method, MethodConfig, Record
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize
from compressor.methods.quant.quantizer import dequantize_record, quantize_weight
from compressor.models.adapters import Adapter, LinearGroup
from compressor.schemes import WeightScheme

# Weights: symmetric int8 with one float32 scale per output channel.
INT8_PER_CHANNEL = WeightScheme(8, -1, True, "float32")


class SmoothQuantConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength, 0..1")
    gptq: bool = Field(False, description="round the int8 weights with GPTQ instead of to nearest")
    damp: float = Field(0.01, gt=0, le=1.0, description="GPTQ: relative dampening of the Hessian")


@torch.no_grad()
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
    name = "smoothquant"
    Config = SmoothQuantConfig
    needs = frozenset({"absmax"})

    def __init__(self, config: SmoothQuantConfig):
        super().__init__(config)
        self.norm_offset: float | None = None
        if config.gptq:
            self.needs = frozenset({"absmax", "hessian"})

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        self.norm_offset = adapter.norm_weight_offset

    def apply_group(
        self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear],
        stats: dict[str, torch.Tensor],
    ) -> dict[str, Record]:
        if group.norm is not None:
            if self.norm_offset is None:
                raise RuntimeError("SmoothQuant.check(model, adapter) must run before apply_group")
            mods = list(linears.values())
            scales = smoothing_scales(stats["absmax"], [m.weight.data for m in mods], self.config.alpha)
            scales = scales.to(mods[0].weight.device)
            fold_smoothing(block.get_submodule(group.norm), mods, scales, self.norm_offset)
            if "hessian" in stats:  # the Hessian of the smoothed inputs X / s
                stats = {**stats, "hessian": stats["hessian"] / scales[:, None] / scales[None, :]}
        records = {}
        for name, linear in linears.items():
            if self.config.gptq:
                settings = GPTQConfig(bits=8, group_size=-1, sym=True, scale_dtype="float32", damp=self.config.damp)
                record, _ = gptq_quantize(linear.weight.data, stats["hessian"], settings, name)
            else:
                record = quantize_weight(linear.weight.data, INT8_PER_CHANNEL)
            linear.weight.data = dequantize_record(record, linear.weight.dtype)
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "w8a8-int", "act_dynamic": True}
