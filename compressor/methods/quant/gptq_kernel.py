"""GPTQ's in-block column sweep as one Triton launch per block of columns (CUDA only).

Within a lazy-update block of B columns, GPTQ quantizes column i, divides its rounding error by
the inverse Hessian's diagonal and subtracts that error times row i of the block's inverse
Hessian from the columns after it. With static group scales, rows of the weight never interact,
so each program keeps a [B, rows] tile of the (transposed) block in registers and walks its B
columns in order: one launch per block instead of about ten small launches per column from
Python. Rounding is round-half-to-even, like torch.round. The result equals the per-column torch
loop up to float32 rounding (fused multiply-adds); the CPU keeps the torch loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sweep_block(W, Q, E, H, S, Z, rows, n_cols, qmin, qmax,
                 B: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ZERO: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    k = tl.arange(0, B)
    kmask = k < n_cols
    tile_mask = kmask[:, None] & rmask[None, :]
    w = tl.load(W + k[:, None] * rows + r[None, :], mask=tile_mask, other=0.0)  # [B, BLOCK_R]
    for i in range(B):  # columns past n_cols (a short last block) change nothing and store nothing
        x = tl.sum(tl.where((k == i)[:, None], w, 0.0), axis=0)
        s = tl.load(S + i * rows + r, mask=rmask & (i < n_cols), other=1.0)
        v = x / s
        f = tl.floor(v + 0.5)
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        q = tl.where(((f - v) == 0.5) & odd, f - 1.0, f)
        if HAS_ZERO:
            z = tl.load(Z + i * rows + r, mask=rmask & (i < n_cols), other=0.0)
            q = tl.minimum(tl.maximum(q + z, qmin), qmax)
            deq = (q - z) * s
        else:
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            deq = q * s
        d = tl.load(H + i * B + i)
        err = (x - deq) / d
        h_row = tl.load(H + i * B + k, mask=kmask & (k > i), other=0.0)
        w = w - h_row[:, None] * err[None, :]
        live = rmask & (i < n_cols)
        tl.store(Q + i * rows + r, q, mask=live)
        tl.store(E + i * rows + r, err, mask=live)


def sweep_block(wb: torch.Tensor, hb: torch.Tensor, scale_rows: torch.Tensor, zero_rows: torch.Tensor | None,
                qmin: int, qmax: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as float) and scaled errors [n, rows] of the transposed block `wb` [n, rows], n ≤ block,
    given the block's upper inverse-Hessian factor `hb` [n, n] and per-column scales (zero points)."""
    n, rows = wb.shape
    size = triton.next_power_of_2(max(block, n))
    h = torch.eye(size, dtype=torch.float32, device=wb.device)  # unit diagonal past n: finite errors
    h[:n, :n] = hb
    wb = wb.contiguous()
    q = torch.empty_like(wb)
    e = torch.empty_like(wb)
    block_r = 16 if size >= 128 else 32
    grid = (triton.cdiv(rows, block_r),)
    _sweep_block[grid](wb, q, e, h, scale_rows.contiguous(), zero_rows.contiguous() if zero_rows is not None else wb,
                       rows, n, float(qmin), float(qmax), B=size, BLOCK_R=block_r, HAS_ZERO=zero_rows is not None,
                       num_warps=4)
    return q, e
