"""The decode GEMV's CUDA source (kernels/wq_gemv.py), run on the CPU: the same source is compiled
by the host C++ compiler with a shim that runs every thread of a block as an OS thread, gives
warps their mma.m16n8k16 through a barrier (fragments exchanged as the PTX ISA lays them out)
and emulates the 16-bit conversions. So the index arithmetic, the dequantization, the split-K
reduction and the output all run as written, against float64 arithmetic on the same codes.
The GPU test (test_kernels_gpu.py) runs the compiled kernel itself."""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess

import pytest
import torch

from compressor.kernels import wq_gemv, wq_layout
from compressor.schemes import dequantize

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to emulate the kernel")

SHIM = r"""
#define GEMV_EMULATED 1
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
struct D3 { unsigned x = 0, y = 0, z = 0; };
static thread_local D3 threadIdx, blockIdx;
static D3 gridDim, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__
#define __shared__ static
using std::min;
static std::barrier<>* block_bar;
static std::barrier<>* warp_bar[64];
struct Frag { unsigned a[4]; unsigned b[2]; };
static Frag frags[64][32];
static inline void __syncthreads() { block_bar->arrive_and_wait(); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline float __int_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline float h2f(unsigned short h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
static inline unsigned short f2h(float f) { _Float16 v = (_Float16)f; unsigned short h; memcpy(&h, &v, 2); return h; }
static inline float b2f(unsigned short h) { return __int_as_float(((unsigned)h) << 16); }
static inline unsigned short f2b(float f) {
  unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (unsigned short)(u >> 16);
}
static inline float half_val(unsigned w, int hi) {
  unsigned short h = (unsigned short)(w >> (16 * hi));
  return FP16 ? h2f(h) : b2f(h);
}
static inline void mma(float* c, const unsigned* a, const unsigned* b) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  memcpy(frags[warp][lane].a, a, 16); memcpy(frags[warp][lane].b, b, 8);
  warp_bar[warp]->arrive_and_wait();
  for (int e = 0; e < 4; e++) {
    int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float s = 0;
    for (int k = 0; k < 16; k++) {
      unsigned ar = frags[warp][4 * (row % 8) + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)];
      unsigned br = frags[warp][4 * col + (k % 8) / 2].b[k >= 8];
      s += half_val(ar, k & 1) * half_val(br, k & 1);
    }
    c[e] += s;
  }
  warp_bar[warp]->arrive_and_wait();
}
static inline unsigned mask_or(unsigned a, unsigned b, unsigned c) { return (a & b) | c; }
static inline float ld_cg(const float* p) { return *(volatile const float*)p; }
"""

LAUNCH = r"""
extern "C" void launch(int gx, int gy, int threads, const void* x, const void* p0, const void* p1, const void* sc,
                       const void* zp, const void* bias, void* y, float* ws, int* cnt, int M, int N, int K, int n_pad,
                       int tiles, int per_split, int p0w, int p1w, int xs, int ys) {
  gridDim = {(unsigned)gx, (unsigned)gy, 1};
  blockDim = {(unsigned)threads, 1, 1};
  for (int by = 0; by < gy; by++)
    for (int bx = 0; bx < gx; bx++) {
      std::barrier<> bar(threads);
      block_bar = &bar;
      for (int w = 0; w < threads / 32; w++) warp_bar[w] = new std::barrier<>(32);
      std::vector<std::thread> pool;
      for (int i = 0; i < threads; i++)
        pool.emplace_back([=] {
          threadIdx = {(unsigned)i, 0, 0};
          blockIdx = {(unsigned)bx, (unsigned)by, 0};
          wq_gemv((const u16*)x, (const u32*)p0, (const u32*)p1, (const scale_t*)sc, (const signed char*)zp,
                  (const u16*)bias, (u16*)y, ws, cnt, M, N, K, n_pad, tiles, per_split, p0w, p1w, xs, ys);
        });
      for (auto& th : pool) th.join();
      for (int w = 0; w < threads / 32; w++) delete warp_bar[w];
    }
}
"""


def emulated(consts: dict, tmp_path_factory) -> ctypes.CDLL:
    src = "".join(f"#define {k} {v}\n" for k, v in consts.items()) + SHIM + wq_gemv.SOURCE + LAUNCH
    root = tmp_path_factory.getbasetemp()
    lib = root / f"gemv_{hashlib.sha1(src.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        (root / "gemv.cpp").write_text(src)
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(lib),
                        str(root / "gemv.cpp")], check=True)
    return ctypes.CDLL(str(lib))


