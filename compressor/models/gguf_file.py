"""Checking a GGUF file's structure before any library reads it.

GGUF stores counts (tensors, metadata entries, array lengths, string lengths, dimensions) that a
reader uses to size what it allocates; a forged count makes a trusting reader allocate without
bound or loop for ever. This reader walks the header with every count checked against the bytes
that remain in the file, and every tensor's byte range against the data section, so nothing
derived from the header can exceed the file's own size. Only then is the file handed to
transformers (which reads it with the gguf library).
"""

from __future__ import annotations

import struct
from pathlib import Path

from compressor.errors import CompressorError

MAGIC = b"GGUF"
MAX_DIMS = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4


class _Damaged(Exception):
    pass


class _Cursor:
    def __init__(self, data: bytes | memoryview):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.left():
            raise _Damaged(f"a field at byte {self.pos} runs past the end of the file")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.unpack("<Q")
        if n * max(min_item_bytes, 1) > self.left():
            raise _Damaged(f"{what} {n} at byte {self.pos - 8} is more than the file can hold")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"{what} length", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} at byte {self.pos - len(raw)} is not UTF-8") from None


def _value(cur: _Cursor, kind: int, depth: int = 0):
    if kind in _SCALARS:
        return cur.unpack(_SCALARS[kind])
    if kind == _STRING:
        return cur.string("string")
    if kind == _ARRAY:
        if depth >= _MAX_NESTING:
            raise _Damaged("arrays nested too deeply")
        item = cur.unpack("<I")
        if item not in _SCALARS and item not in (_STRING, _ARRAY):
            raise _Damaged(f"unknown array item type {item}")
        size = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8
        n = cur.count("array length", size)
        if item in _SCALARS:  # skipped, not decoded: a vocabulary can hold 100k entries
            cur.take(n * size)
            return None
        for _ in range(n):
            _value(cur, item, depth + 1)
        return None
    raise _Damaged(f"unknown metadata value type {kind}")


def _quant_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return {}
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def check_gguf(path: Path) -> dict:
    """{"version", "tensors", "metadata"} of a structurally sound GGUF file; CompressorError otherwise."""
    path = Path(path)
    fix = "re-download or re-convert the file"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompressorError(f"cannot read {path} ({exc.strerror or exc})", fix) from None
    try:
        return _check(data)
    except (_Damaged, struct.error) as exc:
        raise CompressorError(f"{path} is not a sound GGUF file: {exc}", fix) from None


def _check(data: bytes) -> dict:
    cur = _Cursor(memoryview(data))
    if cur.take(4) != MAGIC:
        raise _Damaged("it does not start with GGUF")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise _Damaged(f"version {version} is not supported (2 or 3)")
    n_tensors = cur.count("tensor count", 4 + 8 + 4 + 8 + 8)  # shortest tensor entry
    n_meta = cur.count("metadata count", 8 + 4 + 1)
    alignment = 32
    for _ in range(n_meta):
        key = cur.string("metadata key")
        kind = cur.unpack("<I")
        value = _value(cur, kind)
        if key == "general.alignment":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1) or value > 1 << 20:
                raise _Damaged(f"general.alignment {value!r} is not a power of two")
            alignment = value
    sizes = _quant_sizes()
    tensors = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        if min(dims) < 1:  # an empty dimension would let the others be anything (found by the fuzzer)
            raise _Damaged(f"tensor {name!r} has an empty dimension {dims}")
        kind = cur.unpack("<I")
        offset = cur.unpack("<Q")
        if sizes and kind not in sizes:
            raise _Damaged(f"tensor {name!r} has unknown type {kind}")
        block, type_size = sizes.get(kind, (1, 1))
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block or offset % alignment:
            raise _Damaged(f"tensor {name!r} is misaligned with its type's blocks or the data alignment")
        tensors.append((name, offset, elements // block * type_size))
    start = cur.pos + (-cur.pos % alignment)
    room = len(data) - start
    for name, offset, nbytes in tensors:
        if offset + nbytes > room:
            raise _Damaged(f"tensor {name!r} ends past the end of the file")
    return {"version": version, "tensors": len(tensors), "metadata": n_meta}
