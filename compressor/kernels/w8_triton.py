"""8-bit weights with quantized activations (W8A8 int8, FP8 E4M3) in Triton, for CUDA.

Two launches per linear: `quantize_rows` turns the activations into 8-bit codes with one fp32
scale per token (dynamic) or a given per-tensor scale (static), with the rounding
compressed-tensors uses (formats/activations.py: the scale and x/scale rounded to the input's
dtype first); `w8_gemm_kernel` multiplies codes by codes on the tensor cores (int32 or fp32
accumulation) and applies token scale × channel scale in the epilogue. Like the weight-only
kernel it computes the transposed product (weight rows on the matrix unit's wide side) and
splits K for decode shapes. FP8 at prefill sizes goes to torch._scaled_mm (cuBLASLt), which is
faster there; see `fp8_matmul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels import splitk

INT8_DIVISOR, FP8_MAX = 127.5, 448.0


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, EPS, FP8: tl.constexpr,
                         STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    DT = x_ptr.dtype.element_ty
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)))
        divisor = 448.0 if FP8 else 127.5
        scale = (tl.max(amax, axis=0) / divisor).to(DT).to(tl.float32)  # in the input's dtype, as the reference
        scale = tl.where(scale == 0.0, EPS, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32) / scale
        if not STATIC:  # a dynamic scale is in the input's dtype, and so is x / scale
            v = v.to(DT).to(tl.float32)
        if FP8:
            q = tl.clamp(v, -448.0, 448.0).to(tl.float8e4nv)
        else:
            # clamp, then round half to even (adding and removing 1.5·2^23 rounds in fp32)
            q = ((tl.clamp(v, -128.0, 127.0) + 12582912.0) - 12582912.0).to(tl.int8)
        tl.store(q_ptr + row.to(tl.int64) * K + k, q, mask=k < K)
    tl.store(s_ptr + row, scale)


def quantize_rows(x2: torch.Tensor, fp8: bool, static_scale: torch.Tensor | None = None):
    """x2 [M, K] (bf16/fp16) → codes [M, K] (int8 or float8_e4m3fn) and fp32 scales [M]."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        quantize_rows_kernel[(m,)](x2, q, s, static_scale if static_scale is not None else s, k, x2.stride(0),
                                   torch.finfo(x2.dtype).eps, FP8=fp8, STATIC=static_scale is not None,
                                   BLOCK=1024, num_warps=4)
    return q, s


@triton.jit
def w8_gemm_kernel(xq_ptr, xs_ptr, w_ptr, wsc_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, tiles_per_split, split_k, stride_ym, n_pad, m_pad,
                   FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, OUT_FP16: tl.constexpr,
                   BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    k_start = pid_k * tiles_per_split * BK
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + k_start + rk[None, :]
    x_ptrs = xq_ptr + rm[:, None].to(tl.int64) * K + k_start + rk[None, :]
    ACC_DT: tl.constexpr = tl.float32 if FP8 else tl.int32
    acc = tl.zeros((BN, BM), ACC_DT)
    for t in range(0, tiles_per_split):
        k = k_start + t * BK + rk
        a = tl.load(w_ptrs, mask=(k < K)[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=(rm < M)[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC_DT)
        w_ptrs += BK
        x_ptrs += BK
    w_scale = tl.load(wsc_ptr + rn).to(tl.float32)
    x_scale = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    tot = acc.to(tl.float32) * w_scale[:, None] * x_scale[None, :]
    OUT_DT: tl.constexpr = tl.float16 if OUT_FP16 else tl.bfloat16
    splitk.store_output(tot, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rn, rm, N, M, stride_ym, n_pad, m_pad,
                        pid_n, pid_m, pid_k, tl.num_programs(0), split_k, HAS_BIAS, SPLIT, OUT_DT, BN, BM)


# Tile shapes by activation rows M (first match), from the same sweep as wq_triton.CONFIGS.
CONFIGS = splitk.tile_table((16, 16, 64, 4, 4, 4), (64, 64, 128, 4, 4, 1), (1 << 62, 128, 128, 4, 4, 1))


def w8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
              counters: torch.Tensor, out_features: int, static_scale: torch.Tensor | None = None,
              config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] → [..., out_features]; weight [n_pad, K] int8/fp8 codes, weight_scale fp32 [n_pad]."""
    fp8 = weight.dtype == torch.float8_e4m3fn
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    y = out if out is not None else torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*shape[:-1], out_features)
    q, s = quantize_rows(x2, fp8, static_scale)
    n_pad = weight.shape[0]
    k_tiles = -(-k // 128)
    cfg = config or splitk.plan(CONFIGS, m, n_pad, k_tiles, splitk.sm_count(x.device))
    bm, bn, split = cfg["BM"], cfg["BN"], cfg["split_k"]
    m_tiles = -(-m // bm)
    grid = (n_pad // bn, m_tiles, split)
    if split > 1 and grid[0] * grid[1] > counters.numel():
        raise ValueError(f"{grid[0] * grid[1]} output tiles exceed the layer's {counters.numel()} counters")
    ws = splitk.workspace(x.device, split * m_tiles * bm * n_pad) if split > 1 else y
    w8_gemm_kernel[grid](q, s, weight, weight_scale, bias if bias is not None else y, y, ws, counters,
                         m, out_features, k, cfg["units_per_split"], split, y.stride(0), n_pad, m_tiles * bm,
                         FP8=fp8, HAS_BIAS=bias is not None, SPLIT=split > 1, OUT_FP16=x.dtype == torch.float16,
                         BN=bn, BM=bm, BK=128, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*shape[:-1], out_features)


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 through cuBLASLt (torch._scaled_mm with row-wise scales); bf16 output only."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, s = quantize_rows(x2, True, static_scale)
    y = torch._scaled_mm(q, weight[:out_features].t(), scale_a=s[:, None], scale_b=weight_scale[None, :out_features],
                         bias=bias, out_dtype=x.dtype)
    return y.reshape(*shape[:-1], out_features)
