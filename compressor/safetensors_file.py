"""Reading safetensors headers directly: structure checks and per-tensor byte ranges.

The safetensors library trusts sizes it cannot see; this module checks that every tensor's
byte range lies inside the file and matches its dtype and shape, so a truncated or damaged
file is reported by name before anything is loaded, and tensors can be hashed in place.
"""

from __future__ import annotations

import hashlib
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


def header_bytes(path: Path) -> bytes:
    """The length prefix and JSON header of a safetensors file, as stored."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CompressorError(f"{path} is truncated (no safetensors header)", "re-download or re-create the file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER:
            raise CompressorError(f"{path} is not a safetensors file (header length {header_len})",
                                  "re-download or re-create the file")
        return raw + f.read(header_len)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries and metadata of a safetensors file; CompressorError if it is damaged.

    Checked as the safetensors format requires: known dtypes, shapes of non-negative integers,
    byte ranges that match dtype × shape and tile the data section exactly (no gaps, overlaps
    or trailing bytes), metadata of strings. So every byte of the file is accounted for, and
    nothing allocated from a header can exceed the file's own size.
    """
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise CompressorError(f"{path} has a corrupted safetensors header", fix) from None
    if not isinstance(header, dict):
        raise CompressorError(f"{path} has a corrupted safetensors header", fix)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CompressorError(f"{path} has corrupted safetensors metadata (it must map strings to strings)", fix)
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            valid = (isinstance(dtype, str) and dtype in DTYPE_BYTES and isinstance(shape, list)
                     and all(_is_count(d) for d in shape) and isinstance(offsets, list) and len(offsets) == 2
                     and all(_is_count(o) for o in offsets))
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise CompressorError(f"{path}: tensor {name!r} has a corrupted header entry "
                                  "(dtype, shape of non-negative integers, two byte offsets)", fix)
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CompressorError(f"{path}: tensor {name!r} has inconsistent size in its header", fix)
        if data_start + end > size:
            raise CompressorError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}", fix)
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    position = data_start
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != position:
            raise CompressorError(f"{path}: tensor {e.name!r} {'overlaps another' if e.start < position else 'leaves a gap'} "
                                  "in the data section", fix)
        position = e.end
    if position != size:
        raise CompressorError(f"{path} has {size - position} bytes after its last tensor", fix)
    return entries, metadata


def tensor_bytes(path: Path, entry: TensorEntry) -> bytes:
    with open(path, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.end - entry.start)


def int_values(path: Path, entry: TensorEntry) -> list[int]:
    """The values of a small integer tensor, read without loading anything else."""
    import numpy as np

    formats = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
    if entry.dtype not in formats:
        raise CompressorError(f"{path}: tensor {entry.name!r} should be integer, is {entry.dtype}",
                              "the file is damaged; re-create it")
    return [int(v) for v in np.frombuffer(tensor_bytes(path, entry), dtype=formats[entry.dtype])]


def tensor_sha256(f, entry: TensorEntry, chunk: int = 1 << 22) -> str:
    """sha256 of one tensor's stored bytes, read in chunks from an open file."""
    h = hashlib.sha256()
    f.seek(entry.start)
    left = entry.end - entry.start
    while left > 0:
        block = f.read(min(chunk, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def torch_dtype(code: str):
    import torch

    return getattr(torch, _TORCH_DTYPES[code])


def _dtype_code(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_DTYPES.items():
        if torch_name == name:
            return code
    raise ValueError(f"safetensors cannot store {dtype}")


def read_tensors(path: Path) -> dict:
    """Every tensor of a checked safetensors file, read with plain reads into fresh memory.

    Unlike memory-mapping, this never keeps file pages mapped beside the copies, so peak
    resident memory is the tensors themselves.
    """
    import torch

    entries, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, e in sorted(entries.items(), key=lambda kv: kv[1].start):
            t = torch.empty(e.shape, dtype=torch_dtype(e.dtype))
            if e.end > e.start:
                f.seek(e.start)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else None
                if f.readinto(view) != e.end - e.start:
                    raise CompressorError(f"{path} is truncated inside tensor {name!r}", "re-create the file")
            out[name] = t
    return out


def read_into(path: Path, entry: TensorEntry, pin: bool = False):
    """One tensor of a checked safetensors file, read with a plain read into fresh (optionally
    page-locked, for asynchronous copies to a GPU) memory."""
    import torch

    t = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype), pin_memory=pin)
    if entry.end > entry.start:
        with open(path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != entry.end - entry.start:
                raise CompressorError(f"{path} is truncated inside tensor {entry.name!r}", "re-create the file")
    return t


class StoredTensor:
    """A tensor left in a checked safetensors file, which `write_tensors` copies in chunks
    (writing an artifact block by block keeps only one block in memory)."""

    def __init__(self, path: Path, entry: TensorEntry):
        self.path, self.entry = Path(path), entry
        self.shape = entry.shape
        self.dtype = torch_dtype(entry.dtype)
        self.nbytes = entry.end - entry.start

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def copy_to(self, out, chunk: int = 1 << 24, digest=None) -> None:
        """Copy the bytes to `out`, also fed to `digest` (a hashlib object) when given."""
        with open(self.path, "rb") as f:
            f.seek(self.entry.start)
            left = self.nbytes
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise CompressorError(f"{self.path} is truncated inside tensor {self.entry.name!r}",
                                          "re-create the file")
                out.write(data)
                if digest is not None:
                    digest.update(data)
                left -= len(data)


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a checked safetensors file, left on disk."""
    entries, _ = read_header(path)
    return {name: StoredTensor(path, e) for name, e in entries.items()}


def nbytes(t) -> int:
    return t.nbytes if isinstance(t, StoredTensor) else t.numel() * t.element_size()


@dataclass(frozen=True)
class WrittenHashes:
    """sha256 of a written file's header (length prefix and JSON, as `header_bytes` reads it) and
    of each tensor's bytes, computed from the bytes as they were written."""

    header: str
    tensors: dict[str, str]


def write_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> WrittenHashes:
    """Write a safetensors file tensor by tensor, without building the whole file in memory
    (values are tensors, or StoredTensors copied from their file); returns the hashes of what
    was written (a manifest needs no second read of the file)."""
    import torch

    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        size = nbytes(t)
        header[name] = {"dtype": _dtype_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    digests = {}
    with open(path, "wb") as f:
        f.write(prefix)
        for name in names:
            h = digests[name] = hashlib.sha256()
            if isinstance(tensors[name], StoredTensor):
                tensors[name].copy_to(f, digest=h)
                continue
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                data = memoryview(t.view(-1).view(torch.uint8).numpy())
                f.write(data)
                h.update(data)
    return WrittenHashes(hashlib.sha256(prefix).hexdigest(), {k: h.hexdigest() for k, h in digests.items()})
