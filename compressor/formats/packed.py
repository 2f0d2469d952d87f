"""The packed (lossless) container.

A packed artifact is a directory holding, for each source safetensors file F, a file
`F.stem.packed.safetensors` with one uint8 tensor per source tensor T, under T's own name,
holding T's pieces back to back on 4-byte boundaries (tANS words, lane lengths, symbol counts,
symbol values and raw planes, or just `data` for tensors kept raw). Its metadata records every
tensor's dtype, shape, split, pieces and sha256, and the source file's own header, so unpacking
rebuilds F byte for byte. Beside them: the source's
other files (config, tokenizer), `pack.json` (sizes and settings) and `manifest.json` (hashes of
every stored piece, checked before anything is decoded).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch

from compressor.errors import CompressorError
from compressor.formats.manifest import build_manifest, read_manifest, verify, write_manifest
from compressor.codecs import dfloat
from compressor.codecs.lanes import CorruptStream
from compressor.progress import Progress
from compressor.safetensors_file import read_header, read_tensors, tensor_bytes, write_tensors
from compressor.outputs import atomic_dir, check_output
from compressor.util import sha256_file

SUFFIX = ".packed.safetensors"
FORMAT = "compressor-packed"
# The source artifact's own manifest travels as SOURCE_MANIFEST and comes back on unpack.
SOURCE_MANIFEST = "source-manifest.json"
SKIP_FILES = {"manifest.json", "build.json", "pack.json", SOURCE_MANIFEST}
ARRAY_DTYPES = {"words": np.uint32, "lane_bits": np.uint16, "norm": np.uint16, "values": np.uint16}
BATCH_ELEMENTS = 48_000_000


def is_packed(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "pack.json").is_file() or any(path.glob("*" + SUFFIX)))


def _source_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CompressorError(f"{src} has no *.safetensors weights", "pack a model or artifact directory")
    if any(f.name.endswith(SUFFIX) for f in files):
        raise CompressorError(f"{src} is already a packed artifact", "unpack it first, or pack the original")
    return files


def _batches(entries: dict, limit: int) -> list[list[str]]:
    """Tensor names in file order, grouped so one group's elements stay under `limit`."""
    groups, size = [[]], 0
    for name, e in sorted(entries.items(), key=lambda kv: kv[1].start):
        n = max(1, e.end - e.start)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return [g for g in groups if g]


def _read_some(path: Path, entries: dict, names: list[str]) -> dict[str, torch.Tensor]:
    from compressor.safetensors_file import torch_dtype

    out = {}
    for name in names:
        e = entries[name]
        data = bytearray(tensor_bytes(path, e))
        if len(data) != e.end - e.start:
            raise CompressorError(f"{path} is truncated inside tensor {name!r}", "re-create the file")
        t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(torch_dtype(e.dtype)).reshape(e.shape) if data else torch.empty(e.shape,
                                                                                            dtype=torch_dtype(e.dtype))
    return out


def pack_file(src: Path, dst: Path, config: dfloat.PackConfig, cast: torch.dtype | None,
              progress: Progress | None = None) -> dict:
    """Pack one safetensors file; returns its sizes."""
    entries, metadata = read_header(src)
    tensors_out: dict[str, torch.Tensor] = {}
    metas: dict[str, dict] = {}
    raw_bytes = coded_raw = 0
    for group in _batches(entries, BATCH_ELEMENTS):
        loaded = _read_some(src, entries, group)
        if cast is not None:
            loaded = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in loaded.items()}
        packed = dfloat.pack_tensors([loaded[k] for k in group], config)
        for name, p in zip(group, packed):
            t = loaded[name]
            nbytes = t.numel() * t.element_size()
            raw_bytes += nbytes
            if p.meta["kind"] == "coded":
                coded_raw += nbytes
            blob, pieces = _join(p.arrays)
            metas[name] = {**p.meta, "pieces": pieces}
            tensors_out[name] = torch.from_numpy(blob)
        del loaded
        if progress is not None:
            progress.advance(len(group))
    with open(src, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len).decode()
    meta = {"format": FORMAT, "source_file": src.name, "tensors": json.dumps(metas, sort_keys=True),
            "source_metadata": json.dumps(metadata, sort_keys=True)}
    if cast is None:
        meta["source_header"] = header
        meta["source_sha256"] = sha256_file(src)
    write_tensors(dst, tensors_out, meta)
    return {"file": src.name, "tensors": len(metas), "raw_bytes": raw_bytes, "coded_raw_bytes": coded_raw,
            "packed_bytes": dst.stat().st_size}


def _join(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
    """One byte buffer holding a packed tensor's arrays, each starting on a 4-byte boundary."""
    parts, pieces, offset = [], [], 0
    for key, arr in arrays.items():
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        pad = -raw.size % 4
        parts += [raw, np.zeros(pad, np.uint8)]
        pieces.append([key, int(raw.size)])
        offset += raw.size + pad
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), pieces


