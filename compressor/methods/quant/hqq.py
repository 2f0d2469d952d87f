"""HQQ-style weight quantization (Badri & Shaji, 2023, "Half-Quadratic Quantization"):
calibration-free, each group's scale (and integer zero point) refined to minimise an lp error
(p < 1) of the dequantized weights, which tolerates a few large errors in exchange for many small
ones, instead of the min-max range of RTN.

Written from the paper's half-quadratic splitting: with W_e the error variable,

    W_e  <- shrink_p(W - dequant(q), beta)              (generalised soft-thresholding)
    q    <- round(W / s) + z  (clamped to the code range)
    s    <- <q - z, W - W_e> / <q - z, q - z>            per group (least squares given the codes)
    z    <- round(mean(q - (W - W_e) / s))               asymmetric only, kept an integer
    beta <- beta * kappa

HQQ proper refines a float zero point at a fixed scale; the compressed-tensors layout we write
keeps scales in float16 and zero points as integers, so the scale is what moves here and the zero
point stays on the integer grid. Iteration stops early when the lp error stops falling.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, BlockContext, Method, Record
from compressor.methods.quant.quantizer import (SCALE_DTYPES, check_scheme, compute_qparams, dequantize_record,
                                                make_record)
from compressor.methods.quant.rtn import WeightQuantConfig
from compressor.models.adapters import Adapter, LinearGroup
from compressor.schemes import WeightScheme


class HQQConfig(WeightQuantConfig):
    iters: int = Field(20, ge=1, le=1000, description="HQQ: half-quadratic iterations per weight")
    lp: float = Field(0.7, gt=0, le=1, description="HQQ: p of the lp error it minimises (p < 1 tolerates outliers)")
    beta: float = Field(10.0, gt=0, description="HQQ: initial penalty of the splitting")
    kappa: float = Field(1.01, gt=1, description="HQQ: growth of the penalty per iteration")


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of |x|^p at penalty beta."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - (1.0 / beta) * magnitude.clamp_min(1e-8).pow(p - 1))


@torch.no_grad()
def hqq_qparams(w: torch.Tensor, scheme: WeightScheme, config: HQQConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refined scale [out, groups] (in its storage dtype) and integer zero point (or None)."""
    out, cols = w.shape
    groups = scheme.groups(cols)
    g = w.float().reshape(out, groups, -1)
    scale, zero = compute_qparams(w, scheme)
    s = scale.float()[..., None]
    z = zero.float()[..., None] if zero is not None else torch.zeros_like(s)
    beta, best, best_params = config.beta, None, (scale, zero)
    for _ in range(config.iters):
        q = (torch.round(g / s) + z).clamp(scheme.qmin, scheme.qmax)
        w_e = _shrink(g - s * (q - z), beta, config.lp)
        target = g - w_e
        centred = q - z
        denom = centred.pow(2).sum(-1, keepdim=True)
        s_new = (centred * target).sum(-1, keepdim=True) / denom.clamp_min(1e-12)
        s = torch.where((denom > 0) & (s_new > 0), s_new, s)
        if zero is not None:
            z = torch.round((q - target / s).mean(-1, keepdim=True)).clamp(scheme.qmin, scheme.qmax)
        stored = s.squeeze(-1).to(SCALE_DTYPES[scheme.scale_dtype])
        tiny = torch.finfo(stored.dtype).tiny
        stored = torch.where(stored.float() > tiny, stored, torch.ones_like(stored))
        s = stored.float()[..., None]
        q = (torch.round(g / s) + z).clamp(scheme.qmin, scheme.qmax)
        error = (g - s * (q - z)).abs().pow(config.lp).sum().item()
        if best is not None and error >= best:
            break
        best = error
        best_params = (stored, z.squeeze(-1).to(torch.int8) if zero is not None else None)
        beta *= config.kappa
    return best_params


@METHODS.register("hqq")
class HQQ(Method):
    name = "hqq"
    Config = HQQConfig
    produces = "weights"

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        scheme = self.config.scheme()
        records = {}
        for name, linear in linears.items():
            w = linear.weight.data
            record = make_record(w, *hqq_qparams(w, scheme, self.config), scheme)
            linear.weight.data = dequantize_record(record, w.dtype)
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "weight-int", "scheme": self.config.scheme()}
