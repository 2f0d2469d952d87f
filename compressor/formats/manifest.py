"""manifest.json: what an artifact is, how it was built, and hashes of everything that
determines its numbers: every file, every safetensors header (names, dtypes, shapes, offsets,
metadata) and every tensor's bytes. `verify` also refuses files the manifest does not list,
links, subdirectories, and manifest entries that are not bare file names."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compressor import __version__
from compressor.errors import CompressorError
from compressor.outputs import MANIFEST, UNLISTED, is_safe_name
from compressor.safetensors_file import WrittenHashes, header_bytes, read_header, tensor_sha256
from compressor.util import sha256_file

FORMAT_VERSION = 2


HASH_THREADS = min(8, os.cpu_count() or 1)
PARALLEL_HASH_BYTES = 64 << 20  # files larger than this are hashed by HASH_THREADS threads


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes, read back from the file. Large files are hashed by a few
    threads at once (hashlib and file reads release the GIL), each on its own file handle."""
    entries, _ = read_header(path)
    items = sorted(entries.items())
    big = sum(e.end - e.start for _, e in items) > PARALLEL_HASH_BYTES and len(items) > 1 and HASH_THREADS > 1
    if not big:
        with open(path, "rb") as f:
            return {name: tensor_sha256(f, e) for name, e in items}

    def one(item):
        with open(path, "rb") as f:
            return item[0], tensor_sha256(f, item[1])

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return dict(pool.map(one, items))


def header_sha256(path: Path) -> str:
    return hashlib.sha256(header_bytes(path)).hexdigest()


def build_manifest(directory: Path, *, kind: str, source: dict, method: dict | None,
                   calibration: dict | None, metrics: dict, written: dict[str, WrittenHashes] | None = None) -> dict:
    """The manifest of a directory. `written` holds the hashes of safetensors files as this
    process wrote them (`write_tensors`' return): those files are not read again here."""
    tensors, headers, files = {}, {}, {}
    written = written or {}
    for f in sorted(directory.iterdir()):
        if f.name in UNLISTED or not f.is_file():
            continue
        if f.suffix == ".safetensors" and f.name in written:
            tensors[f.name] = dict(sorted(written[f.name].tensors.items()))
            headers[f.name] = written[f.name].header
        elif f.suffix == ".safetensors":
            tensors[f.name] = tensor_hashes(f)
            headers[f.name] = header_sha256(f)
        else:
            files[f.name] = sha256_file(f)
    return {
        "format_version": FORMAT_VERSION,
        "tool": "compressor",
        "tool_version": __version__,
        "kind": kind,
        "source": source,
        "method": method,
        "calibration": calibration,
        "metrics": metrics,
        "tensors": tensors,
        "headers": headers,
        "files": files,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CompressorError(f"{directory} has no {MANIFEST}", "verify works on artifacts written by compressor")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CompressorError(f"{path} is not valid JSON", "the artifact is damaged; rebuild it") from None
    if not isinstance(manifest, dict):
        raise CompressorError(f"{path} is not a compressor manifest", "the artifact is damaged; rebuild it")
    return manifest


def _listing(manifest: dict, key: str, problems: list[str]) -> dict:
    """A manifest section with unsafe names reported and dropped (never followed)."""
    section = manifest.get(key)
    if not isinstance(section, dict):
        problems.append(f"manifest has no valid {key!r} section")
        return {}
    safe = {}
    for name, value in section.items():
        if is_safe_name(name):
            safe[name] = value
        else:
            problems.append(f"manifest names an unsafe path {name!r} (only bare file names are allowed)")
    return safe


def verify(directory: Path) -> list[str]:
    """Problems found re-hashing an artifact against its manifest (empty if intact)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems: list[str] = []
    if manifest.get("tool") != "compressor":
        return [f"{directory / MANIFEST} was not written by compressor"]
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"manifest format {manifest.get('format_version')} does not cover safetensors headers "
                f"(this compressor writes format {FORMAT_VERSION}); rebuild the artifact"]
    files = _listing(manifest, "files", problems)
    tensors = _listing(manifest, "tensors", problems)
    headers = _listing(manifest, "headers", problems)
    listed = set(files) | set(tensors) | set(UNLISTED)
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            problems.append(f"{entry.name} is a symbolic link (artifacts hold plain files only)")
        elif entry.is_dir():
            problems.append(f"unexpected directory {entry.name} (not in the manifest)")
        elif entry.name not in listed:
            problems.append(f"unexpected file {entry.name} (not in the manifest)")
    for name, digest in files.items():
        f = directory / name
        if not f.is_file() or f.is_symlink():
            problems.append(f"missing file {name}")
        elif sha256_file(f) != digest:
            problems.append(f"file {name} is corrupted")
    for fname, expected in tensors.items():
        f = directory / fname
        if not f.is_file() or f.is_symlink():
            problems.append(f"missing file {fname}")
            continue
        if not isinstance(expected, dict):
            problems.append(f"manifest entry of {fname} is damaged")
            continue
        try:
            if header_sha256(f) != headers.get(fname):
                problems.append(f"header of {fname} changed (tensor names, dtypes, shapes or offsets)")
                continue
            actual = tensor_hashes(f)
        except CompressorError as exc:
            problems.append(exc.message)
            continue
        for tname in sorted(set(actual) - set(expected)):
            problems.append(f"tensor {tname} in {fname} is not in the manifest")
        for tname, digest in expected.items():
            if tname not in actual:
                problems.append(f"tensor {tname} missing from {fname}")
            elif actual[tname] != digest:
                problems.append(f"tensor {tname} in {fname} is corrupted")
    return problems


def check(directory: Path) -> dict:
    """The manifest of an intact artifact; CompressorError naming the first problems otherwise."""
    problems = verify(directory)
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CompressorError(f"{directory} failed verification: {'; '.join(problems[:2])}{more}",
                              "rebuild the artifact or restore it from a good copy; --no-verify skips this check")
    return read_manifest(directory)
