"""DFloat-style lossless packing of one tensor: the high bits of each 16-bit word below the sign
(the exponent, optionally with the top mantissa bits) are entropy-coded with a per-tensor tANS
table; the sign and the remaining low mantissa bits are stored raw in planes.

Splits (chosen per tensor by estimated size):
  16-bit floats, low=7: coded = bits 7..14 (bf16: the exponent), raw = one byte (sign << 7 | bits 0..6)
  16-bit floats, low=4: coded = bits 4..14 (exponent + 3 mantissa bits, when at most 256 distinct),
                        raw = a sign-bit plane and a nibble plane (bits 0..3)
  float32: the upper 16 bits as above, the lower 16 bits raw
  anything else (int codes of quantized weights, ...): every byte coded, nothing raw
A tensor whose coded form would not save `min_saving` of its bytes is stored raw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compressor.codecs import lanes, tans
from compressor.codecs.lanes import MODE_BYTE, MODE_NIBBLE, MODE_VALUES, CodedStream, Layout


class PackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # unknown options are errors

    lanes: int = Field(128, ge=8, le=4096, multiple_of=8)  # the GPU decoder keeps per-lane shifts fixed
    steps: int = Field(2048, ge=1, le=5000)  # lane lengths are uint16: steps * table_log + table_log < 65536
    table_log: int = Field(12, ge=8, le=12)
    min_saving: float = Field(0.02, ge=0.0, lt=1.0)

    def layout(self) -> Layout:
        return Layout(self.lanes, self.steps, self.table_log)


@dataclass
class PackedTensor:
    meta: dict                       # dtype, shape, kind ("raw" | "coded"), mode, low, sha256, ...
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(_u8(t.detach().cpu()))).hexdigest()


def _entropy(hist: np.ndarray) -> float:
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


@dataclass
class _Plan:
    symbols: np.ndarray
    values: np.ndarray
    mode: int
    low: int
    planes: dict[str, np.ndarray]
    estimate: float  # bits
    hist: np.ndarray | None = None  # symbol histogram, where the split already counted it


def _plan_16bit(u: np.ndarray, layout: Layout) -> _Plan:
    """Best split of 16-bit words (uint16) into coded high bits and raw planes."""
    from compressor.codecs import native

    lib = native.library()
    u = np.ascontiguousarray(u, dtype=np.uint16)
    n = u.size
    if lib is not None:
        hist4 = np.zeros(1 << 11, dtype=np.int64)
        lib.split16_hist(u.ctypes.data, n, hist4.ctypes.data)
    else:
        hist4 = np.bincount((u >> 4) & 0x7FF, minlength=1 << 11)
    best = None
    for low, hist in ((4, hist4), (7, hist4.reshape(-1, 8).sum(axis=1))):
        present = np.flatnonzero(hist)
        if present.size > tans.ALPHABET:
            continue
        estimate = lanes.estimated_bits(hist[present], layout) + n * (1 + low)
        if best is None or estimate < best[0]:
            best = (estimate, low, present, hist[present])
    estimate, low, present, counts = best
    lut = np.zeros(1 << (15 - low), dtype=np.uint8)
    lut[present] = np.arange(present.size, dtype=np.uint8)
    values = np.zeros(tans.ALPHABET, dtype=np.uint16)
    values[:present.size] = (present << low).astype(np.uint16)
    symbols = np.empty(n, dtype=np.uint8)
    raw = np.empty(n if low == 7 else (n + 1) // 2, dtype=np.uint8)
    signs = np.empty((n + 7) // 8 if low == 4 else 0, dtype=np.uint8)
    if lib is not None:
        lib.split16(u.ctypes.data, n, low, lut.ctypes.data, symbols.ctypes.data, raw.ctypes.data, signs.ctypes.data)
    elif low == 7:
        symbols = lut[(u >> 7) & 0xFF]
        raw = ((u >> 8) & 0x80 | (u & 0x7F)).astype(np.uint8)
    else:
        symbols = lut[(u >> 4) & 0x7FF]
        nib = (u & 15).astype(np.uint8)
        if n % 2:
            nib = np.append(nib, np.uint8(0))
        raw = nib[0::2] | (nib[1::2] << 4)
        signs = np.packbits((u >> 15).astype(np.uint8), bitorder="little")
    planes = {"raw": raw} if low == 7 else {"raw": raw, "signs": signs}
    hist = np.zeros(tans.ALPHABET, dtype=np.int64)
    hist[:present.size] = counts
    return _Plan(symbols, values, MODE_BYTE if low == 7 else MODE_NIBBLE, low, planes, estimate, hist)


def plan(t: torch.Tensor, layout: Layout) -> _Plan:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return _plan_16bit(t.view(torch.int16).numpy().view(np.uint16).reshape(-1), layout)
    if t.dtype == torch.float32:
        u = t.view(torch.int32).numpy().view(np.uint32).reshape(-1)
        p = _plan_16bit((u >> 16).astype(np.uint16), layout)
        low16 = (u & 0xFFFF).astype(np.uint16)
        p.planes["low16"] = low16.view(np.uint8)
        p.estimate += 16 * u.size
        return p
    data = _u8(t)
    hist = np.bincount(data, minlength=256)
    return _Plan(data, np.arange(256, dtype=np.uint16), MODE_VALUES, 0, {},
                 lanes.estimated_bits(hist, layout))


def pack_tensors(tensors: list[torch.Tensor], config: PackConfig) -> list[PackedTensor]:
    """Pack several tensors (encoded together where the torch encoder batches them)."""
    layout = config.layout()
    results: list[PackedTensor | None] = [None] * len(tensors)
    todo = []
    for i, t in enumerate(tensors):
        t = t.detach().contiguous().cpu()
        raw_bytes = t.numel() * t.element_size()
        meta = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": tensor_sha256(t)}
        p = plan(t, layout) if t.numel() else None
        if p is None or p.estimate / 8 > raw_bytes * (1 - config.min_saving):
            results[i] = PackedTensor({**meta, "kind": "raw"}, {"data": _u8(t).copy()})
            continue
        todo.append((i, t, meta, p))
    norms = [tans.normalize(p.hist if p.hist is not None else np.bincount(p.symbols, minlength=256),
                            layout.table_log) for _, _, _, p in todo]
    coded = lanes.encode_fast([torch.from_numpy(p.symbols) for _, _, _, p in todo], layout, norms)
    for (i, t, meta, p), c in zip(todo, coded):
        raw_bytes = t.numel() * t.element_size()
        arrays = {"words": c.words, "lane_bits": c.lane_bits, "norm": c.norm, "values": p.values, **p.planes}
        packed = PackedTensor({**meta, "kind": "coded", "mode": p.mode, "low": p.low, "count": c.count,
                               **layout.as_dict()}, arrays)
        if packed.nbytes() > raw_bytes * (1 - config.min_saving):
            packed = PackedTensor({**meta, "kind": "raw"}, {"data": _u8(t).copy()})
        results[i] = packed
    return results


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise lanes.CorruptStream(f"unknown dtype {name!r}")
    return dtype


def unpack_tensor(p: PackedTensor, verify: bool = True) -> torch.Tensor:
    """The original tensor, bit for bit; CorruptStream if anything disagrees with the record."""
    meta = p.meta
    dtype = _dtype(meta["dtype"])
    shape = [int(s) for s in meta["shape"]]
    numel = int(np.prod(shape)) if shape else 1
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if meta["kind"] == "raw":
        data = p.arrays["data"]
        if data.size != nbytes:
            raise lanes.CorruptStream(f"raw data has {data.size} bytes, {nbytes} expected")
        out = torch.from_numpy(data.copy()).view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    elif meta["kind"] == "coded":
        layout = Layout(int(meta["lanes"]), int(meta["steps"]), int(meta["table_log"]))
        a = p.arrays
        stream = CodedStream(a["words"].view(np.uint32), a["lane_bits"].view(np.uint16), a["norm"].view(np.uint16),
                             int(meta["count"]))
        mode = int(meta["mode"])
        values = a["values"].view(np.uint16)
        if values.shape != (tans.ALPHABET,):
            raise lanes.CorruptStream("symbol value table has the wrong size")
        v = lanes.decode_fast(stream, layout, values, mode, a.get("raw"), a.get("signs"))
        if dtype == torch.float32:
            low16 = a.get("low16")
            if low16 is None or low16.size != 2 * numel or v.size != numel:
                raise lanes.CorruptStream("float32 low halves missing or the wrong size")
            u = (v.astype(np.uint32) << 16) | low16.view(np.uint16).astype(np.uint32)
            out = torch.from_numpy(u.view(np.int32).copy()).view(torch.float32).reshape(shape)
        elif dtype in (torch.bfloat16, torch.float16):
            if v.size != numel:
                raise lanes.CorruptStream(f"stream holds {v.size} values, {numel} expected")
            out = torch.from_numpy(v.view(np.int16)).view(dtype).reshape(shape)
        else:
            if v.size != nbytes:
                raise lanes.CorruptStream(f"stream holds {v.size} bytes, {nbytes} expected")
            out = torch.from_numpy(v.astype(np.uint8)).view(dtype).reshape(shape)
    else:
        raise lanes.CorruptStream(f"unknown kind {meta['kind']!r}")
    if verify and tensor_sha256(out) != meta["sha256"]:
        raise lanes.CorruptStream("decoded bytes do not match the recorded sha256")
    return out
