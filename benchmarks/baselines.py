"""Calibration-free baselines that our artifact format cannot hold, built as dense checkpoints.

HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models") as its
authors run it: per group, the min-max scale is kept and a float zero point is refined by
half-quadratic splitting of an lp error (p < 1); scale and zero are stored in float16, so 4-bit
codes in groups of 64 cost 4 + 32/64 = 4.5 bits per weight. compressed-tensors' packed format
stores integer zero points, which is why our `hqq` method refines the scale instead; this
baseline is the published algorithm, to compare against at its own (higher) bits. Its weights are
quantized and dequantized, then saved in the checkpoint's dtype, so any loader evaluates them.
Written from the paper's algorithm, not from its code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SCALE_BITS = 16  # float16 scale and float16 zero point per group


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of |x|^p at penalty beta."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq_float_zero(w: torch.Tensor, bits: int = 4, group_size: int = 64, iters: int = 20, lp: float = 0.7,
                   beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """w [out, in] quantized and dequantized: codes 0..2^bits−1 per group of `group_size` inputs,
    min-max float16 scale, float16 zero point refined while the mean absolute error falls."""
    out, cols = w.shape
    g = w.float().reshape(out, cols // group_size, group_size)
    top = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    inverse = (top / (hi - lo).clamp_min(1e-8)).half().float()  # codes per unit of weight
    zero = (-lo * inverse).half().float()

    def dequantized(zero: torch.Tensor) -> torch.Tensor:
        return (torch.round(g * inverse + zero).clamp(0, top) - zero) / inverse

    best = dequantized(zero)
    best_error = (g - best).abs().mean()
    for _ in range(iters):
        codes = torch.round(g * inverse + zero).clamp(0, top)
        error = _shrink(g - (codes - zero) / inverse, beta, lp)
        zero = (codes - (g - error) * inverse).mean(-1, keepdim=True).half().float()
        beta *= kappa
        candidate = dequantized(zero)
        candidate_error = (g - candidate).abs().mean()
        if candidate_error >= best_error:
            break
        best, best_error = candidate, candidate_error
    return best.reshape(out, cols).to(w.dtype)


def build_hqq_float(model: str, out: Path, bits: int = 4, group_size: int = 64, device: str = "cpu") -> dict:
    """A dense checkpoint of `model` with every decoder linear HQQ-quantized (not the embedding or
    head, as our methods); returns its bits per quantized weight."""
    from compressor import api

    loaded = api.load(model)
    for name, module in loaded.model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            module.weight.data = hqq_float_zero(module.weight.data.to(device), bits, group_size).cpu()
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    return {"bits_per_weight": bits + 2 * SCALE_BITS / group_size}


BASELINES = {"hqq-float-w4": ("hqq (float zero, fake-quantized)", {"bits": 4, "group_size": 64}, build_hqq_float)}
