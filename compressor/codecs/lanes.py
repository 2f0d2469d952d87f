"""Entropy coding of byte symbols in independently decodable lanes (tANS, one table per stream).

Geometry. A stream of `count` symbols is cut into chunks of `lanes * steps` symbols. Inside a
chunk, symbol p belongs to lane p % lanes and is that lane's (p // lanes)-th symbol, so at
every step the lanes of a chunk produce `lanes` consecutive outputs: decoders working lane-
parallel (GPU threads, CPU loop iterations) write contiguous memory. Each lane is its own tANS
bitstream: its final encoder state (table_log bits) followed by the bits each symbol emitted,
most significant bit first, in decoding order. Lanes are bit-packed back to back; each chunk
starts on a 32-bit word. Stored per stream: the words, each lane's length in bits (uint16),
and the normalised symbol counts; everything else (chunk and lane offsets, tables) is derived.

Integrity. A decoded lane must end exactly at its recorded length with the tANS state back at
its start value; anything else is reported as a corrupted stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from compressor.codecs import tans

# Per-lane overhead: the final state (table_log bits) and the uint16 length.
LANE_OVERHEAD_BITS = 12 + 16


class CorruptStream(ValueError):
    """A stream's structure or decoded content disagrees with what was recorded."""


@dataclass(frozen=True)
class Layout:
    lanes: int = 128
    steps: int = 2048
    table_log: int = 12

    def as_dict(self) -> dict:
        return {"lanes": self.lanes, "steps": self.steps, "table_log": self.table_log}


@dataclass
class CodedStream:
    words: np.ndarray      # uint32
    lane_bits: np.ndarray  # uint16, one per lane
    norm: np.ndarray       # uint16, tans.ALPHABET normalised counts summing to 2**table_log
    count: int             # symbols

    def nbytes(self) -> int:
        return self.words.nbytes + self.lane_bits.nbytes + self.norm.nbytes


