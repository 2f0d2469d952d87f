"""Decode GEMV for integer weight-only layers (few activation rows), in CUDA C through CuPy.

It reads the layout of wq_layout.py as it is (no second copy of the weights): each warp owns 16·RT
output rows and a share of the K tiles; each lane loads, straight into registers, the plane words
that hold its own mma.m16n8k16 A-fragment pairs (pair p = 8·kstep + 4·half + t of a tile sits in
word p mod W, slot p div W), so weights never pass through shared memory and every load of a
batch is in flight at once (UN tiles per iteration). Dequantization is the magic-number trick:
`(word >> shift) & mask | 0x4300_4300` (bf16; 0x6400 for fp16) is the pair 128 + u exactly, one
packed fma gives (u − offset)·2^plane; the tensor cores multiply by the activation rows
(mma's narrow side, 8 per n-tile, so M = 1 wastes only tensor-core cycles, which are not the
limit here) and accumulate in fp32; the group's scale is applied per tile in fp32. Warps of a
block split K and reduce through shared memory; blocks split K further (grid y) when there are
too few row blocks to fill the GPU, the last block of a row block summing the fp32 partials in
split order (deterministic) and resetting its counter.

CuPy is optional: without it QuantLinear uses the Triton kernel for every M.
"""

from __future__ import annotations

import functools

import torch

from compressor.kernels.wq_layout import PLANES, WqWeights

MAX_M = 16  # two n-tiles of 8 activation rows; QuantLinear decides where this path pays
SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#define W0 (BK * PW0 / 32)
#define NWD0 (W0 >= 4 ? W0 / 4 : 1)
#define W1 (BK * PW1 / 32)
#define NWD1 (PW1 == 0 ? 1 : (W1 >= 4 ? W1 / 4 : 1))
#define KSTEPS (BK / 16)
#define OFF0 (PW1 == 0 ? (1 << (BITS - 1)) : 0)
#define OFF1 (PW1 == 0 ? 0 : (1 << (BITS - 1 - LO1)))
/* bits of the 16-bit float 2^LO·(2^MANT + f) for a field f in the low mantissa bits: base of 128 (bf16)
   or 1024 (fp16) times the plane's weight 2^LO */
#define MAGIC_HALF(lo) (FP16 ? ((15 + 10 + (lo)) << 10) : ((127 + 7 + (lo)) << 7))
#define MAGIC_F (FP16 ? 1024.0f : 128.0f)
#define MP (MT * 8)

#if SCALE_KIND == 2
typedef float scale_t;
#else
typedef u16 scale_t;
#endif

#ifndef GEMV_EMULATED
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 f2b(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float b2f(u16 h) {
  float f; asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16)); return f;
}
__device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
#if FP16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ u32 mask_or(u32 a, u32 b, u32 c) {
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;  /* (a & b) | c */
}
__device__ __forceinline__ float ld_cg(const float* p) {
  float v; asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p)); return v;
}
#endif

/* VEC: 128-column tiles whose planes have one width (2, 4, 8 bits): lane t reads its PW words of a row
   as one vector (16 B for 4-bit) and owns the tile's pairs in them, k-step kk taking the lane's pairs
   2kk and 2kk+1; the activations follow the same order, in vectors too. Otherwise lanes own the
   pairs p = 8·kk + 4·half + t, one 32-bit word at a time. */
struct alignas(16) v4 { u32 w[4]; };
struct alignas(8) v2 { u32 w[2]; };
template <int n> __device__ __forceinline__ void load_vec(u32* dst, const u32* src, bool ok) {
  if (n == 4) { v4 v = ok ? *(const v4*)src : v4{{0u, 0u, 0u, 0u}}; for (int i = 0; i < 4; i++) dst[i] = v.w[i]; }
  else if (n == 2) { v2 v = ok ? *(const v2*)src : v2{{0u, 0u}}; dst[0] = v.w[0]; dst[1] = v.w[1]; }
  else dst[0] = ok ? *src : 0u;
}

__device__ __forceinline__ float to_f(u16 h) { return FP16 ? h2f(h) : b2f(h); }
__device__ __forceinline__ u16 from_f(float f) { return FP16 ? f2h(f) : f2b(f); }
__device__ __forceinline__ u32 pair_of(float f) { u32 h = from_f(f); return h | (h << 16); }
#if SCALE_KIND == 2
__device__ __forceinline__ float scale_f(scale_t s) { return s; }
#elif SCALE_KIND == 1
__device__ __forceinline__ float scale_f(scale_t s) { return b2f(s); }
#else
__device__ __forceinline__ float scale_f(scale_t s) { return h2f(s); }
#endif