def _split(blob: np.ndarray, pieces) -> dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for key, size in pieces:
        size = int(size)
        if offset + size > blob.size:
            raise CorruptStream(f"piece {key!r} runs past the stored bytes")
        a = blob[offset:offset + size]
        dtype = ARRAY_DTYPES.get(key)
        if dtype is not None:
            if size % np.dtype(dtype).itemsize:
                raise CorruptStream(f"piece {key!r} has a partial element")
            a = a.view(dtype)
        arrays[key] = a
        offset += size + (-size % 4)
    if offset != blob.size:
        raise CorruptStream("stored bytes do not match the recorded pieces")
    return arrays


def read_packed_file(path: Path) -> tuple[dict, dict[str, dfloat.PackedTensor]]:
    """Metadata and packed tensors of one packed file (structure checked, nothing decoded)."""
    entries, metadata = read_header(path)
    problem = metadata_problem(path.name, metadata)
    if problem:
        raise CompressorError(f"{path}: {problem}", "pass a directory written by `compress pack`")
    try:
        metas = json.loads(metadata["tensors"])
    except (KeyError, ValueError, RecursionError):
        metas = None
    if not isinstance(metas, dict) or not all(isinstance(m, dict) for m in metas.values()):
        raise CompressorError(f"{path} has damaged packing metadata", "restore the artifact from a good copy")
    stored = read_tensors(path)
    out: dict[str, dfloat.PackedTensor] = {}
    for name, meta in metas.items():
        if name not in stored:
            raise CompressorError(f"{path}: tensor {name!r} is missing", "restore the artifact from a good copy")
        try:
            arrays = _split(stored[name].numpy(), meta.get("pieces", []))
        except (CorruptStream, TypeError, ValueError) as exc:
            raise CompressorError(f"{path}: tensor {name!r} is corrupted ({exc})",
                                  "restore the artifact from a good copy") from None
        out[name] = dfloat.PackedTensor({k: v for k, v in meta.items() if k != "pieces"}, arrays)
    return metadata, out


def source_name(packed_name: str) -> str:
    """The file a packed file rebuilds, derived from its own name (never from its metadata)."""
    return packed_name[: -len(SUFFIX)] + ".safetensors"


def metadata_problem(packed_name: str, metadata: dict) -> str | None:
    """Why a packed file's metadata cannot be trusted, or None. The rebuilt file's name comes
    from the packed file's own name; the metadata must agree with it, so a crafted name such
    as `../x` or `/etc/x` is refused before anything is written."""
    if metadata.get("format") != FORMAT:
        return "not a packed file"
    if not packed_name.endswith(SUFFIX):
        return f"packed file names end in {SUFFIX}"
    if metadata.get("source_file") != source_name(packed_name):
        return (f"its metadata names source file {metadata.get('source_file')!r}, not "
                f"{source_name(packed_name)!r} (a crafted or damaged artifact)")
    return None


def verify_packed(directory: Path) -> list[str]:
    """Manifest problems plus untrusted names in the packed files' metadata."""
    problems = verify(directory)
    for f in sorted(Path(directory).glob("*" + SUFFIX)):
        if f.is_symlink() or not f.is_file():
            continue
        try:
            _, metadata = read_header(f)
        except CompressorError as exc:
            problems.append(exc.message)
            continue
        problem = metadata_problem(f.name, metadata)
        if problem:
            problems.append(f"{f.name}: {problem}")
    return problems


