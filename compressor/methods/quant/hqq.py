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

from compressor.methods.base import METHODS
from compressor.methods.quant.quantizer import SCALE_DTYPES, compute_qparams
from compressor.methods.quant.rtn import RTN, WeightQuantConfig
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
    """Refined scale [out, groups] (in its storage dtype) and integer zero point (or None).

    The splitting runs on the weights in units of their min-max scale (as HQQ runs in the
    quantized domain, where beta's threshold means the same for every layer); each group keeps
    the iterate with its lowest lp error, so no group ends worse than min-max rounding.
    """
    out, cols = w.shape
    storage = SCALE_DTYPES[scheme.scale_dtype]
    g = w.float().reshape(out, scheme.groups(cols), -1)
    scale, zero = compute_qparams(w, scheme)
    s0 = scale.float()[..., None]
    normalized = g / s0
    z = zero.float()[..., None] if zero is not None else torch.zeros_like(s0)

    def lp_error(relative: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = (torch.round(normalized / relative) + z).clamp(scheme.qmin, scheme.qmax)
        return (normalized - relative * (q - z)).abs().pow(config.lp).sum(-1, keepdim=True)

    relative = torch.ones_like(s0)
    best_error, best_scale, best_zero = lp_error(relative, z), scale.float()[..., None], z
    beta = config.beta
    for _ in range(config.iters):
        q = (torch.round(normalized / relative) + z).clamp(scheme.qmin, scheme.qmax)
        target = normalized - _shrink(normalized - relative * (q - z), beta, config.lp)
        centred = q - z
        denom = centred.pow(2).sum(-1, keepdim=True)
        fitted = (centred * target).sum(-1, keepdim=True) / denom.clamp_min(1e-12)
        relative = torch.where((denom > 0) & (fitted > 0), fitted, relative)
        if zero is not None:
            z = torch.round((q - target / relative).mean(-1, keepdim=True)).clamp(scheme.qmin, scheme.qmax)
        stored = (relative * s0).to(storage)
        stored = torch.where(stored.float() > torch.finfo(storage).tiny, stored, torch.ones_like(stored))
        relative = stored.float() / s0  # what the stored scale really is
        error = lp_error(relative, z)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, stored.float(), best_scale)
        best_zero = torch.where(better, z, best_zero)
        beta *= config.kappa
    return (best_scale.squeeze(-1).to(storage),
            best_zero.squeeze(-1).to(torch.int8) if zero is not None else None)


@METHODS.register("hqq")
class HQQ(RTN):
    """RTN's rounding on scales refined by half-quadratic splitting (no calibration data)."""

    Config = HQQConfig

    def qparams(self, w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
        return hqq_qparams(w, scheme, self.config)