extern "C" __global__ void __launch_bounds__(NW * 32) wq_gemv(
    const u16* __restrict__ x, const u32* __restrict__ p0, const u32* __restrict__ p1,
    const scale_t* __restrict__ sc, const signed char* __restrict__ zp, const u16* __restrict__ bias,
    u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
    int M, int N, int K, int n_pad, int tiles, int tiles_per_split, int p0_words, int p1_words,
    int x_stride, int y_stride)
{
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * (16 * RT);
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = t_begin + tiles_per_split < tiles ? t_begin + tiles_per_split : tiles;
  /* lanes whose pairs share a word (W < 4) pre-shift it to their first slot */
  const int pre0 = (VEC || W0 >= 4) ? 0 : (t / W0) * PW0;
  const int pre1 = (PW1 == 0 || W1 >= 4) ? 0 : (t / (W1 > 0 ? W1 : 1)) * PW1;
  const u32 mask0 = ((1u << PW0) - 1u) * 0x10001u;
  const u32 mask1 = PW1 == 0 ? 0u : ((1u << PW1) - 1u) * 0x10001u;
  const u32 magic0 = (u32)MAGIC_HALF(0) * 0x10001u, magic1 = (u32)MAGIC_HALF(LO1) * 0x10001u;
  const u32 ones[4] = {pair_of(1.0f), pair_of(1.0f), pair_of(1.0f), pair_of(1.0f)};
  /* the tensor cores see 2^MANT + u per plane: the tile's sum is corrected by (that offset + the
     code offset + the zero point) times the tile's activation sums, which an mma by ones gives */
  const float plane1_f = PW1 == 0 ? 0.0f : (float)(1 << LO1);
  const float off_sym = MAGIC_F + OFF0 + plane1_f * (MAGIC_F + OFF1);
  float tot[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; r++)
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int e = 0; e < 4; e++) tot[r][mt][e] = 0.0f;

  for (int base = t_begin + warp * UN; base < t_end; base += NW * UN) {
    u32 w0[UN][RT][2][NWD0];
    u32 w1[UN][RT][2][NWD1];
    float s[UN][RT][2];
    int z[UN][RT][2];
    u32 b[UN][KSTEPS][MT][2];
#pragma unroll
    for (int u = 0; u < UN; u++) {
      const int tile = base + u;
      const bool valid = tile < t_end;
#pragma unroll
      for (int r = 0; r < RT; r++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
          const long long row = row0 + 16 * r + 8 * hr + g;
          if (VEC) {
            load_vec<PW0>(w0[u][r][hr], p0 + row * p0_words + (long long)tile * W0 + t * PW0, valid);
            if (PW1 > 0) load_vec<PW0>(w1[u][r][hr], p1 + row * p1_words + (long long)tile * W1 + t * PW0, valid);
          } else {
#pragma unroll
            for (int i = 0; i < NWD0; i++) {
              const int idx = W0 >= 4 ? 4 * i + t : t % W0;
              w0[u][r][hr][i] = valid ? p0[row * p0_words + (long long)tile * W0 + idx] : 0u;
            }
#pragma unroll
            for (int i = 0; i < NWD1; i++) {
              const int idx = W1 >= 4 ? 4 * i + t : t % (W1 > 0 ? W1 : 1);
              w1[u][r][hr][i] = (PW1 > 0 && valid) ? p1[row * p1_words + (long long)tile * W1 + idx] : 0u;
            }
          }
          s[u][r][hr] = valid ? scale_f(sc[(long long)tile * n_pad + row]) : 0.0f;
          z[u][r][hr] = (ASYM && valid) ? (int)zp[(long long)tile * n_pad + row] : 0;
        }
      if (VEC) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int sv = 0; sv < 16 / PW0; sv++) {
            const int m = 8 * mt + g;
            u32 chunk[PW0];
            load_vec<PW0>(chunk, (const u32*)(x + (long long)m * x_stride + tile * BK + 8 * PW0 * sv + 2 * PW0 * t),
                          valid && m < M);
#pragma unroll
            for (int i = 0; i < PW0; i++) b[u][(PW0 * sv + i) / 2][mt][(PW0 * sv + i) % 2] = chunk[i];
          }
      } else {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++)
#pragma unroll
          for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
              const int m = 8 * mt + g;
              const int k = tile * BK + 16 * kk + 8 * hh + 2 * t;
              const bool ok = valid && m < M && (KFULL || k < K);
              b[u][kk][mt][hh] = ok ? *(const u32*)(x + (long long)m * x_stride + k) : 0u;
            }
      }
    }
