"""Integer weight quantization primitives shared by the quantization methods."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.models.adapters import Adapter
from compressor.schemes import WeightScheme, dequantize

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_scheme(scheme: WeightScheme, model: nn.Module, adapter: Adapter) -> None:
    """A group size that divides every quantized linear's in-features.

    Policy: a group size that does not divide a layer's in-features is an error naming the
    layer and the group sizes that would work; we never quantize a ragged last group silently.
    """
    if scheme.per_channel:
        return
    for index, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.block_linears(block).items():
            if linear.in_features % scheme.group_size:
                ok = [g for g in (32, 64, 128, 256) if linear.in_features % g == 0]
                raise CompressorError(
                    f"group size {scheme.group_size} does not divide in_features {linear.in_features} "
                    f"of {adapter.block_prefix(model, index)}{name}",
                    f"use a group size that divides it ({', '.join(map(str, ok)) or 'none of 32..256'}) "
                    "or --group-size -1 for per-channel scales",
                )


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    out, cols = w.shape
    return w.reshape(out, scheme.groups(cols), -1)


def compute_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and integer zero point) per output row and group: [out, groups] each."""
    g = _grouped(w.float(), scheme)
    return qparams_from_range(g.amin(dim=-1), g.amax(dim=-1), scheme)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor,
                       scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer zero point) that map [lo, hi] (per row and group) onto the code range."""
    levels = (1 << scheme.bits) - 1
    zero = None
    if scheme.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = absmax / (levels / 2)
    else:
        lo = lo.clamp(max=0)
        hi = hi.clamp(min=0)
        scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(SCALE_DTYPES[scheme.scale_dtype])
    # A scale that underflows in its storage dtype would divide by zero later.
    tiny = torch.finfo(scale.dtype).tiny
    scale = torch.where(scale.float() > tiny, scale, torch.full_like(scale, 1.0))
    if not scheme.symmetric:
        zero = torch.round(-lo / scale.float()) + scheme.qmin
        zero = zero.clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: WeightScheme,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed integer codes [out, in] of w under per-group scale/zero (columns mapped by g_idx)."""
    if g_idx is None:
        g_idx = torch.arange(w.shape[1], device=w.device) // (w.shape[1] // scale.shape[1])
    s = scale.float()[:, g_idx]
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + zero.float()[:, g_idx]
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8)


def make_record(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """The record a format stores: w rounded to the grid of the given scales and zero points."""
    record = {"qweight": quantize_codes(w, scale, zero, scheme), "scale": scale}
    if zero is not None:
        record["zero_point"] = zero
    return record


def quantize_weight(w: torch.Tensor, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of one weight matrix with min-max scales."""
    return make_record(w, *compute_qparams(w, scheme), scheme)


def dequantize_record(record: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return dequantize(record["qweight"], record["scale"], record.get("zero_point"), record.get("g_idx"), dtype)
