"""Small helpers shared across layers: hashing, atomic file writes, sizes, memory."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): what interpreter start
    and imports cost before the first line of a command ran."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19]) / ticks
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def fingerprint(*parts: Any) -> str:
    """sha256 of JSON-able settings: equal exactly when every part is equal."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so readers see either the old or the new content, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for a while: small vector steps (GPTQ's columns) and LAPACK's solvers
    spin on busy cores (a 576x576 float64 eigh took 11 s on 2 contended threads, 0.25 s on one),
    so waking a second thread costs more than it saves. Results are the same either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Per-layer temporaries of a few MB are served from glibc's heap once its mmap threshold has
    adapted upward, and the holes they leave are not returned on their own, so without this
    peak memory grows with the number of layers. The pipeline calls it after every block.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        import ctypes
        import ctypes.util

        _TRIM = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                _TRIM = ctypes.CDLL(name).malloc_trim
            except (OSError, AttributeError):
                pass
    return _TRIM


_TRIM = False


_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(value: str | int, what: str = "count") -> int:
    """'100M', '1.5B', '70e6', '20k' or 70000000 as an integer."""
    from compressor.errors import CompressorError

    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbg]?)\s*", str(value).lower())
    if not match:
        raise CompressorError(f"cannot read {what} {value!r}", "write it like 20M, 1.5B, 64k or 70000000")
    return int(round(float(match.group(1)) * _COUNT_SUFFIXES[match.group(2)]))