def lane_counts(count: int, layout: Layout) -> np.ndarray:
    """Symbols in each lane (every chunk has `layout.lanes` lanes; the last may hold fewer symbols)."""
    W, K = layout.lanes, layout.steps
    chunks = max(1, math.ceil(count / (W * K)))
    sizes = np.full(chunks, W * K, dtype=np.int64)
    sizes[-1] = count - (chunks - 1) * W * K
    lane = np.arange(W, dtype=np.int64)
    return np.clip(-(-(sizes[:, None] - lane[None, :]) // W), 0, K).reshape(-1)


def lane_starts(lane_bits: np.ndarray, layout: Layout) -> tuple[np.ndarray, int]:
    """Start bit of each lane, and the stream's length in 32-bit words."""
    bits = lane_bits.astype(np.int64).reshape(-1, layout.lanes)
    chunk_words = -(-bits.sum(axis=1) // 32)
    chunk_start = np.concatenate([[0], np.cumsum(chunk_words)[:-1]]) * 32
    inside = np.cumsum(bits, axis=1) - bits
    return (chunk_start[:, None] + inside).reshape(-1), int(chunk_words.sum())


def check_structure(stream: CodedStream, layout: Layout) -> None:
    size = 1 << layout.table_log
    if stream.norm.shape != (tans.ALPHABET,) or int(stream.norm.astype(np.int64).sum()) != size:
        raise CorruptStream("symbol counts do not sum to the table size")
    counts = lane_counts(stream.count, layout)
    if stream.lane_bits.shape != counts.shape:
        raise CorruptStream(f"{stream.lane_bits.size} lane lengths recorded, {counts.size} expected")
    bits = stream.lane_bits.astype(np.int64)
    if (bits < layout.table_log).any() or (bits > layout.table_log * (counts + 1)).any():
        raise CorruptStream("a lane length is impossible for its symbol count")
    _, words = lane_starts(stream.lane_bits, layout)
    if words != stream.words.size:
        raise CorruptStream(f"stream has {stream.words.size} words, lane lengths need {words}")


def estimated_bits(hist: np.ndarray, layout: Layout) -> float:
    """Coded size from the histogram's entropy plus per-lane and table overhead."""
    n = hist.sum()
    p = hist[hist > 0] / n
    lanes = lane_counts(int(n), layout).size
    return float(-(p * np.log2(p)).sum() * n + lanes * LANE_OVERHEAD_BITS + tans.ALPHABET * 16)


# ---------------------------------------------------------------- encoding

def _lane_matrix(symbols: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[steps, lanes] view of a padded stream: column l holds lane l's symbols in order."""
    W, K = layout.lanes, layout.steps
    n = symbols.numel()
    chunks = max(1, math.ceil(n / (W * K)))
    padded = torch.zeros(chunks * W * K, dtype=torch.uint8, device=symbols.device)
    padded[:n] = symbols
    return padded.view(chunks, K, W).permute(1, 0, 2).reshape(K, chunks * W)


def encode(streams: list[torch.Tensor], layout: Layout, norms: list[np.ndarray] | None = None) -> list[CodedStream]:
    """Encode several uint8 symbol streams in one lane-parallel pass (on their device)."""
    if not streams:
        return []
    device = streams[0].device
    R, size = layout.table_log, 1 << layout.table_log
    if norms is None:
        norms = [tans.normalize(torch.bincount(s.long(), minlength=256).cpu().numpy(), R) for s in streams]
    slots, first, shift, norm_all = [], [], [], []
    for i, norm in enumerate(norms):
        sl, fi, sh = tans.encode_tables(norm.astype(np.int64), R)
        slots.append(sl)
        first.append(fi + i * size)
        shift.append(sh)
        norm_all.append(norm.astype(np.int64))

    def cat(parts):
        return torch.from_numpy(np.concatenate(parts)).to(device)

    slots_t, first_t, shift_t, norm_t = cat(slots), cat(first), cat(shift), cat(norm_all)
    mats = [_lane_matrix(s, layout) for s in streams]
    counts = [lane_counts(s.numel(), layout) for s in streams]
    S = torch.cat(mats, dim=1)
    nl = torch.from_numpy(np.concatenate(counts)).to(device)
    table = torch.cat([torch.full((m.shape[1],), i * 256, dtype=torch.int64, device=device)
                       for i, m in enumerate(mats)])
    nlanes = S.shape[1]
    x = torch.full((nlanes,), size, dtype=torch.int64, device=device)
    k_out = torch.zeros(S.shape, dtype=torch.uint8, device=device)
    v_out = torch.zeros(S.shape, dtype=torch.int16, device=device)
    steps = int(nl.max()) if nlanes else 0
    for t in range(steps - 1, -1, -1):
        active = nl > t
        s = S[t].long() + table
        ns, sh = norm_t[s], shift_t[s]
        k = torch.where(active, sh - ((x >> sh) < ns).long(), 0)
        xp = x >> k
        index = torch.where(active, first_t[s] + xp - ns, 0)
        k_out[t] = k
        v_out[t] = (x & ((1 << k) - 1)).to(torch.int16)
        x = torch.where(active, size + slots_t[index], x)
    state = x - size
    lane_bits = R + k_out.sum(dim=0, dtype=torch.int64)

    out: list[CodedStream] = []
    begin = 0
    for stream, m, cnt, norm in zip(streams, mats, counts, norms):
        end = begin + m.shape[1]
        bits_np = lane_bits[begin:end].cpu().numpy()
        starts_np, nwords = lane_starts(bits_np, layout)
        starts = torch.from_numpy(starts_np).to(device)
        words = torch.zeros(nwords + 2, dtype=torch.int64, device=device)
        _put_bits(words, starts, state[begin:end], torch.full_like(starts, R))
        k = k_out[:, begin:end].long()
        offsets = starts + R + torch.cumsum(k, dim=0) - k
        _put_bits(words, offsets.reshape(-1), v_out[:, begin:end].long().reshape(-1) & 0xFFFF, k.reshape(-1))
        out.append(CodedStream(words[:nwords].cpu().numpy().astype(np.uint32), bits_np.astype(np.uint16),
                               norm.astype(np.uint16), stream.numel()))
        begin = end
    return out


def _put_bits(words: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, nbits: torch.Tensor) -> None:
    """OR `values` (nbits wide, MSB first) into the word array at bit `offsets` (bits are disjoint, so add)."""
    b = offsets & 31
    shift = torch.clamp(64 - b - nbits, max=63)
    placed = values << shift
    w = offsets >> 5
    words.index_add_(0, w, (placed >> 32) & 0xFFFFFFFF)
    words.index_add_(0, w + 1, placed & 0xFFFFFFFF)


# ---------------------------------------------------------------- reference decoding

def _read_bits(words: torch.Tensor, pos: torch.Tensor, nbits: torch.Tensor) -> torch.Tensor:
    w = torch.clamp(pos >> 5, max=words.numel() - 2)
    window = (words[w] << 32) | words[w + 1]
    shift = 64 - (pos & 31) - nbits
    return ((window >> 1) >> (shift - 1)) & ((1 << nbits) - 1)


def decode_reference(streams: list[CodedStream], layout: Layout, values: list[np.ndarray],
                     device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Decode several streams lane-parallel with plain torch ops into their 16-bit output
    patterns (int32 tensors); the reference every faster decoder is checked against.
    Raises CorruptStream naming the index of a bad stream."""
    R = layout.table_log
    words_parts, starts_parts, ends_parts, tables, nl_parts, table_ids = [], [], [], [], [], []
    word_base = 0
    for i, st in enumerate(streams):
        try:
            check_structure(st, layout)
        except CorruptStream as exc:
            raise CorruptStream(f"stream {i}: {exc}") from None
        starts, nwords = lane_starts(st.lane_bits, layout)
        starts = starts + word_base * 32
        words_parts.append(st.words.astype(np.int64))
        starts_parts.append(starts)
        ends_parts.append(starts + st.lane_bits.astype(np.int64))
        tables.append(tans.decode_table(st.norm.astype(np.int64), R, values[i]).astype(np.int64))
        counts = lane_counts(st.count, layout)
        nl_parts.append(counts)
        table_ids.append(np.full(counts.size, i << R, dtype=np.int64))
        word_base += nwords
    words = torch.from_numpy(np.concatenate(words_parts + [np.zeros(2, np.int64)])).to(device)
    pos = torch.from_numpy(np.concatenate(starts_parts)).to(device)
    ends = torch.from_numpy(np.concatenate(ends_parts)).to(device)
    table = torch.from_numpy(np.concatenate(tables)).to(device)
    nl = torch.from_numpy(np.concatenate(nl_parts)).to(device)
    tid = torch.from_numpy(np.concatenate(table_ids)).to(device)
    state = _read_bits(words, pos, torch.full_like(pos, R))
    pos = pos + R
    steps = int(nl.max()) if nl.numel() else 0
    out = torch.zeros((layout.steps, nl.numel()), dtype=torch.int32, device=device)
    for t in range(steps):
        active = nl > t
        entry = table[tid + state]
        nb = torch.where(active, (entry >> 16) & 15, 0)
        out[t] = (entry & 0xFFFF).to(torch.int32)
        state = torch.where(active, (entry >> 20) + _read_bits(words, pos, nb), state)
        pos = pos + nb
    bad = (state != 0) | (pos != ends)
    results = []
    begin = 0
    for i, st in enumerate(streams):
        end = begin + nl_parts[i].size
        if bool(bad[begin:end].any()):
            raise CorruptStream(f"stream {i}: decoded lanes do not end where recorded")
        chunk = out[:, begin:end].reshape(layout.steps, -1, layout.lanes).permute(1, 0, 2).reshape(-1)
        results.append(chunk[:st.count].clone())
        begin = end
    return results


# ---------------------------------------------------------------- fastest available

def encode_fast(streams: list[torch.Tensor], layout: Layout, norms: list[np.ndarray]) -> list[CodedStream]:
    """The C encoder where it is available (same bytes as `encode`), else `encode`."""
    from compressor.codecs import native

    lib = native.library()
    if lib is None:
        return encode(streams, layout, norms)
    out = []
    for symbols, norm in zip(streams, norms):
        sym = np.ascontiguousarray(symbols.cpu().numpy(), dtype=np.uint8)
        norm64 = norm.astype(np.int64)
        slots, first, shift = tans.encode_tables(norm64, layout.table_log)
        nlanes = lane_counts(sym.size, layout).size
        lane_bits = np.zeros(nlanes, dtype=np.uint16)
        capacity = (sym.size * layout.table_log + nlanes * layout.table_log) // 32 + nlanes + 2
        words = np.zeros(capacity, dtype=np.uint32)
        n = lib.tans_encode(sym.ctypes.data, sym.size, layout.lanes, layout.steps, layout.table_log,
                            slots.ctypes.data, first.ctypes.data, shift.ctypes.data, norm64.ctypes.data,
                            lane_bits.ctypes.data, words.ctypes.data)
        out.append(CodedStream(words[:n].copy(), lane_bits, norm.astype(np.uint16), sym.size))
    return out


MODE_VALUES, MODE_BYTE, MODE_NIBBLE = 0, 1, 2


def decode_fast(stream: CodedStream, layout: Layout, values: np.ndarray, mode: int = MODE_VALUES,
                raw: np.ndarray | None = None, signs: np.ndarray | None = None) -> np.ndarray:
    """uint16 outputs of one stream, merged with its raw planes: MODE_BYTE adds a byte of
    sign << 7 | 7 low bits per element, MODE_NIBBLE a sign bit and a 4-bit nibble per element."""
    from compressor.codecs import native

    check_structure(stream, layout)
    n = stream.count
    need = {MODE_VALUES: (0, 0), MODE_BYTE: (n, 0), MODE_NIBBLE: ((n + 1) // 2, (n + 7) // 8)}[mode]
    if (raw.size if raw is not None else 0) < need[0] or (signs.size if signs is not None else 0) < need[1]:
        raise CorruptStream("raw planes are shorter than the stream")
    lib = native.library()
    if lib is None:
        v = decode_reference([stream], layout, [values])[0].numpy().astype(np.uint16)
        return merge_planes(v, mode, raw, signs)
    table = tans.decode_table(stream.norm.astype(np.int64), layout.table_log, values)
    out = np.empty(n, dtype=np.uint16)
    words = np.ascontiguousarray(stream.words, dtype=np.uint32)
    lane_bits = np.ascontiguousarray(stream.lane_bits, dtype=np.uint16)
    raw_p = np.ascontiguousarray(raw, dtype=np.uint8).ctypes.data if raw is not None else None
    signs_p = np.ascontiguousarray(signs, dtype=np.uint8).ctypes.data if signs is not None else None
    bad = lib.tans_decode(words.ctypes.data, words.size, lane_bits.ctypes.data, n, layout.lanes, layout.steps,
                          layout.table_log, table.ctypes.data, mode, raw_p, signs_p, out.ctypes.data)
    if bad:
        raise CorruptStream(f"lane {bad - 1} does not end where recorded")
    return out


def merge_planes(v: np.ndarray, mode: int, raw: np.ndarray | None, signs: np.ndarray | None) -> np.ndarray:
    n = v.size
    v = v.astype(np.uint16)
    if mode == MODE_BYTE:
        r = raw[:n].astype(np.uint16)
        return v | ((r & 0x80) << 8) | (r & 0x7F)
    if mode == MODE_NIBBLE:
        nib = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)[:n].astype(np.uint16)
        sign = np.unpackbits(signs, bitorder="little")[:n].astype(np.uint16)
        return v | (sign << 15) | nib
    return v