def decode_file(path: Path, verify_hashes: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    metadata, packed = read_packed_file(path)
    tensors = {}
    for name, p in packed.items():
        try:
            tensors[name] = dfloat.unpack_tensor(p, verify=verify_hashes)
        except (CorruptStream, KeyError, ValueError, TypeError) as exc:
            raise CompressorError(f"{path.name}: tensor {name!r} is corrupted ({exc})",
                                  "restore the artifact from a good copy") from None
    return metadata, tensors


def _write_original(dst: Path, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    header = metadata.get("source_header")
    if header is None:
        write_tensors(dst, tensors, json.loads(metadata.get("source_metadata", "{}")) or None)
        return
    parsed = json.loads(header)
    parsed.pop("__metadata__", None)
    order = sorted(parsed, key=lambda k: parsed[k]["data_offsets"][0])
    raw = header.encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    if sha256_file(dst) != metadata.get("source_sha256"):
        raise CompressorError(f"rebuilt {dst.name} does not match the source file's sha256",
                              "the artifact is damaged; restore it from a good copy")


def _copy_other_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in SKIP_FILES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def pack(src: Path, out: Path, config: dfloat.PackConfig, cast: torch.dtype | None = None, *,
         overwrite: bool = False, source: dict | None = None, check: bool = True,
         progress: Progress | None = None) -> dict:
    """Pack a model or artifact directory into `out` (atomically, verified before publishing)."""
    src, out = Path(src), Path(out)
    files = _source_files(src)
    check_output(out, overwrite=overwrite, sources=[src], needs_bytes=sum(f.stat().st_size for f in files))
    started = time.perf_counter()
    progress = progress or Progress()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with progress.task("packing tensors", total=sum(len(read_header(f)[0]) for f in files)) as bar:
            results = [pack_file(f, tmp / (f.stem + SUFFIX), config, cast, bar) for f in files]
        pack_s = time.perf_counter() - started
        _copy_other_files(src, tmp)
        if (src / "manifest.json").is_file():
            shutil.copy2(src / "manifest.json", tmp / SOURCE_MANIFEST)
        if cast is not None and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = str(cast).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        raw = sum(r["raw_bytes"] for r in results)
        packed = sum(r["packed_bytes"] for r in results)
        summary = {"format": FORMAT, "config": config.model_dump(), "cast": str(cast).removeprefix("torch.") if cast
                   else None, "files": results, "raw_bytes": raw, "packed_bytes": packed,
                   "ratio": packed / max(raw, 1)}
        (tmp / "pack.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp, build_manifest(tmp, kind="packed", source=source or {"path": str(src)},
                                           method={"name": "pack", "config": config.model_dump()},
                                           calibration=None, metrics={"ratio": summary["ratio"],
                                                                      "size_bytes": packed}))
        problems = verify(tmp)
        if problems:
            raise CompressorError(f"packed artifact failed verification before publishing: {problems[0]}",
                                  "this is a bug; rerun with --debug and report it")
        if check:  # every tensor decodes to its recorded sha256 before the artifact is published
            for f in sorted(tmp.glob("*" + SUFFIX)):
                decode_file(f)
    return {**summary, "output": str(out), "pack_s": pack_s, "wall_s": time.perf_counter() - started}


def check_artifact(path: Path) -> None:
    """Manifest hashes of every stored piece; a damaged one is reported with its tensor's name."""
    path = Path(path)
    if not path.is_dir() or not (path / "pack.json").is_file():
        raise CompressorError(f"{path} is not a packed artifact", "pass a directory written by `compress pack`")
    read_manifest(path)
    problems = verify_packed(path)
    if problems:
        raise CompressorError(f"{path} is damaged: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                       if len(problems) > 1 else ""),
                              "restore the artifact from a good copy")


def _raw_bytes(packed_dir: Path) -> int:
    """The unpacked size recorded in pack.json (hashed by the manifest), 0 if unreadable."""
    try:
        value = json.loads((packed_dir / "pack.json").read_text()).get("raw_bytes", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value >= 0 else 0


def unpack(packed_dir: Path, out: Path, *, overwrite: bool = False) -> dict:
    """Rebuild the original safetensors files (sha256 of every tensor checked) and other files."""
    packed_dir, out = Path(packed_dir), Path(out)
    check_artifact(packed_dir)
    check_output(out, overwrite=overwrite, sources=[packed_dir], needs_bytes=_raw_bytes(packed_dir))
    started = time.perf_counter()
    total = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in sorted(packed_dir.glob("*" + SUFFIX)):
            metadata, tensors = decode_file(f)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            _write_original(tmp / source_name(f.name), metadata, tensors)
            del tensors
        _copy_other_files(packed_dir, tmp)
        # The rebuilt directory is an artifact too: its original manifest, or one of its own.
        if (packed_dir / SOURCE_MANIFEST).is_file():
            shutil.copy2(packed_dir / SOURCE_MANIFEST, tmp / "manifest.json")
        else:
            write_manifest(tmp, build_manifest(tmp, kind="unpacked", source={"path": str(packed_dir)}, method=None,
                                               calibration=None, metrics={}))
        problems = verify(tmp)
        if problems:
            raise CompressorError(f"rebuilt files do not match the packed artifact's record: {problems[0]}",
                                  "the artifact is damaged; restore it from a good copy")
    return {"output": str(out), "bytes": total, "wall_s": time.perf_counter() - started}


def stream_spec(p: dfloat.PackedTensor, out_offset: int):
    """A coded 16-bit float tensor as a kernels.entropy_decode.StreamSpec (None if not decodable there)."""
    from compressor.kernels.entropy_decode import StreamSpec
    from compressor.codecs import tans

    m = p.meta
    if m["kind"] != "coded" or m["dtype"] not in ("bfloat16", "float16") or int(m["mode"]) not in (1, 2):
        return None
    a = p.arrays
    table = tans.decode_table(a["norm"].view(np.uint16).astype(np.int64), int(m["table_log"]),
                              a["values"].view(np.uint16))
    return StreamSpec(a["words"].view(np.uint32), a["lane_bits"].view(np.uint16), table, int(m["count"]),
                      int(m["mode"]), a["raw"], a.get("signs", np.zeros(0, np.uint8)), out_offset,
                      int(m["lanes"]), int(m["steps"]), int(m["table_log"]))
