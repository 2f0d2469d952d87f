"""Split-K in one launch: every K-slice of an output tile writes its fp32 partial to a workspace,
and the slice that finishes last (a per-tile counter) sums the partials in slice order, adds the
bias, writes the output and resets the counter for the next launch. Deterministic (fixed
summation order) and no extra kernel to zero or cast, which matters inside CUDA graphs where a
dependent launch costs microseconds.

The workspace is shared by every layer on a device (layers run one after another on a stream);
each layer keeps its own counters, which the kernel leaves at zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_WORKSPACES: dict[torch.device, torch.Tensor] = {}
_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def split_for(units: int, wanted: int) -> int:
    """The divisor of `units` nearest to `wanted` (every K-slice gets the same number of units)."""
    divisors = [d for d in range(1, units + 1) if units % d == 0]
    return min(divisors, key=lambda d: (abs(d - max(wanted, 1)), -d))


def tile_table(*rows: tuple[int, int, int, int, int, int]) -> list[tuple[int, dict]]:
    """A launch table from rows (up to M rows, BM, BN, warps, stages, programs per SM), first match wins."""
    return [(limit, {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages, "per_sm": per_sm})
            for limit, bm, bn, warps, stages, per_sm in rows]


def plan(table: list[tuple[int, dict]], m: int, n_pad: int, units: int, sms: int, split: int | None = None,
         **override) -> dict:
    """Launch settings for m activation rows: the tile shape of the first `table` entry whose limit
    is at least m (fields replaced by `override`), and K cut into slices of whole units (groups or
    K tiles) so that every multiprocessor gets about the entry's `per_sm` programs (or `split` slices)."""
    cfg = {**next(c for limit, c in table if m <= limit), **override}
    tiles = (n_pad // cfg["BN"]) * -(-m // cfg["BM"])
    slices = split_for(units, split or -(-cfg["per_sm"] * sms // tiles))
    return {**cfg, "split_k": slices, "units_per_split": units // slices}


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    """fp32 scratch of at least `numel` elements on `device` (grown, never shrunk). Allocate
    before capturing a CUDA graph: the launchers call this on their first (warm-up) run."""
    ws = _WORKSPACES.get(device)
    if ws is None or ws.numel() < numel:
        ws = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
        _WORKSPACES[device] = ws
    return ws


@triton.jit
def store_output(tot, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rn, rm, N, M, stride_ym, n_pad, m_pad,
                 pid_n, pid_m, pid_k, num_pid_n, SPLIT_K, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 OUT_DT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """`tot` is this program's fp32 [BN, BM] tile of the transposed output (rows n, columns m)."""
    y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    y_mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT:
        tile = rm[None, :].to(tl.int64) * n_pad + rn[:, None]
        slice_elems = m_pad.to(tl.int64) * n_pad
        tl.store(ws_ptr + pid_k * slice_elems + tile, tot)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        counter = cnt_ptr + pid_m * num_pid_n + pid_n
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            total = tl.zeros((BN, BM), tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(ws_ptr + s * slice_elems + tile, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, total.to(OUT_DT), mask=y_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            tot += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, tot.to(OUT_DT), mask=y_mask)
