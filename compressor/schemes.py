"""The shared vocabulary of quantized weights: a scheme and the dequantization rule.

Methods produce integer codes under a scheme; formats store and restore them. Both import
this leaf module, so neither needs to know the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight quantization: codes are signed, in [-2^(bits-1), 2^(bits-1) - 1].

    group_size <= 0 means one scale per output channel. Asymmetric schemes carry an
    integer zero point in the same signed range (the compressed-tensors convention):
    w ≈ (q - zero_point) * scale.
    """

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: str = "float16"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def per_channel(self) -> bool:
        return self.group_size <= 0

    def groups(self, in_features: int) -> int:
        return 1 if self.per_channel else in_features // self.group_size

    def to_dict(self) -> dict:
        return asdict(self)


def group_index(in_features: int, scheme: WeightScheme) -> torch.Tensor:
    """Default column → group map (no act-order): consecutive runs of group_size columns."""
    if scheme.per_channel:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // scheme.group_size


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
    g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w = (q - zero_point[:, g]) * scale[:, g] for codes [out, in] and per-group scale [out, groups]."""
    if g_idx is None:
        groups = scale.shape[1]
        g_idx = torch.arange(codes.shape[1], device=codes.device) // (codes.shape[1] // groups)
    g_idx = g_idx.long()
    q = codes.to(torch.float32)
    if zero_point is not None:
        q = q - zero_point.to(torch.float32)[:, g_idx]
    return (q * scale.to(torch.float32)[:, g_idx]).to(dtype)
