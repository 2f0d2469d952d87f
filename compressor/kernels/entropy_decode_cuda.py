"""The same lane decoder as entropy_decode.py, as a CUDA kernel compiled at run time by CuPy
(NVRTC), with each block's decode table staged in shared memory.

Why a second GPU backend: the table lookup is a random gather (one of 4096 entries per lane
and step). From global memory (what Triton can express) a warp's 32 lookups touch ~28
different cache lines, and the L1 wavefronts this costs bound the Triton kernel; from shared
memory they cost a few bank conflicts. CuPy is optional: without it the Triton kernel (and
without a GPU the torch reference) decodes the same plans.
"""

from __future__ import annotations

import torch

from compressor.kernels.entropy_decode import DecodePlan

_SOURCE = r"""
extern "C" __global__ void tans_decode_smem(
    const unsigned int* __restrict__ words, const unsigned int* __restrict__ table,
    const unsigned char* __restrict__ raw, const unsigned char* __restrict__ signs, short* __restrict__ out,
    const long long* __restrict__ lpos, const long long* __restrict__ lout, const long long* __restrict__ lraw,
    const long long* __restrict__ lsign, const int* __restrict__ ln, const int* __restrict__ ltab,
    int n_lanes, int stride, int R, int mode)
{
    extern __shared__ unsigned int stab[];
    int lane0 = blockIdx.x * blockDim.x;
    int lane = lane0 + threadIdx.x;
    int tsize = 1 << R;
    int tab0 = ltab[lane0];  /* blockDim divides the lanes of a chunk: one table per block */
    for (int i = threadIdx.x; i < tsize; i += blockDim.x) stab[i] = table[tab0 + i];
    __syncthreads();
    if (lane >= n_lanes) return;
    long long start = lpos[lane];
    const unsigned int* wp = words + (start >> 5);
    int off = (int)(start & 31);
    unsigned long long buf = ((((unsigned long long)wp[0]) << 32) | wp[1]) << off;
    int cnt = 64 - off;
    wp += 2;
    unsigned int state = (unsigned int)(buf >> (64 - R));
    buf <<= R;
    cnt -= R;
    int n = ln[lane];
    short* op = out + lout[lane];
    long long k0 = lraw[lane];
    const unsigned char* rp;
    const unsigned char* sp;
    int rsh, ssh;
    if (mode == 1) { rp = raw + k0; rsh = 0; sp = signs; ssh = 0; }
    else { rp = raw + (k0 >> 1); rsh = (int)(k0 & 1) * 4; long long s0 = lsign[lane]; sp = signs + (s0 >> 3); ssh = (int)(s0 & 7); }
    int rstep = mode == 1 ? stride : stride >> 1, sstep = stride >> 3;
    for (int t = 0; t < n; t++) {
        if (cnt < 32) { buf |= ((unsigned long long)(*wp++)) << (32 - cnt); cnt += 32; }
        unsigned int e = stab[state];
        unsigned int nb = (e >> 16) & 15;
        state = (e >> 20) + (unsigned int)((buf >> 1) >> (63 - nb));
        buf <<= nb;
        cnt -= nb;
        unsigned int v = e & 0xFFFF;
        if (mode == 1) { unsigned int r = rp[(long long)t * rstep]; v |= ((r & 0x80) << 8) | (r & 0x7F); }
        else {
            unsigned int nib = (rp[(long long)t * rstep] >> rsh) & 15;
            unsigned int sg = (sp[(long long)t * sstep] >> ssh) & 1;
            v |= (sg << 15) | nib;
        }
        op[(long long)t * stride] = (short)v;
    }
}
"""
# A variant that prefetched each lane's next word and the next raw planes measured no faster on
# an H100 (509-519 vs 519-529 GB/s; benchmarks/results/lossless_gpu.json): memory latency is not
# what bounds this kernel, so only this one is kept.
_KERNELS: dict = {}


def available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kernel(name: str):
    if name not in _KERNELS:
        import cupy

        _KERNELS[name] = cupy.RawKernel(_SOURCE, name, options=("-std=c++14",))
    return _KERNELS[name]


def decode_cuda(plan: DecodePlan, out: torch.Tensor, block: int = 64, kernel: str = "tans_decode_smem") -> None:
    """Fill `out` (int16 view of the 16-bit float buffer) on the current torch stream."""
    import cupy
    import numpy as np

    if plan.stride % block or plan.stride % 8:
        raise ValueError("block must divide the lanes per chunk, which must be a multiple of 8")
    kernel = _kernel(kernel)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    tsize = 1 << plan.table_log

    def ptr(t):
        return np.uint64(t.data_ptr())

    with stream:
        for ls in plan.lanes:
            n_lanes = ls.pos.numel()
            kernel(((n_lanes + block - 1) // block,), (block,),
                   (ptr(plan.words), ptr(plan.table), ptr(plan.raw), ptr(plan.signs), ptr(out), ptr(ls.pos),
                    ptr(ls.out), ptr(ls.raw), ptr(ls.sign), ptr(ls.n), ptr(ls.tab), np.int32(n_lanes),
                    np.int32(plan.stride), np.int32(plan.table_log), np.int32(ls.mode)),
                   shared_mem=tsize * 4)