#pragma unroll
    for (int u = 0; u < UN; u++) {
      float sx[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) sx[mt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) mma(sx[mt], ones, b[u][kk][mt]);
      }
#pragma unroll
      for (int r = 0; r < RT; r++) {
        float acc[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int e = 0; e < 4; e++) acc[mt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
          u32 a[4];
#pragma unroll
          for (int hh = 0; hh < 2; hh++)
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
              const int p = 8 * kk + 4 * hh;  /* + t: this lane's pair of the tile */
              const int i = VEC ? (2 * kk + hh) % PW0 : (W0 >= 4 ? (p % W0) / 4 : 0);
              const int slot = VEC ? (2 * kk + hh) / PW0 : p / W0;
              a[hr + 2 * hh] = mask_or((w0[u][r][hr][i] >> pre0) >> (slot * PW0), mask0, magic0);
            }
#pragma unroll
          for (int mt = 0; mt < MT; mt++) mma(acc[mt], a, b[u][kk][mt]);
          if (PW1 > 0) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++)
#pragma unroll
              for (int hr = 0; hr < 2; hr++) {
                const int p = 8 * kk + 4 * hh;
                const int w1n = W1 > 0 ? W1 : 1;
                const int i = VEC ? (2 * kk + hh) % PW0 : (W1 >= 4 ? (p % w1n) / 4 : 0);
                const int slot = VEC ? (2 * kk + hh) / PW0 : p / w1n;
                a[hr + 2 * hh] = mask_or((w1[u][r][hr][i] >> pre1) >> (slot * PW1), mask1, magic1);
              }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) mma(acc[mt], a, b[u][kk][mt]);
          }
        }
        const float off_lo = off_sym + z[u][r][0], off_hi = off_sym + z[u][r][1];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          tot[r][mt][0] += (acc[mt][0] - off_lo * sx[mt][0]) * s[u][r][0];
          tot[r][mt][1] += (acc[mt][1] - off_lo * sx[mt][1]) * s[u][r][0];
          tot[r][mt][2] += (acc[mt][2] - off_hi * sx[mt][2]) * s[u][r][1];
          tot[r][mt][3] += (acc[mt][3] - off_hi * sx[mt][3]) * s[u][r][1];
        }
      }
    }
  }

  __shared__ float red[NW][RT * 16][MP];
  __shared__ int last;
