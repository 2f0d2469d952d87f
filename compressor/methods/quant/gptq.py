"""GPTQ: quantize a layer's columns one at a time, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Written from the paper: lazy block updates of `block_size` columns, relative dampening that is
raised automatically when the Hessian is not positive definite, optional act-order (columns by
descending Hessian diagonal), symmetric or asymmetric integer codes, 2..8 bits, and an optional
MSE-optimal clipping search for the group scales.

Group scales are either fixed up front from the unmodified weights (`static_groups`, the default,
which is what makes act-order storable in natural column order: compressed-tensors' actorder
"weight"), or computed as the sweep reaches each group from the weights already updated by the
earlier columns' errors (the GPTQ paper without act-order). Act-order with groups fitted during
the sweep would need a `g_idx` column map, which compressed-tensors no longer loads (its
actorder "group" was removed), so that combination is refused.

"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, BlockContext, Method, ModelContext, Record
from compressor.methods.quant.lowrank import compensate
from compressor.methods.quant.quantizer import (
    SCALE_DTYPES, check_scheme, compute_qparams, dequantize_record, qparams_from_range,
)
from compressor.methods.quant.rtn import RTN, WeightQuantConfig
from compressor.models.adapters import Adapter, LinearGroup
from compressor.schemes import WeightScheme, group_index
from compressor.util import one_thread

MAX_DAMP = 1.0
REFIT_CHUNK_BYTES = 1 << 30


class GPTQConfig(WeightQuantConfig):
    act_order: bool = Field(False, description="quantize columns by descending Hessian diagonal")
    static_groups: bool = Field(True, description="fix group scales from the unmodified weight up front")
    damp: float = Field(0.01, gt=0, le=MAX_DAMP, description="dampening as a fraction of the mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    mse_clip: bool = Field(True, description="search per-group clipping minimizing the Hessian-weighted error")
    refit_scales: bool = Field(True, description="after the sweep, re-solve each row's group scales for the "
                                                  "least output error given the chosen codes")
    fp_target: bool = Field(False, description="fit the float model's outputs, not the float layer's "
                                               "outputs on already-quantized inputs (GPTAQ-style)")
    lowrank: int = Field(0, ge=0, le=1024, description="rank of a bfloat16 correction B·A of each linear's "
                                                       "quantization error, fitted in the eigenspace of its "
                                                       "inputs (EoRA); 0: none")
    lowrank_passes: int = Field(2, ge=0, le=8, description="with --lowrank: GPTQ passes on the weight minus the "
                                                           "last correction, each followed by a refit of it")

    @model_validator(mode="after")
    def _storable(self) -> "GPTQConfig":
        if self.act_order and not self.static_groups:
            raise ValueError("act-order needs static groups: groups fitted during the sweep would need a g_idx "
                             "map, which compressed-tensors no longer loads; drop --no-static-groups")
        return self

    def actorder(self) -> str | None:
        """The compressed-tensors name of the column order ('weight': act-order with static groups)."""
        return "weight" if self.act_order else None


def mse_qparams(w: torch.Tensor, scheme: WeightScheme, col_weight: torch.Tensor | None = None,
                grid: int = 20, min_ratio: float = 0.75):
    """Scales (and zero points) with each group's range shrunk to the ratio in [min_ratio, 1] that
    minimises its squared rounding error, each column weighted by `col_weight` (the Hessian
    diagonal: how much that input matters)."""
    g = w.float().reshape(w.shape[0], scheme.groups(w.shape[1]), -1)
    weight = (torch.ones(w.shape[1], device=w.device) if col_weight is None
              else col_weight.float().to(w.device)).reshape(1, *g.shape[1:])
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best_scale, best_zero = qparams_from_range(lo, hi, scheme)
    best_err = torch.full(g.shape[:2], float("inf"), device=w.device)
    for step in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * step / (grid - 1)
        scale, zero = qparams_from_range(lo * ratio, hi * ratio, scheme)
        s = scale.float().unsqueeze(-1)
        q = torch.round(g / s)
        if zero is not None:
            z = zero.float().unsqueeze(-1)
            q = q.add_(z).clamp_(scheme.qmin, scheme.qmax).sub_(z)
        else:
            q = q.clamp_(scheme.qmin, scheme.qmax)
        err = q.mul_(s).sub_(g).pow_(2).mul_(weight).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after dampening; damp grows ×10 until H is positive definite."""
    diag_mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
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


