"""Artifact directories: HF-loadable config + safetensors weights + tokenizer + manifest.

Everything is written into `<out>.tmp-*`, verified against its own manifest, and only then
renamed to `<out>`; an existing `<out>` is replaced only with explicit consent and only after
the new one is complete.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.formats import quantized
from compressor.formats.manifest import build_manifest, verify, write_manifest
from compressor.safetensors_file import WrittenHashes, int_values, read_header, read_tensors, write_tensors
from compressor.safetensors_file import nbytes as stored_nbytes
from compressor.outputs import atomic_dir, check_output

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 1024**3


def save_tensors(directory: Path, tensors: dict[str, torch.Tensor],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, WrittenHashes]:
    """One model.safetensors, or numbered shards plus the standard index when it is large; returns
    each file's hashes as written (for the manifest)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        t = tensors[name]
        nbytes = stored_nbytes(t)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        return {WEIGHTS: write_tensors(directory / WEIGHTS, shards[0], metadata)}
    weight_map, written = {}, {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        written[fname] = write_tensors(directory / fname, shard, metadata)
        weight_map.update({k: fname for k in shard})
    total = sum(stored_nbytes(t) for t in tensors.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2, sort_keys=True))
    return written


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        tensors.update(read_tensors(f))  # checks structure first: a damaged file is named
    return tensors


def write_artifact(out: Path, *, config: dict, tensors: dict[str, torch.Tensor], tokenizer, generation_config,
                   kind: str, source: dict, method: dict | None, calibration: dict | None, metrics: dict,
                   overwrite: bool, build: dict | None = None, timings: dict | None = None) -> Path:
    """Write, verify and publish an artifact; `timings` (when given) receives the seconds spent
    writing (shards, tokenizer, manifest) and verifying."""
    out = check_output(Path(out), overwrite=overwrite)
    timings = {} if timings is None else timings
    # Where the source happened to live is not part of the artifact (same inputs, same bytes).
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        mark = time.perf_counter()
        written = save_tensors(tmp, tensors)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        metrics = {**metrics, "size_bytes": weights_size(tmp)}
        # The weights' hashes come from the bytes as they were written; the one verification
        # below then reads every file back and checks it against the manifest before publishing.
        write_manifest(tmp, build_manifest(tmp, kind=kind, source=source, method=method,
                                           calibration=calibration, metrics=metrics, written=written))
        timings["write"] = time.perf_counter() - mark
        mark = time.perf_counter()
        problems = verify(tmp)
        timings["verify"] = time.perf_counter() - mark
        if problems:
            raise CompressorError(f"artifact failed verification before publishing: {problems[0]}",
                                  "this is a bug; rerun with --debug and report it")
        (tmp / "build.json").write_text(json.dumps(
            {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
             "command": shlex.join(["compress", *sys.argv[1:]]) if _is_compress(sys.argv) else None,
             "python": platform.python_version(), "torch": torch.__version__, **_with_timings(build, timings)},
            indent=2) + "\n")
    return out


def _with_timings(build: dict | None, timings: dict) -> dict:
    """build.json's contents with the writer's own phases joined to the run's `phases_s`."""
    build = dict(build or {})
    if "phases_s" in build:
        build["phases_s"] = {**build["phases_s"], **timings}
    return build


def _is_compress(argv: list[str]) -> bool:
    """Whether this process is the `compress` command line (recorded in build.json)."""
    return bool(argv) and Path(argv[0]).name in ("compress", "__main__.py", "cli.py")


def weight_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def weights_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(directory))


def parameter_count(directory: Path) -> tuple[int, int]:
    """Logical parameters and stored bytes of a directory's safetensors files; packed weights
    count by their unpacked shape, quantization metadata (scales, zero points) not at all."""
    summary = storage_summary(directory)
    return summary["params"], summary["stored_bytes"]


def storage_summary(directory: Path) -> dict[str, int]:
    """Parameters and bytes of the whole checkpoint, and of its quantized linears alone (their
    codes, scales and zero points; the stored shape is metadata and not counted)."""
    params = stored = linear_params = linear_bytes = 0
    for f in weight_files(directory):
        entries, metadata = read_header(f)
        if metadata.get("format") == "compressor-packed":  # formats/packed.py: shapes are in the metadata
            stored += sum(e.end - e.start for e in entries.values())
            params += sum(math.prod(m["shape"]) for m in json.loads(metadata.get("tensors", "{}")).values())
            continue
        quantized_modules = {name.rpartition(".")[0] for name in entries if name.endswith(".weight_scale")}
        for name, e in entries.items():
            stored += e.end - e.start
            module, _, leaf = name.rpartition(".")
            if module in quantized_modules and leaf != "weight_shape":
                linear_bytes += e.end - e.start
            if leaf == "weight_packed":
                shape = entries.get(f"{module}.weight_shape")
                if shape is None:
                    raise CompressorError(f"{f}: {module} has packed weights but no weight_shape",
                                          "the artifact is damaged; rebuild it")
                count = math.prod(int_values(f, shape))
            elif leaf not in quantized.SUFFIXES:
                count = math.prod(e.shape)
            else:
                continue
            params += count
            if module in quantized_modules:
                linear_params += count
    return {"params": params, "stored_bytes": stored, "quantized_params": linear_params,
            "quantized_bytes": linear_bytes}


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CompressorError(f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                              "the artifact is damaged; rebuild it") from None
    if not isinstance(config, dict):
        raise CompressorError(f"{path} is not a JSON object", "the artifact is damaged; rebuild it")
    return config


def is_quantized(directory: Path) -> bool:
    path = Path(directory)
    return path.is_dir() and "quantization_config" in read_config(path)


def load_quantized_state(directory: Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config (without quantization_config) and dequantized float state dict of an artifact
    (with static activation scales, `<module>.input_scale`, where the format stores them)."""
    config = read_config(directory)
    qconfig = config.pop("quantization_config", None)
    if not isinstance(qconfig, dict):
        raise CompressorError(f"{directory}/config.json has no valid quantization_config",
                              "the artifact is damaged; rebuild it")
    tensors = load_tensors(directory)
    return config, quantized.decode(tensors, qconfig, dtype)
