"""The C lane codec (tans_native.c), compiled with the system C compiler at first use.

The shared library is cached under ~/.cache/compressor/native/<source hash>/ and loaded with
ctypes (no Python headers needed). Its sha256 is recorded beside it when it is built and checked
before every load; a library that does not match is deleted and rebuilt, never loaded. Where no compiler works, or COMPRESSOR_NATIVE=0 is set,
`library()` returns None and callers use the torch reference codec instead (same format,
slower); `status()` says which one is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from compressor.util import sha256_file, write_atomic

SOURCE = Path(__file__).with_name("tans_native.c")
_STATE: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compressor")
    return Path(root) / "native"


def _compile(target: Path) -> str | None:
    """Build the library into `target` atomically; None on success, else why not."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return "no C compiler found (set CC)"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-shared", "-fPIC", "-o", str(out), str(SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"compiler failed to run ({exc})"
        if proc.returncode != 0:
            return f"compile failed: {proc.stderr.strip()[:200]}"
        digest = sha256_file(out)
        os.replace(out, target)
        write_atomic(_recorded_hash(target), digest.encode())
    return None


def _recorded_hash(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _matches_record(library: Path) -> bool:
    try:
        return _recorded_hash(library).read_text().strip() == sha256_file(library)
    except OSError:
        return False


def _load():
    if os.environ.get("COMPRESSOR_NATIVE", "1") == "0":
        return None, "disabled by COMPRESSOR_NATIVE=0"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / digest / "libtans.so"
    note = ""
    if target.is_file() and not _matches_record(target):
        target.unlink()
        note = "; rebuilt, the cached one did not match the sha256 recorded when it was built"
    if not target.is_file():
        why = _compile(target)
        if why:
            return None, why
    if not _matches_record(target):
        return None, f"{target} does not match its recorded sha256"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"cannot load {target} ({exc})"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tans_decode.restype = i64
    lib.tans_decode.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr]
    lib.tans_encode.restype = i64
    lib.tans_encode.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.split16_hist.restype = None
    lib.split16_hist.argtypes = [ptr, i64, ptr]
    lib.split16.restype = None
    lib.split16.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    return lib, f"C library {target}{note}"


def library():
    key = os.environ.get("COMPRESSOR_NATIVE", "1")
    if _STATE.get("key") != key:
        _STATE["lib"], _STATE["why"] = _load()
        _STATE["key"] = key
    return _STATE["lib"]


def status() -> str:
    lib = library()
    return _STATE["why"] if lib is not None else f"torch reference codec ({_STATE['why']})"
