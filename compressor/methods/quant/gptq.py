"""GPTQ: quantize a layer's columns one at a time, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Written from the paper: lazy block updates of `block_size` columns, relative dampening that is
raised automatically when the Hessian is not positive definite, optional act-order (columns by
descending Hessian diagonal) with static groups (scales fixed from the unmodified weight, so the
stored layout stays in natural column order), symmetric or asymmetric integer codes, 2..8 bits,
and an optional MSE-optimal clipping search for the group scales.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, Method, Record
from compressor.methods.quant.quantizer import check_scheme, compute_qparams, dequantize_record, make_record
from compressor.methods.quant.rtn import WeightQuantConfig
from compressor.models.adapters import Adapter, LinearGroup
from compressor.schemes import WeightScheme, group_index

MAX_DAMP = 1.0


class GPTQConfig(WeightQuantConfig):
    act_order: bool = Field(False, description="quantize columns by descending Hessian diagonal")
    damp: float = Field(0.01, gt=0, le=MAX_DAMP, description="dampening as a fraction of the mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    mse_clip: bool = Field(False, description="search per-group clipping that minimizes squared error")


def mse_qparams(w: torch.Tensor, scheme: WeightScheme, grid: int = 20, min_ratio: float = 0.5):
    """Scales (and zero points) shrunk per group to the clip ratio minimizing squared error."""
    best_scale, best_zero = compute_qparams(w, scheme)
    g = w.float().reshape(w.shape[0], scheme.groups(w.shape[1]), -1)
    best_err = torch.full(g.shape[:2], float("inf"))
    for step in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * step / grid
        scale, zero = compute_qparams(w * ratio, scheme)
        record = make_record(w, scale, zero, scheme)
        err = (dequantize_record(record, torch.float32) - w.float()).reshape(g.shape).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after dampening; damp grows ×10 until H is positive definite."""
    diag_mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    while damp <= MAX_DAMP:
        chol, info = torch.linalg.cholesky_ex(h + damp * diag_mean * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    raise CompressorError(f"the Hessian of {name} is not positive definite even with dampening {MAX_DAMP}",
                          "use more or more varied calibration data (--samples), or RTN for this model")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, config: GPTQConfig, name: str = "layer") -> tuple[Record, float]:
    """Quantize one weight [out, in] given its input Hessian [in, in]; returns the record and the damp used."""
    scheme = config.scheme()
    w = w.detach().float().clone()
    h = h.detach().to(torch.float64 if h.dtype == torch.float64 else torch.float32).clone()
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise CompressorError(f"{name} has NaN or Inf in its weights or calibration activations",
                              "check the checkpoint and the calibration data")
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    # Static groups: scales from the unmodified weight in natural column order.
    if config.mse_clip:
        scale, zero = mse_qparams(w, scheme)
    else:
        scale, zero = compute_qparams(w, scheme)
    groups = group_index(cols, scheme)
    perm = torch.argsort(torch.diagonal(h), descending=True) if config.act_order else torch.arange(cols)
    w, h, col_groups = w[:, perm], h[perm][:, perm], groups[perm]
    hinv, damp = inverse_hessian_cholesky(h, config.damp, name)
    hinv = hinv.float()
    s_cols = scale.float()[:, col_groups]
    z_cols = zero.float()[:, col_groups] if zero is not None else None
    q = torch.zeros_like(w)
    for start in range(0, cols, config.block_size):
        end = min(start + config.block_size, cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = w_block[:, i]
            s = s_cols[:, start + i]
            codes = torch.round(col / s)
            if z_cols is not None:
                codes = (codes + z_cols[:, start + i]).clamp(scheme.qmin, scheme.qmax) - z_cols[:, start + i]
            else:
                codes = codes.clamp(scheme.qmin, scheme.qmax)
            q_col = codes * s
            q[:, start + i] = q_col
            err = (col - q_col) / h_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
    unpermuted = torch.empty_like(q)
    unpermuted[:, perm] = q
    return make_record(unpermuted, scale, zero, scheme), damp


@METHODS.register("gptq")
class GPTQ(Method):
    name = "gptq"
    Config = GPTQConfig
    needs = frozenset({"hessian"})
    true_sequential = True

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def apply_group(self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear],
                    stats: dict[str, torch.Tensor]) -> dict[str, Record]:
        records = {}
        for name, linear in linears.items():
            record, _ = gptq_quantize(linear.weight.data, stats["hessian"], self.config, name)
            linear.weight.data = dequantize_record(record, linear.weight.dtype).to(linear.weight.device)
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "weight-int", "scheme": self.config.scheme(),
                "actorder": "weight" if self.config.act_order else None}