def run_emulated(lib, x: torch.Tensor, w: wq_layout.WqWeights, bias, cfg: dict, mt: int) -> torch.Tensor:
    m, n = x.shape[0], w.out_features
    y = torch.full((m, n), float("nan"), dtype=x.dtype)
    ws = torch.zeros(cfg["split_k"] * w.n_pad * 8 * mt, dtype=torch.float32)
    cnt = torch.zeros(4096, dtype=torch.int32)
    planes = w.planes
    zeros = w.zeros if w.zeros is not None else w.scales

    def p(t):
        return ctypes.c_void_p(t.data_ptr())

    lib.launch(w.n_pad // (16 * cfg["RT"]), cfg["split_k"], cfg["NW"] * 32, p(x), p(planes[0]), p(planes[-1]),
               p(w.scales), p(zeros), p(bias if bias is not None else y), p(y), p(ws), p(cnt), m, n, w.in_features,
               w.n_pad, w.groups, cfg["tiles_per_split"], planes[0].shape[1], planes[-1].shape[1], x.stride(0),
               y.stride(0))
    assert int(cnt.abs().sum()) == 0, "split-K counters must be left at zero"
    return y


# bits, group, asymmetric, dtype, scale dtype, M, N, K, (RT, NW, UN, split); each case compiles the
# source (seconds), so the default suite runs the first five and the rest are marked slow.
CASES = [
    (4, 128, False, torch.bfloat16, torch.float16, 1, 256, 512, (2, 4, 1, 2)),
    (4, 64, True, torch.float16, torch.float16, 3, 200, 960, (1, 2, 2, 1)),
    (4, 32, False, torch.bfloat16, torch.bfloat16, 9, 128, 256, (1, 2, 4, 3)),
    (3, 128, False, torch.bfloat16, torch.float16, 1, 128, 640, (2, 2, 1, 2)),
    (2, 128, True, torch.bfloat16, torch.bfloat16, 3, 128, 384, (1, 2, 2, 1)),
    pytest.param((3, 32, True, torch.bfloat16, torch.float32, 4, 96, 320, (1, 2, 2, 1)), marks=pytest.mark.slow),
    pytest.param((2, 64, True, torch.float16, torch.float16, 16, 160, 384, (1, 4, 1, 2)), marks=pytest.mark.slow),
    pytest.param((2, 32, False, torch.bfloat16, torch.float16, 2, 128, 256, (2, 1, 1, 1)), marks=pytest.mark.slow),
    pytest.param((8, -1, True, torch.bfloat16, torch.float16, 1, 136, 300, (1, 2, 1, 1)), marks=pytest.mark.slow),
    pytest.param((8, 128, False, torch.float16, torch.bfloat16, 5, 128, 512, (2, 2, 2, 2)), marks=pytest.mark.slow),
    pytest.param((5, 64, False, torch.bfloat16, torch.float16, 1, 128, 256, (1, 2, 1, 1)), marks=pytest.mark.slow),
    pytest.param((6, 32, True, torch.float16, torch.float16, 2, 64, 128, (1, 1, 2, 1)), marks=pytest.mark.slow),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def case_id(c) -> str:
    return f"w{c[0]}-g{c[1]}-{'asym' if c[2] else 'sym'}-m{c[5]}-{c[6]}x{c[7]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(getattr(c, "values", [c])[0]) for c in CASES])
def test_emulated_gemv_matches_float64(case, tmp_path_factory):
    bits, group, asym, dtype, sdtype, m, n, k, (rt, nw, un, split) = case
    g = torch.Generator().manual_seed(bits * 100 + m)
    groups = 1 if group <= 0 else k // group
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(sdtype)
    zero = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, groups), generator=g,
                         dtype=torch.int8) if asym else None
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if split == 1 else None
    w = wq_layout.repack(codes, scale, zero, bits, group)
    cfg = wq_gemv.plan(m, w, 132, rt=rt, nw=nw, un=un, split=split)
    assert cfg["split_k"] == split
    mt = 1 if m <= 8 else 2
    lib = emulated(wq_gemv.defines(w, dtype == torch.float16, mt, rt, nw, un, bias is not None), tmp_path_factory)
    y = run_emulated(lib, x, w, bias, cfg, mt)
    exact = x.double() @ dequantize(codes, scale, zero, None, torch.float64).T
    if bias is not None:
        exact += bias.double()
    assert not torch.isnan(y).any()
    reference = torch.nn.functional.linear(x.float(), dequantize(codes, scale, zero, None, dtype).float(),
                                           bias.float() if bias is not None else None).to(dtype)
    assert rel(y, exact) <= max(2 * rel(reference, exact), 2e-3), (rel(y, exact), rel(reference, exact))


def test_plan_fills_the_gpu_and_covers_every_tile():
    codes = torch.zeros(4096, 14336, dtype=torch.int8)
    w = wq_layout.repack(codes, torch.ones(4096, 112, dtype=torch.float16), None, 4, 128)
    cfg = wq_gemv.plan(1, w, 132)
    assert cfg["split_k"] > 1 and cfg["split_k"] * cfg["tiles_per_split"] >= w.groups
    assert (cfg["split_k"] - 1) * cfg["tiles_per_split"] < w.groups  # no empty split
    wide = wq_layout.repack(torch.zeros(14336, 4096, dtype=torch.int8), torch.ones(14336, 32, dtype=torch.float16),
                            None, 4, 128)
    assert wq_gemv.plan(1, wide, 132)["split_k"] <= cfg["split_k"]
