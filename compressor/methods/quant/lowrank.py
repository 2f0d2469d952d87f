"""Low-rank compensation of a linear's quantization error in the eigenspace of its inputs
(EoRA-style, Liu et al. 2024; the low-rank compensation of ZeroQuant-V2/FP, Yao et al. 2023).

Given the float weight W [out, in], its quantized approximation Q and the Hessian of the layer's
calibration inputs H = XᵀX / n = U diag(λ) Uᵀ, the rank-r pair (B [out, r], A [r, in]) minimising
the output error ‖X (W − Q − BA)ᵀ‖ is the truncated SVD of the error projected into the input
eigenspace, ΔW U diag(√λ), mapped back by diag(1/√λ) Uᵀ. Directions the calibration never excites
(λ ≈ 0) get no correction. B and A are stored in bfloat16 beside the quantized weight; the
effective weight is Q + B A.
"""

from __future__ import annotations

import torch

LOWRANK_DTYPE = torch.bfloat16
EIGEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest are treated as unexcited


@torch.no_grad()
def eigen_lowrank(error: torch.Tensor, h: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) in bfloat16 with B A ≈ `error` [out, in] in the H-weighted norm."""
    h64 = h.to(error.device).double()
    eigenvalues, vectors = torch.linalg.eigh((h64 + h64.T) / 2)
    floor = eigenvalues.max().clamp_min(0) * EIGEN_FLOOR
    keep = eigenvalues > floor
    root = eigenvalues[keep].sqrt()
    basis = vectors[:, keep]
    projected = error.double() @ basis * root  # ΔW U √λ
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    r = min(rank, s.shape[0])
    b = u[:, :r] * s[:r]
    a = (vh[:r] / root) @ basis.T  # back from the eigenspace: diag(1/√λ) Uᵀ
    # Balance the two factors' magnitudes before rounding them to bfloat16.
    balance = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-30)).sqrt().clamp_min(1e-30)
    return (b * balance).to(LOWRANK_DTYPE), (a / balance.unsqueeze(1)).to(LOWRANK_DTYPE)


def lowrank_weight(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The correction B A in float32 (the rule the loader applies)."""
    return b.float() @ a.float()


def lowrank_bits(rank: int, out_features: int, in_features: int) -> float:
    """Bits per weight the correction adds (two bfloat16 factors)."""
    return 16 * rank * (out_features + in_features) / (out_features * in_features)


def compensate(record: dict[str, torch.Tensor], weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor,
               rank: int) -> torch.Tensor:
    """Add the rank-`rank` correction of `weight` − `quantized` to `record` (`lowrank_b`, `lowrank_a`)
    and return the effective float32 weight, quantized + B A."""
    b, a = eigen_lowrank(weight.float() - quantized.float(), h, rank)
    record["lowrank_b"], record["lowrank_a"] = b, a
    return quantized.float() + lowrank_weight(b, a)
