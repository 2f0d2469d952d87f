"""Reading safetensors headers directly: structure checks and per-tensor byte ranges.

The safetensors library trusts sizes it cannot see; this module checks that every tensor's
byte range lies inside the file and matches its dtype and shape, so a truncated or damaged
file is reported by name before anything is loaded, and tensors can be hashed in place.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries and metadata of a safetensors file; CompressorError if it is damaged."""
    path = Path(path)
    fix = "re-download or re-create the file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CompressorError(f"{path} is truncated ({size} bytes, no safetensors header)", fix)
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CompressorError(f"{path} is truncated or not a safetensors file (header length {header_len})", fix)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CompressorError(f"{path} has a corrupted safetensors header", fix) from None
    if not isinstance(header, dict):
        raise CompressorError(f"{path} has a corrupted safetensors header", fix)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CompressorError(f"{path}: tensor {name!r} has a corrupted header entry", fix) from None
        if end - begin != expected or begin < 0:
            raise CompressorError(f"{path}: tensor {name!r} has inconsistent size in its header", fix)
        if data_start + end > size:
            raise CompressorError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}", fix)
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    return entries, metadata


def tensor_bytes(path: Path, entry: TensorEntry) -> bytes:
    with open(path, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.end - entry.start)