#pragma unroll
  for (int r = 0; r < RT; r++)
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int e = 0; e < 4; e++) red[warp][16 * r + g + 8 * (e >> 1)][8 * mt + 2 * t + (e & 1)] = tot[r][mt][e];
  __syncthreads();
  const bool split = gridDim.y > 1;
  for (int i = threadIdx.x; i < RT * 16 * MP; i += NW * 32) {
    const int rr = i / MP, m = i % MP, row = row0 + rr;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; w++) v += red[w][rr][m];
    if (split) {
      ws[((long long)blockIdx.y * n_pad + row) * MP + m] = v;
    } else if (m < M && row < N) {
      if (HAS_BIAS) v += to_f(bias[row]);
      y[(long long)m * y_stride + row] = from_f(v);
    }
  }
  if (!split) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&cnt[blockIdx.x], 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < RT * 16 * MP; i += NW * 32) {
    const int rr = i / MP, m = i % MP, row = row0 + rr;
    if (m >= M || row >= N) continue;
    float v = 0.0f;
    for (int sp = 0; sp < (int)gridDim.y; sp++) v += ld_cg(ws + ((long long)sp * n_pad + row) * MP + m);
    if (HAS_BIAS) v += to_f(bias[row]);
    y[(long long)m * y_stride + row] = from_f(v);
  }
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}
"""

SCALE_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# Launch settings by output width (n_pad >= 8192: "wide"): row tiles per warp, warps per block, tiles
# per warp iteration (None: 128 columns' worth) and resident warps wanted per multiprocessor, from
# which the split-K depth follows. The fastest of the H200 sweep (`benchmarks/kernels.py --parts
# gemv`, reports/kernels.md) on 4-bit g128 weights at M=1: 14336x4096 ("wide") and 4096x14336.
LAUNCH = {"wide": {"rt": 1, "nw": 4, "un": 2, "warps_per_sm": 24},
          "narrow": {"rt": 1, "nw": 8, "un": 1, "warps_per_sm": 32}}


def defines(w: WqWeights, fp16: bool, mt: int, rt: int, nw: int, un: int, has_bias: bool) -> dict[str, int]:
    """The compile-time constants of one kernel variant."""
    (lo1, pw1) = PLANES[w.bits][1] if len(PLANES[w.bits]) > 1 else (0, 0)
    return {"BITS": w.bits, "PW0": PLANES[w.bits][0][1], "PW1": pw1, "LO1": lo1, "BK": w.block_k,
            "ASYM": int(w.zeros is not None), "FP16": int(fp16), "SCALE_KIND": SCALE_KINDS[w.scales.dtype],
            "MT": mt, "RT": rt, "NW": nw, "UN": un, "HAS_BIAS": int(has_bias),
            "KFULL": int(w.in_features % w.block_k == 0),
            "VEC": int(w.block_k == 128 and w.in_features % 128 == 0 and (pw1 == 0 or pw1 == PLANES[w.bits][0][1]))}


def source(consts: dict[str, int]) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in consts.items()) + SOURCE


@functools.cache
def available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def supports(x: torch.Tensor, w: WqWeights) -> bool:
    """Shapes this kernel takes (4-byte activation pairs; scales in a 16/32-bit float)."""
    return (x.shape[-1] == w.in_features and x.shape[-1] % 2 == 0 and w.scales.dtype in SCALE_KINDS
            and x.dtype in (torch.float16, torch.bfloat16)
            and x.numel() // max(x.shape[-1], 1) <= MAX_M)


@functools.cache
def _kernel(key: tuple):
    import cupy

    return cupy.RawKernel(source(dict(key)), "wq_gemv", options=("-std=c++17",))


def plan(m: int, w: WqWeights, sms: int, rt: int | None = None, nw: int | None = None, un: int | None = None,
         split: int | None = None, warps_per_sm: int | None = None) -> dict:
    """Launch shape for m rows: RT row tiles per warp, NW warps per block, UN tiles per warp
    iteration, and K split over blocks so that about `warps_per_sm` warps stream per multiprocessor
    (LAUNCH gives what is not passed)."""
    base = LAUNCH["wide" if w.n_pad >= 8192 else "narrow"]
    tiles = w.groups
    rt, nw = rt or base["rt"], nw or base["nw"]
    un = un or base["un"] or max(1, 128 // w.block_k)
    if m > 8 and un > 1:  # two n-tiles double the activation registers: half the tiles in flight
        un //= 2
    row_blocks = w.n_pad // (16 * rt)
    if split is None:
        split = max(1, round((warps_per_sm or base["warps_per_sm"]) * sms / (row_blocks * nw)))
        split = min(split, max(1, tiles // (nw * un)))
    per_split = -(-tiles // split)
    split = -(-tiles // per_split)
    return {"RT": rt, "NW": nw, "UN": un, "split_k": split, "tiles_per_split": per_split}


def gemv(x: torch.Tensor, w: WqWeights, bias: torch.Tensor | None, counters: torch.Tensor,
         config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] (bf16/fp16, at most MAX_M rows) → [..., out_features] in x's dtype."""
    import cupy
    import numpy as np

    from compressor.kernels import splitk

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if w.perm is not None:  # act order: gather the activations once (the weights are stored sorted)
        x2 = x2.index_select(1, w.perm.long())
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # vector loads of activation rows
        x2 = x2.contiguous() if x2.stride(-1) != 1 or x2.stride(0) % 8 else x2.clone()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    m, n = x2.shape[0], w.out_features
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*shape[:-1], n)
    mt = 1 if m <= 8 else 2
    cfg = config or plan(m, w, splitk.sm_count(x.device))
    rt, nw, split = cfg["RT"], cfg["NW"], cfg["split_k"]
    row_blocks = w.n_pad // (16 * rt)
    if split > 1 and row_blocks > counters.numel():
        raise ValueError(f"{row_blocks} row blocks exceed the layer's {counters.numel()} counters")
    ws = splitk.workspace(x.device, split * w.n_pad * 8 * mt) if split > 1 else y
    kernel = _kernel(tuple(defines(w, x.dtype == torch.float16, mt, rt, nw, cfg["UN"], bias is not None).items()))
    planes = w.planes

    def ptr(t):
        return np.uint64(t.data_ptr())

    with cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
        kernel((row_blocks, split), (nw * 32,),
               (ptr(x2), ptr(planes[0]), ptr(planes[-1]), ptr(w.scales),
                ptr(w.zeros if w.zeros is not None else w.scales),
                ptr(bias if bias is not None else y), ptr(y), ptr(ws), ptr(counters),
                np.int32(m), np.int32(n), np.int32(w.in_features), np.int32(w.n_pad), np.int32(w.groups),
                np.int32(cfg["tiles_per_split"]), np.int32(planes[0].shape[1]), np.int32(planes[-1].shape[1]),
                np.int32(x2.stride(0)), np.int32(y.stride(0))))
    return y.reshape(*shape[:-1], n)
