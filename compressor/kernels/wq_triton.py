"""Weight-only int-N GEMM (y = x · Wᵀ, W stored as in wq_layout) in Triton, for CUDA.

One kernel serves decode and prefill. It computes the transposed product: output rows n are
the matrix unit's M side, so the weight tile, expanded in registers, is the register operand of
Hopper's wgmma (mma.sync elsewhere) and the few activation rows of decoding take its narrow N
side. Per tile (one quantization group): each bit plane's words → `(word >> shift) & mask | magic`
gives two 16-bit floats 2^e + u per int32 (at most one shift, one logic op, no int→float
conversion); one packed fma turns them into exact small integers (u − offset)·2^plane; the tensor cores
accumulate Σ x·(u − zero) in fp32; the group's scale is applied to the tile's sum in fp32.
Decode shapes split K across programs (splitk.py) so that every multiprocessor streams weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compressor.kernels import splitk
from compressor.kernels.wq_layout import PLANES, WqWeights


@triton.jit
def _plane_values(words, off, PW: tl.constexpr, LO: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    """[BN, W] words of a PW-bit plane → [BN, BK] operand (u − off)·2^LO, exact in bf16/fp16.

    Slots are taken in windows: a field lying inside the float's mantissa bits is masked where
    it is (at bit t) under an exponent chosen so that its weight is 1, giving 2^(MANT−t) + u, so
    only the first slot of each window needs a shift. `off` [BN] is the plane's offset per row."""
    S: tl.constexpr = 16 // PW
    W: tl.constexpr = BK * PW // 32
    MANT: tl.constexpr = 10 if FP16 else 7
    PER_WINDOW: tl.constexpr = MANT // PW
    EXP_BIAS: tl.constexpr = 15 if FP16 else 127
    DT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    slot = tl.arange(0, S)
    shift = (slot // PER_WINDOW) * (PER_WINDOW * PW)
    t = (slot % PER_WINDOW) * PW  # the field's bit inside its window
    mask = (((1 << PW) - 1) << t) * 65537
    magic = ((EXP_BIAS + MANT - t) << MANT) * 65537  # exponent bits of 2^(MANT − t), both halves
    base = tl.exp2((MANT - t).to(tl.float32))  # the float value of the magic alone
    shifted = words[:, None, :] >> shift[None, :, None]  # [BN, S, W]
    if USE_ASM:  # one lop3 for mask and magic, one packed fma for offset and plane weight
        pairs = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                          [shifted, tl.broadcast_to(mask[None, :, None], (BN, S, W)),
                                           tl.broadcast_to(magic[None, :, None], (BN, S, W))],
                                          dtype=tl.int32, is_pure=True, pack=1)
        weight = (EXP_BIAS + LO) << MANT
        neg = (-(base[None, :] + off[:, None]) * (1 << LO)).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        pairs = tl.inline_asm_elementwise(
            "fma.rn.f16x2 $0, $1, $2, $3;" if FP16 else "fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
            [pairs, tl.full((BN, S, W), weight | (weight << 16), tl.int32),
             tl.broadcast_to((neg | (neg << 16))[:, :, None], (BN, S, W))],
            dtype=tl.int32, is_pure=True, pack=1)
        lo = pairs.to(tl.int16).to(DT, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(DT, bitcast=True)
    else:
        pairs = (shifted & mask[None, :, None]) | magic[None, :, None]
        bias = base[None, :, None] + off[:, None, None]
        lo = ((pairs.to(tl.int16).to(DT, bitcast=True).to(tl.float32) - bias) * (1 << LO)).to(DT)
        hi = (((pairs >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32) - bias) * (1 << LO)).to(DT)
    return tl.reshape(tl.join(lo, hi), (BN, BK))


@triton.jit
def wq_gemm_kernel(x_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr,
                   M, N, K, G, groups_per_split, split_k, stride_xm, stride_ym, n_pad, m_pad,
                   P0_WORDS, P1_WORDS,
                   BITS: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, LO1: tl.constexpr,
                   ASYM: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   FP16: tl.constexpr, USE_ASM: tl.constexpr, SPLIT: tl.constexpr,
                   BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    W0: tl.constexpr = BK * PW0 // 32
    W1: tl.constexpr = BK * PW1 // 32
    # Plane 0 carries the zero point; the top plane carries the 2^(bits-1) offset.
    OFF0: tl.constexpr = (1 << (BITS - 1)) if PW1 == 0 else 0
    OFF1: tl.constexpr = (1 << (BITS - 1 - LO1)) if PW1 > 0 else 0
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    g_start = pid_k * groups_per_split  # the launcher makes the splits divide G
    p0 = p0_ptr + rn[:, None] * P0_WORDS + g_start * W0 + tl.arange(0, W0)[None, :]
    if PW1 > 0:
        p1 = p1_ptr + rn[:, None] * P1_WORDS + g_start * W1 + tl.arange(0, W1)[None, :]
    off1 = tl.full((BN,), OFF1, tl.float32)
    tot = tl.zeros((BN, BM), tl.float32)
    # Scales (and zero points) are read one group ahead: a plain load in the loop would stall every
    # iteration for a memory round trip (the compiler pipelines only the operands of the dot).
    scale_next = tl.load(s_ptr + g_start * n_pad + rn)
    if ASYM:
        zero_next = tl.load(z_ptr + g_start * n_pad + rn)
    for g in range(g_start, g_start + groups_per_split):
        scale = scale_next.to(tl.float32)
        more = (rn < n_pad) & (g + 1 < G)
        scale_next = tl.load(s_ptr + (g + 1) * n_pad + rn, mask=more, other=0.0)
        off0 = tl.full((BN,), OFF0, tl.float32)
        if ASYM:
            off0 += zero_next.to(tl.float32)
            zero_next = tl.load(z_ptr + (g + 1) * n_pad + rn, mask=more, other=0)
        k = g * BK + rk
        if HAS_PERM:
            src = tl.load(perm_ptr + k, mask=k < K, other=0)
        else:
            src = k
        x = tl.load(x_ptr + rm[:, None] * stride_xm + src[None, :], mask=(rm < M)[:, None] & (k < K)[None, :],
                    other=0.0)
        xt = tl.trans(x.to(DT))
        acc = tl.dot(_plane_values(tl.load(p0), off0, PW0, 0, FP16, USE_ASM, BN, BK), xt)
        p0 += W0
        if PW1 > 0:
            acc = tl.dot(_plane_values(tl.load(p1), off1, PW1, LO1, FP16, USE_ASM, BN, BK), xt, acc)
            p1 += W1
        tot += acc * scale[:, None]
    splitk.store_output(tot, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rn, rm, N, M, stride_ym, n_pad, m_pad,
                        pid_n, pid_m, pid_k, tl.num_programs(0), split_k, HAS_BIAS, SPLIT, DT, BN, BM)


# Tile shapes by activation rows M (first match), from the H200 sweep in reports/kernels.md: decode
# rows fit one narrow tile and split K until every multiprocessor has `per_sm` programs.
CONFIGS = splitk.tile_table((16, 16, 64, 4, 3, 4), (64, 64, 128, 4, 4, 2), (1 << 62, 128, 64, 4, 3, 1))


USE_ASM = True  # inline PTX for the lop3 and the packed fma; the plain-Triton path computes the same


def wq_matmul(x: torch.Tensor, w: WqWeights, bias: torch.Tensor | None, counters: torch.Tensor,
              use_asm: bool | None = None, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] (bf16 or fp16) → [..., out_features] in x's dtype (into `out` [M, N] if given)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*shape[:-1], n)
    cfg = config or splitk.plan(CONFIGS, m, w.n_pad, w.groups, splitk.sm_count(x.device))
    bm, bn, split = cfg["BM"], cfg["BN"], cfg["split_k"]
    m_tiles = -(-m // bm)
    m_pad = m_tiles * bm
    grid = (w.n_pad // bn, m_tiles, split)
    if split > 1 and grid[0] * grid[1] > counters.numel():
        raise ValueError(f"{grid[0] * grid[1]} output tiles exceed the layer's {counters.numel()} counters")
    ws = splitk.workspace(x.device, split * m_pad * w.n_pad) if split > 1 else y
    planes = w.planes
    (lo1, pw1) = PLANES[w.bits][1] if len(planes) > 1 else (0, 0)
    pw0 = PLANES[w.bits][0][1]
    wq_gemm_kernel[grid](
        x2, w.perm if w.perm is not None else x2, bias if bias is not None else y, y, ws, counters,
        planes[0], planes[-1], w.scales, w.zeros if w.zeros is not None else w.scales,
        m, n, w.in_features, w.groups, cfg["units_per_split"], split, x2.stride(0), y.stride(0), w.n_pad, m_pad,
        planes[0].shape[1], planes[-1].shape[1],
        BITS=w.bits, PW0=pw0, PW1=pw1, LO1=lo1, ASYM=w.zeros is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, FP16=x.dtype == torch.float16, USE_ASM=USE_ASM if use_asm is None else use_asm,
        SPLIT=split > 1, BN=bn, BM=bm, BK=w.block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*shape[:-1], n)