class _GroupParams:
    """Scales and zero points per group, filled up front (static) or as the sweep reaches each group."""

    def __init__(self, w: torch.Tensor, perm: torch.Tensor, config: GPTQConfig, h_diag: torch.Tensor):
        self.scheme = config.scheme()
        self.mse = config.mse_clip
        self.h_diag = h_diag  # natural column order
        cols = w.shape[1]
        self.size = cols if self.scheme.per_channel else self.scheme.group_size
        self.static = config.static_groups or self.scheme.per_channel
        if self.static:
            self.scale, self.zero = self._qparams(w, self.scheme, self.h_diag)
            self.col_group = group_index(cols, self.scheme).to(w.device)[perm]  # group of each processed column
            # Gathered once: row c holds the scales (zero points) of processed column c.
            self.scale_rows = self.scale.float()[:, self.col_group].T.contiguous()
            self.zero_rows = None if self.zero is None else self.zero.float()[:, self.col_group].T.contiguous()
        else:
            groups = self.scheme.groups(cols)
            self.scale = torch.empty(w.shape[0], groups, dtype=SCALE_DTYPES[self.scheme.scale_dtype], device=w.device)
            self.zero = (None if self.scheme.symmetric
                         else torch.empty(w.shape[0], groups, dtype=torch.int8, device=w.device))
            self.col_group = torch.arange(cols, device=w.device) // self.size

    def _qparams(self, w: torch.Tensor, scheme: WeightScheme, col_weight: torch.Tensor):
        return mse_qparams(w, scheme, col_weight) if self.mse else compute_qparams(w, scheme)

    def starts_group(self, col: int) -> bool:
        return not self.static and col % self.size == 0

    def fit(self, col: int, current: torch.Tensor, perm: torch.Tensor) -> None:
        """Fit the group starting at processed column `col` to its columns' current values."""
        group_scheme = WeightScheme(self.scheme.bits, current.shape[1], self.scheme.symmetric, self.scheme.scale_dtype)
        scale, zero = self._qparams(current, group_scheme, self.h_diag[perm[col:col + current.shape[1]]])
        g = col // self.size
        self.scale[:, g] = scale[:, 0]
        if zero is not None:
            self.zero[:, g] = zero[:, 0]

    @property
    def parts(self) -> list["_GroupParams"]:
        return [self]

    def column(self, col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.static:
            return self.scale_rows[col], None if self.zero_rows is None else self.zero_rows[col]
        g = int(self.col_group[col])
        return self.scale[:, g].float(), None if self.zero is None else self.zero[:, g].float()


class _StackedParams:
    """Static group parameters of several row blocks side by side (each its own scheme)."""

    def __init__(self, parts: list[_GroupParams]):
        if not all(p.static for p in parts):
            raise ValueError("row blocks under different formats need static groups")
        if len({p.zero is None for p in parts}) != 1:
            raise ValueError("row blocks must all be symmetric or all asymmetric")
        self.parts = parts
        self.scale_rows = torch.cat([p.scale_rows for p in parts], dim=1)
        self.zero_rows = None if parts[0].zero is None else torch.cat([p.zero_rows for p in parts], dim=1)

    def starts_group(self, col: int) -> bool:
        return False

    def column(self, col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scale_rows[col], None if self.zero_rows is None else self.zero_rows[col]


def float_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight V that best reproduces the float model on the quantized path's inputs:
    argmin ||X̃ Vᵀ − X Wᵀ||, i.e. H V ᵀ = C Wᵀ with H = X̃ᵀX̃, C = X̃ᵀX (dampened like GPTQ's H).
    Since ||X̃Qᵀ − XWᵀ||² = ||X̃(Q − V)ᵀ||² + const, GPTQ on V minimises the error to the float model."""
    h64 = h.double()
    h64 = h64 + damp * torch.diagonal(h64).mean() * torch.eye(h64.shape[0], dtype=torch.float64, device=h.device)
    return torch.linalg.solve(h64, cross.double() @ w.double().T).T.float()


def refit_scales(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 h: torch.Tensor) -> torch.Tensor:
    """Given the integer codes, the group scales of each row minimising the layer's output error
    (w − ŵ)ᵀ H (w − ŵ), with ŵ = s_g (q − z_g) on group g: a small least-squares problem per row
    (groups × groups), whose solution can only lower the error the sweep left (the old scales are
    one of its candidates). Rows whose solution is singular or not positive keep their scales."""
    rows, cols = w.shape
    groups = scale.shape[1]
    size = cols // groups
    u = codes.float()
    if zero is not None:
        u = u - zero.float().repeat_interleave(size, dim=1)
    h = h.float()
    ug = u.reshape(rows, groups, size)
    # t[r, g2, c] = Σ_{j∈g2} u_rj H_jc ; A[r, g1, g2] = Σ_{c∈g1} u_rc t[r, g2, c] ; b[r, g] = Σ_{c∈g} u_rc (H w_r)_c
    # t holds rows × groups × cols floats (26 GB for an 8B model's down_proj): built for a slice of rows
    # at a time when it would pass REFIT_CHUNK_BYTES (small layers keep the one-shot computation).
    step = max(1, REFIT_CHUNK_BYTES // max(4 * groups * cols, 1))
    hg = h.reshape(groups, size, cols)
    a = torch.cat([torch.einsum("rgs,rkgs->rgk", ug[i:i + step],
                                torch.einsum("rgs,gsc->rgc", ug[i:i + step], hg).reshape(-1, groups, groups, size))
                   for i in range(0, rows, step)])
    b = (u * (w.float() @ h)).reshape(rows, groups, size).sum(-1)
    solved, info = torch.linalg.solve_ex(a.double(), b.double().unsqueeze(-1))
    solved = solved.squeeze(-1)
    ok = (info == 0) & torch.isfinite(solved).all(dim=1) & (solved > 0).all(dim=1)
    refit = torch.where(ok.unsqueeze(1), solved.float(), scale.float()).to(scale.dtype)
    tiny = torch.finfo(refit.dtype).tiny
    return torch.where(refit.float() > tiny, refit, scale)


def _fused_sweep():
    """The Triton in-block sweep, or None where Triton is not installed."""
    try:
        from compressor.methods.quant.gptq_kernel import sweep_block
    except ImportError:
        return None
    return sweep_block


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, config: GPTQConfig, name: str = "layer",
                  cross: torch.Tensor | None = None) -> tuple[Record, float]:
    """Quantize one weight [out, in] given its input Hessian [in, in]; returns the record and the damp used.
    With `cross` (X̃ᵀX / n against the float model's inputs), the target is the float model's output."""
    records, damp = gptq_quantize_rows(w, h, [(w.shape[0], config)], name, cross)
    return records[0], damp


def gptq_quantize_rows(w: torch.Tensor, h: torch.Tensor, blocks: list[tuple[int, GPTQConfig]],
                       name: str = "layer", cross: torch.Tensor | None = None) -> tuple[list[Record], float]:
    """GPTQ of consecutive row blocks of w, each under its own config (bits, group size), in one
    column sweep: rows are independent given the Hessian, so linears sharing an input, or one
    weight repeated under several candidate formats, cost one sweep. Several blocks need static
    groups (their scales are fitted up front). Returns a record per block and the damp used."""
    config = blocks[0][1]
    w = w.detach().float().clone()
    h = h.detach().to(torch.float64 if h.dtype == torch.float64 else torch.float32).clone()
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise CompressorError(f"{name} has NaN or Inf in its weights or calibration activations",
                              "check the checkpoint and the calibration data")
    if cross is not None:
        w = float_target(w, h, cross, config.damp)
    original = w.clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if config.act_order
            else torch.arange(cols, device=w.device))
    rows = [count for count, _ in blocks]
    h_diag = torch.diagonal(h).clone()
    if len(blocks) == 1:
        params = _GroupParams(w, perm, config, h_diag)
        qmin, qmax = params.scheme.qmin, params.scheme.qmax
    else:
        parts = [_GroupParams(part, perm, cfg, h_diag) for part, (_, cfg) in zip(torch.split(w, rows), blocks)]
        params = _StackedParams(parts)
        qmin, qmax = (torch.cat([torch.full((r,), getattr(p.scheme, bound), dtype=torch.float32, device=w.device)
                                 for r, p in zip(rows, parts)]) for bound in ("qmin", "qmax"))
    w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = inverse_hessian_cholesky(h, config.damp, name)
    codes = _sweep(w, hinv.float(), params, perm, qmin, qmax, config.block_size)
    natural = torch.empty_like(codes)
    natural[:, perm] = codes
    unpermuted_h = None
    records = []
    for (start, count), (_, cfg), part in zip(_spans(rows), blocks, params.parts):
        scale = part.scale
        block_codes = natural[start:start + count]
        if cfg.refit_scales and part.static:
            if unpermuted_h is None:
                unpermuted_h = torch.empty_like(h)
                unpermuted_h[perm.unsqueeze(1), perm.unsqueeze(0)] = h
            scale = refit_scales(original[start:start + count], block_codes, scale, part.zero, unpermuted_h)
        record: Record = {"qweight": block_codes.contiguous(), "scale": scale}
        if part.zero is not None:
            record["zero_point"] = part.zero
        records.append(record)
    return records, damp


def _spans(rows: list[int]) -> list[tuple[int, int]]:
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return list(zip(starts, rows))


def _sweep(w: torch.Tensor, hinv: torch.Tensor, params, perm: torch.Tensor, qmin, qmax,
           block_size: int) -> torch.Tensor:
    """The column sweep over w [out, in] (columns already in processing order): int8 codes in that order."""
    cols = w.shape[1]
    # Columns are rows of the transposed weight, so each step reads and updates contiguous memory.
    wt = w.T.contiguous()
    q_all = torch.empty_like(wt)
    # The Triton kernel sweeps a block's columns in one launch; it needs static scales and one
    # format for every row (scalar qmin/qmax), so mixed row blocks take the reference loop.
    fused = wt.is_cuda and isinstance(params, _GroupParams) and params.static and _fused_sweep() is not None
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if fused:
            zero_rows = None if params.zero_rows is None else params.zero_rows[start:end]
            q_all[start:end], eb = _fused_sweep()(wt[start:end], hinv[start:end, start:end],
                                                  params.scale_rows[start:end], zero_rows, qmin, qmax, block_size)
        else:
            wb = wt[start:end].clone()
            eb = torch.zeros_like(wb)
            hb = hinv[start:end, start:end]
            with one_thread():
                _sweep_block(wb, eb, hb, wt, q_all, params, perm, qmin, qmax, start, end)
        wt[end:].addmm_(hinv[start:end, end:].T, eb, alpha=-1)
    return q_all.T.to(torch.int8)


def _sweep_block(wb, eb, hb, wt, q_all, params, perm, qmin, qmax, start: int, end: int) -> None:
    """Quantize columns start..end of one lazy block, updating its later columns as it goes."""
    for i in range(end - start):
        col = start + i
        if params.starts_group(col):
            stop = col + params.size
            params.fit(col, torch.cat([wb[i:stop - start], wt[end:stop]]).T, perm)
        scale, zero = params.column(col)
        x = wb[i]
        q = torch.div(x, scale).round_()
        if zero is not None:
            q.add_(zero).clamp_(qmin, qmax)
            deq = (q - zero).mul_(scale)
        else:
            q.clamp_(qmin, qmax)
            deq = q * scale
        q_all[col] = q
        err = x.sub(deq).div_(hb[i, i])
        wb[i:].addr_(hb[i, i:], err, alpha=-1)
        eb[i] = err


def split_rows(record: Record, rows: list[int]) -> list[Record]:
    """Per-linear records from the record of their row-concatenated weights."""
    parts: list[Record] = [{} for _ in rows]
    for key, value in record.items():
        for part, piece in zip(parts, torch.split(value, rows, dim=0)):
            part[key] = piece.contiguous()
    return parts


def too_few_tokens(ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear],
                   stats: dict[str, torch.Tensor]) -> bool:
    """Fewer calibration tokens than inputs (an expert the router rarely or never chose) leave
    the Hessian rank-deficient: such a group is rounded to nearest instead, and the artifact's
    manifest says so."""
    tokens, width = int(stats["tokens"]), next(iter(linears.values())).in_features
    if tokens >= width:
        return False
    ctx.meta.setdefault("fallbacks", {})[f"{ctx.prefix}{'/'.join(group.linears)}"] = (
        f"round-to-nearest: {tokens} calibration tokens for {width} inputs")
    return True


@METHODS.register("gptq")
class GPTQ(Method):
    Config = GPTQConfig
    produces = "weights"
    needs_calibration = True

    @property
    def needs_float_path(self) -> bool:
        return self.config.fp_target

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def on_start(self, ctx: ModelContext) -> None:
        """A Hessian of n inputs from fewer than n tokens is singular: GPTQ then leans on dampening."""
        widest = max(l.in_features for block in ctx.adapter.blocks(ctx.model)
                     for l in ctx.adapter.block_linears(block).values())
        if ctx.calibration_tokens < widest:
            ctx.progress.warn(f"{ctx.calibration_tokens} calibration tokens cannot give full-rank Hessians for "
                              f"linears with {widest} inputs; use at least {widest} tokens (--samples × --seq-len), "
                              "ideally 10× that")

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        # True-sequential: the Hessian of inputs that already pass through the quantized groups.
        stats = ctx.group_stats(group, {"hessian", "cross"} if self.config.fp_target else {"hessian"})
        if too_few_tokens(ctx, group, linears, stats):
            return RTN(self.config).on_group(ctx, group, linears)
        # GPTQ treats rows independently given the Hessian, so linears sharing an input are
        # quantized as one stacked matrix: one inverse Hessian and one column sweep per group.
        names = list(linears)
        # On the block's device: the sweep and the inverse run where the Hessian was accumulated.
        device = next(iter(linears.values())).weight.device
        stacked = torch.cat([linears[n].weight.data.float() for n in names])
        cross = stats["cross"].to(device) if "cross" in stats else None
        record, _ = gptq_quantize(stacked, stats["hessian"].to(device), self.config, "/".join(names), cross)
        records = dict(zip(names, split_rows(record, [linears[n].out_features for n in names])))
        for name, linear in linears.items():
            linear.weight.data = dequantize_record(records[name], linear.weight.dtype).to(linear.weight.device)
        if self.config.lowrank:
            records = self._compensated(stacked, records, stats["hessian"].to(device), names, linears, cross)
        return records

    def _compensated(self, stacked: torch.Tensor, records: dict[str, Record], h: torch.Tensor, names: list[str],
                     linears: dict[str, nn.Linear], cross: torch.Tensor | None) -> dict[str, Record]:
        """Each linear's low-rank correction of the error its records leave; then `lowrank_passes`
        times: GPTQ again on the weight minus the correction (the codes no longer spend their
        precision on what the correction carries) and the correction refitted to the new error."""
        rows = [linears[n].out_features for n in names]
        originals = dict(zip(names, torch.split(stacked, rows)))
        for step in range(self.config.lowrank_passes + 1):
            if step:
                residual = stacked - torch.cat(corrections)
                record, _ = gptq_quantize(residual, h, self.config, "/".join(names), cross)
                records = dict(zip(names, split_rows(record, rows)))
            corrections, weights = [], {}
            for name in names:
                quantized = dequantize_record(records[name], torch.float32)
                weights[name] = compensate(records[name], originals[name], quantized, h, self.config.lowrank)
                corrections.append(weights[name] - quantized)
        for name, linear in linears.items():
            linear.weight.data = weights[name].to(linear.weight.dtype).to(linear.weight.device)
        return records

    def export(self) -> dict:
        return {"kind": "weight-int", "scheme": self.config.scheme(), "actorder": self.config.actorder()}
