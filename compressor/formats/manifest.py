"""manifest.json: what an artifact is, how it was built, and a hash of every tensor and file."""

from __future__ import annotations

import json
from pathlib import Path

from compressor import __version__
from compressor.errors import CompressorError
from compressor.safetensors_file import read_header, tensor_sha256
from compressor.util import sha256_file

MANIFEST = "manifest.json"
# Files whose contents vary from run to run (timings, host) and so are not hashed.
UNHASHED = {MANIFEST, "build.json"}


def tensor_hashes(path: Path) -> dict[str, str]:
    entries, _ = read_header(path)
    with open(path, "rb") as f:
        return {name: tensor_sha256(f, e) for name, e in sorted(entries.items())}


def build_manifest(directory: Path, *, kind: str, source: dict, method: dict | None,
                   calibration: dict | None, metrics: dict) -> dict:
    tensors, files = {}, {}
    for f in sorted(directory.iterdir()):
        if f.name in UNHASHED or not f.is_file():
            continue
        if f.suffix == ".safetensors":
            tensors[f.name] = tensor_hashes(f)
        else:
            files[f.name] = sha256_file(f)
    return {
        "format_version": 1,
        "tool": "compressor",
        "tool_version": __version__,
        "kind": kind,
        "source": source,
        "method": method,
        "calibration": calibration,
        "metrics": metrics,
        "tensors": tensors,
        "files": files,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CompressorError(f"{directory} has no {MANIFEST}", "verify works on artifacts written by compressor")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CompressorError(f"{path} is not valid JSON", "the artifact is damaged; rebuild it") from None


def verify(directory: Path) -> list[str]:
    """Problems found re-hashing an artifact against its manifest (empty if intact)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, digest in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            problems.append(f"missing file {name}")
        elif sha256_file(f) != digest:
            problems.append(f"file {name} is corrupted")
    for fname, expected in manifest.get("tensors", {}).items():
        f = directory / fname
        if not f.is_file():
            problems.append(f"missing file {fname}")
            continue
        try:
            actual = tensor_hashes(f)
        except CompressorError as exc:
            problems.append(exc.message)
            continue
        for tname, digest in expected.items():
            if tname not in actual:
                problems.append(f"tensor {tname} missing from {fname}")
            elif actual[tname] != digest:
                problems.append(f"tensor {tname} in {fname} is corrupted")
    return problems
