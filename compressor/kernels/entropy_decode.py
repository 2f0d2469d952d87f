"""Decoding packed 16-bit float tensors into a preallocated buffer, lane-parallel.

A DecodePlan describes a set of tANS streams (one per tensor; see codecs/lanes.py
for the geometry) as flat per-lane arrays on the target device, so one launch decodes every
tensor of, say, a decoder block: lane g starts reading at bit `lane_pos[g]` of the
concatenated words, uses the table at `lane_tab[g]`, and writes `lane_n[g]` outputs at
`lane_out[g] + t * stride`, merging the raw planes at `lane_raw[g]` (+ `lane_sign[g]`).

Backends: `triton` (a GPU kernel: one program per chunk of `stride` lanes, so every step
stores `stride` consecutive bf16 values), and `torch` (the same algorithm in plain tensor
ops, any device; the reference the kernel is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODE_BYTE, MODE_NIBBLE = 1, 2


@dataclass
class LaneSet:
    mode: int
    pos: torch.Tensor    # int64 start bit of each lane (the state comes first)
    out: torch.Tensor    # int64 output index of each lane's first value
    raw: torch.Tensor    # int64 index of its first raw element (byte, or nibble) in `raw`
    sign: torch.Tensor   # int64 index of its first sign bit in `signs`
    n: torch.Tensor      # int32 values in each lane
    tab: torch.Tensor    # int32 offset of its table in `table`
    max_steps: int


@dataclass
class DecodePlan:
    words: torch.Tensor   # int32 (uint32 bit patterns), padded with two zero words
    table: torch.Tensor   # int32 decode-table entries, 2**table_log per stream
    raw: torch.Tensor     # uint8: raw byte planes and nibble planes
    signs: torch.Tensor   # uint8: sign bit planes
    lanes: list[LaneSet]
    stride: int           # lanes per chunk
    table_log: int
    numel: int            # outputs written (sum of the streams' counts)

    def nbytes(self) -> int:
        extra = sum(ls.pos.numel() * 40 for ls in self.lanes)
        return self.words.numel() * 4 + self.table.numel() * 4 + self.raw.numel() + self.signs.numel() + extra


@dataclass
class StreamSpec:
    """One coded stream as the plan builder needs it (numpy arrays from the container)."""
    words: np.ndarray      # uint32
    lane_bits: np.ndarray  # uint16
    table: np.ndarray      # uint32 decode table (values already shifted into place)
    count: int
    mode: int
    raw: np.ndarray        # uint8
    signs: np.ndarray      # uint8 (empty for MODE_BYTE)
    out_offset: int        # where its first value goes in the output buffer
    lanes: int
    steps: int
    table_log: int


def _lane_starts(lane_bits: np.ndarray, lanes: int) -> tuple[np.ndarray, int]:
    bits = lane_bits.astype(np.int64).reshape(-1, lanes)
    chunk_words = -(-bits.sum(axis=1) // 32)
    chunk_start = np.concatenate([[0], np.cumsum(chunk_words)[:-1]]) * 32
    return (chunk_start[:, None] + np.cumsum(bits, axis=1) - bits).reshape(-1), int(chunk_words.sum())


def build_plan(specs: list[StreamSpec], device: str | torch.device) -> DecodePlan:
    if not specs:
        raise ValueError("nothing to decode")
    lanes, table_log = specs[0].lanes, specs[0].table_log
    if any(s.lanes != lanes or s.table_log != table_log for s in specs):
        raise ValueError("streams of one plan must share lanes and table_log")
    words, tables, raws, signs = [], [], [], []
    per_mode: dict[int, dict[str, list]] = {}
    word_base = raw_base = sign_base = 0
    for i, s in enumerate(specs):
        starts, nwords = _lane_starts(s.lane_bits, lanes)
        if nwords != s.words.size:
            raise ValueError(f"stream {i}: {s.words.size} words, lane lengths need {nwords}")
        g = np.arange(s.lane_bits.size, dtype=np.int64)
        local = (g // lanes) * lanes * s.steps + g % lanes
        chunk = lanes * s.steps
        size = np.minimum(chunk, s.count - (g // lanes) * chunk)
        n = np.clip(-(-(size - g % lanes) // lanes), 0, s.steps)
        d = per_mode.setdefault(s.mode, {k: [] for k in ("pos", "out", "raw", "sign", "n", "tab")})
        d["pos"].append(starts + word_base * 32)
        d["out"].append(local + s.out_offset)
        d["raw"].append(local + (raw_base if s.mode == MODE_BYTE else raw_base * 2))
        d["sign"].append(local + sign_base * 8)
        d["n"].append(n.astype(np.int32))
        d["tab"].append(np.full(g.size, i << table_log, dtype=np.int32))
        words.append(s.words.view(np.int32))
        tables.append(s.table.view(np.int32))
        raws.append(s.raw)
        signs.append(s.signs)
        word_base += nwords
        raw_base += s.raw.size
        sign_base += s.signs.size

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    lane_sets = []
    for mode, d in sorted(per_mode.items()):
        n = np.concatenate(d["n"])
        lane_sets.append(LaneSet(mode, *(dev(np.concatenate(d[k])) for k in ("pos", "out", "raw", "sign")),
                                 dev(n), dev(np.concatenate(d["tab"])), int(n.max()) if n.size else 0))
    pad = np.zeros(max(s.steps for s in specs) * table_log // 32 + 4, np.int32)  # no read can leave the buffer
    return DecodePlan(dev(np.concatenate(words + [pad])), dev(np.concatenate(tables)),
                      dev(np.concatenate(raws + [np.zeros(1, np.uint8)])),
                      dev(np.concatenate(signs + [np.zeros(1, np.uint8)])), lane_sets, lanes, table_log,
                      sum(s.count for s in specs))


# ---------------------------------------------------------------- torch reference

def _read_bits(words: torch.Tensor, pos: torch.Tensor, nbits: torch.Tensor) -> torch.Tensor:
    w = torch.clamp(pos >> 5, max=words.numel() - 2)
    window = ((words[w].long() & 0xFFFFFFFF) << 32) | (words[w + 1].long() & 0xFFFFFFFF)
    shift = 64 - (pos & 31) - nbits
    return ((window >> 1) >> (shift - 1)) & ((1 << nbits) - 1)


def decode_torch(plan: DecodePlan, out: torch.Tensor) -> None:
    """Reference decoder: fills `out` (int16 view of the 16-bit float buffer)."""
    R = plan.table_log
    table = plan.table.long() & 0xFFFFFFFF
    raw, signs = plan.raw.long(), plan.signs.long()
    for ls in plan.lanes:
        pos = ls.pos.clone()
        state = _read_bits(plan.words, pos, torch.full_like(pos, R))
        pos = pos + R
        n, tab = ls.n.long(), ls.tab.long()
        for t in range(ls.max_steps):
            active = n > t
            e = table[tab + state]
            nb = torch.where(active, (e >> 16) & 15, 0)
            v = e & 0xFFFF
            state = torch.where(active, (e >> 20) + _read_bits(plan.words, pos, nb), state)
            pos = pos + nb
            step = t * plan.stride
            if ls.mode == MODE_BYTE:
                r = raw[torch.where(active, ls.raw + step, 0)]
                v = v | ((r & 0x80) << 8) | (r & 0x7F)
            else:
                k = torch.where(active, ls.raw + step, 0)
                s = torch.where(active, ls.sign + step, 0)
                v = v | (((signs[s >> 3] >> (s & 7)) & 1) << 15) | ((raw[k >> 1] >> ((k & 1) * 4)) & 15)
            idx = ls.out[active] + step
            out[idx] = (v[active] & 0xFFFF).to(torch.int32).to(torch.int16)


# ---------------------------------------------------------------- triton

try:  # Triton is optional: without it (or without a GPU) the torch reference decodes
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    @triton.jit
    def decode_kernel(words_ptr, table_ptr, raw_ptr, sign_ptr, out_ptr, pos_ptr, lout_ptr, lraw_ptr, lsign_ptr,
                      n_ptr, tab_ptr, n_lanes, max_steps,
                      STRIDE: tl.constexpr, R: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = lane < n_lanes
        start = tl.load(pos_ptr + lane, mask=valid, other=0)
        wptr = words_ptr + (start >> 5)          # each lane reads its own words, through a bit buffer
        off = (start & 31).to(tl.uint64)
        w0 = tl.load(wptr, mask=valid, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w1 = tl.load(wptr + 1, mask=valid, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        buf = ((w0 << 32) | w1) << off           # valid bits left-aligned
        cnt = (64 - off).to(tl.int32)
        wi = tl.full([BLOCK], 2, tl.int32)
        optr = out_ptr + tl.load(lout_ptr + lane, mask=valid, other=0)
        tptr = table_ptr + tl.load(tab_ptr + lane, mask=valid, other=0)
        n = tl.load(n_ptr + lane, mask=valid, other=0)
        k0 = tl.load(lraw_ptr + lane, mask=valid, other=0)
        if MODE == 1:
            rptr = raw_ptr + k0
            rsh = tl.zeros([BLOCK], tl.int32)
            sptr = sign_ptr + tl.zeros([BLOCK], tl.int64)
            ssh = rsh
        else:  # a nibble and a sign bit per value; STRIDE % 8 == 0 keeps each lane's shifts fixed
            rptr = raw_ptr + (k0 >> 1)
            rsh = ((k0 & 1) * 4).to(tl.int32)
            s0 = tl.load(lsign_ptr + lane, mask=valid, other=0)
            sptr = sign_ptr + (s0 >> 3)
            ssh = (s0 & 7).to(tl.int32)
        state = (buf >> (64 - R)).to(tl.int32)
        buf = buf << R
        cnt = cnt - R
        for t in range(0, max_steps):
            active = t < n
            # refill: after it at least 32 bits are buffered, and a step takes at most 15
            need = (cnt < 32) & active
            w = tl.load(wptr + wi, mask=need, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
            buf = tl.where(need, buf | (w << (32 - cnt).to(tl.uint64)), buf)
            cnt = tl.where(need, cnt + 32, cnt)
            wi = tl.where(need, wi + 1, wi)
            e = tl.load(tptr + state, mask=active, other=0)
            nb = tl.where(active, (e >> 16) & 15, 0)
            nb64 = nb.to(tl.uint64)
            state = tl.where(active, ((e >> 20) & 0xFFF) + ((buf >> 1) >> (63 - nb64)).to(tl.int32), state)
            buf = buf << nb64
            cnt = cnt - nb
            v = e & 0xFFFF
            if MODE == 1:
                r = tl.load(rptr + t * STRIDE, mask=active, other=0).to(tl.int32)
                v = v | ((r & 0x80) << 8) | (r & 0x7F)
            else:
                nib = (tl.load(rptr + t * (STRIDE // 2), mask=active, other=0).to(tl.int32) >> rsh) & 15
                sg = (tl.load(sptr + t * (STRIDE // 8), mask=active, other=0).to(tl.int32) >> ssh) & 1
                v = v | (sg << 15) | nib
            tl.store(optr + t * STRIDE, v.to(tl.int16), mask=active)


def decode_triton(plan: DecodePlan, out: torch.Tensor, block: int | None = None, num_warps: int = 4) -> None:
    """GPU decoder: fills `out` (int16 view of the 16-bit float buffer) in one launch per raw-plane mode."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if plan.stride % 8:
        raise ValueError("the triton decoder needs lanes per chunk divisible by 8")
    kernel = decode_kernel
    block = block or plan.stride
    for ls in plan.lanes:
        n_lanes = ls.pos.numel()
        grid = (-(-n_lanes // block),)
        kernel[grid](plan.words, plan.table, plan.raw, plan.signs, out, ls.pos, ls.out, ls.raw, ls.sign, ls.n, ls.tab,
                     n_lanes, ls.max_steps, STRIDE=plan.stride, R=plan.table_log, MODE=ls.mode,
                     BLOCK=block, num_warps=num_warps)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def decode(plan: DecodePlan, out: torch.Tensor, backend: str = "auto") -> None:
    if backend == "auto":
        backend = "triton" if out.is_cuda and triton_available() else "torch"
    if backend == "cuda":
        from compressor.kernels.entropy_decode_cuda import decode_cuda

        decode_cuda(plan, out)
        return
    (decode_triton if backend == "triton" else decode_torch)(plan, out)
