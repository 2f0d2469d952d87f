"""Open any model a user may want to evaluate, as a float causal LM with its tokenizer.

Kinds: a reference name, a GGUF file, a plain HF directory, a compressor artifact (quantized,
pruned), a packed (lossless) artifact, which runs from its packed weights, and a
compressed-tensors checkpoint written by another tool (llm-compressor), read by our own decoder
where it knows the scheme and by transformers + compressed-tensors (dequantized on load)
otherwise. `identify()` gives the content hash an evaluation cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch

from compressor.errors import CompressorError
from compressor.formats import activations, quantized
from compressor.formats import artifact as artifact_format
from compressor.formats import packed as packed_format
from compressor.formats import manifest as manifests
from compressor.formats.manifest import MANIFEST, read_manifest, verify
from compressor.models.adapters import adapter_for_config
from compressor.models.loading import (LoadedModel, build_model, load_model, load_tokenizer, resolve_model_path,
                                       source_hash, stored_float_dtype)

KINDS = ("gguf", "hf", "artifact", "packed", "compressed-tensors")  # the last: written by another tool


def kind_of(path: Path) -> str:
    """Which kind of model a resolved path holds."""
    if path.is_file():
        return "gguf"
    if (path / "pack.json").is_file():
        return "packed"
    qconfig = artifact_format.read_config(path).get("quantization_config")
    if qconfig is not None:
        if qconfig.get("quant_method") != "compressed-tensors":
            raise CompressorError(f"{path} is quantized with {qconfig.get('quant_method')!r}, which compressor "
                                  "cannot read", "evaluate compressed-tensors, GGUF or float checkpoints")
    return "artifact" if _own(path) else ("compressed-tensors" if qconfig is not None else "hf")


def _own(path: Path) -> bool:
    """Written by compressor (has our manifest)."""
    if not (path / MANIFEST).is_file():
        return False
    try:
        return read_manifest(path).get("tool") == "compressor"
    except CompressorError:
        return True  # ours but damaged: identify() names the damage


def _config(config_dict: dict):
    from transformers import AutoConfig

    config_dict = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
    model_type = config_dict.pop("model_type", None)
    return AutoConfig.for_model(model_type, **config_dict)


def model_from_tensors(path: Path, config_dict: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """A float model from a config and its stored tensors, quantized (compressed-tensors
    formats we decode, with input-activation quantization attached as transformers would)
    or not."""
    qconfig = config_dict.pop("quantization_config", None)
    if qconfig is not None:
        tensors = quantized.decode(tensors, qconfig, dtype)
    config = _config(config_dict)
    adapter = adapter_for_config(config)
    input_scales = activations.pop_input_scales(tensors)
    model = build_model(config, tensors, dtype)
    if qconfig is not None:
        activations.attach(model, qconfig, input_scales)
    return model, adapter


def load_quantized_artifact(path: Path, ref: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A compressed-tensors artifact in a format our decoder reads, dequantized to `dtype`."""
    config_dict = artifact_format.read_config(path)
    model, adapter = model_from_tensors(path, config_dict, artifact_format.load_tensors(path), dtype)
    manifest = read_manifest(path) if (path / MANIFEST).exists() else {}
    source = manifest.get("source", {}).get("sha256", "")
    return LoadedModel(model, load_tokenizer(path), adapter, path, source, ref, {"manifest": manifest},
                       stored_dtype=stored_float_dtype(artifact_format.weight_files(path)) or dtype)


def _load_packed(path: Path, ref: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """Run from the packed weights: 16-bit float models decode block by block just before each
    block runs (formats.packed_runner); others (int codes of a quantized artifact, float32)
    are decoded in memory from the packed streams, never written out."""
    from compressor.formats.packed_runner import load_packed

    config_dict = artifact_format.read_config(path)
    extra = {"manifest": read_manifest(path)}
    if "quantization_config" not in config_dict:
        try:
            runner = load_packed(path, device=device)  # checks every stored piece first
        except CompressorError as exc:
            if "single 16-bit float" not in exc.message:
                raise
        else:
            extra["runner"] = runner
            return LoadedModel(runner.model, load_tokenizer(path), adapter_for_config(runner.model.config), path,
                               extra["manifest"].get("source", {}).get("hash", ""), ref, extra,
                               stored_dtype=runner.buffer.dtype)
    packed_format.check_artifact(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*" + packed_format.SUFFIX)):
        tensors.update(packed_format.decode_file(f)[1])
    model, adapter = model_from_tensors(path, config_dict, tensors, dtype)
    return LoadedModel(model, load_tokenizer(path), adapter, path, extra["manifest"].get("source", {}).get("hash", ""),
                       ref, extra, stored_dtype=dtype)


def _load_foreign_compressed_tensors(path: Path, ref: str, dtype: torch.dtype) -> LoadedModel:
    """A compressed-tensors checkpoint in a scheme our decoder does not read (several config
    groups, other formats): transformers + compressed-tensors dequantize it on load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    try:
        with warnings.catch_warnings():  # "the config's quantization_config will be used": that is the point
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
    except (OSError, RuntimeError, ValueError, KeyError, ImportError) as exc:
        raise CompressorError(f"cannot load compressed-tensors checkpoint {path}: {str(exc).splitlines()[0]}",
                              "check that the checkpoint is complete; `pip install compressed-tensors`") from None
    model.eval()
    return LoadedModel(model, load_tokenizer(path), adapter_for_config(model.config), path, source_hash(path), ref,
                       {"manifest": {}}, stored_dtype=stored_float_dtype(artifact_format.weight_files(path)) or dtype)


def load_with_kernels(path: Path, ref: str, dtype: torch.dtype, device: str,
                       warn: Callable[[str], None]) -> LoadedModel:
    """A quantized artifact on CUDA keeps its linears quantized there (QuantLinear, our kernels)."""
    from compressor.formats.quant_runtime import load_quantized

    model, dtype = load_quantized(path, dtype, torch.device(device), warn)
    manifest = read_manifest(path) if (path / MANIFEST).exists() else {}
    return LoadedModel(model, load_tokenizer(path), adapter_for_config(model.config), path,
                       manifest.get("source", {}).get("sha256", ""), ref, {"manifest": manifest}, stored_dtype=dtype)


def open_model(ref: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", allow_pickle: bool = False,
               verify: bool = True, log: Callable[[str], None] = lambda _: None,
               warn: Callable[[str], None] = lambda _: None) -> LoadedModel:
    """Any supported model as a float causal LM; `extra["kind"]` says which kind it was. Our
    artifacts are checked against their manifests first (packed ones always are)."""
    path = resolve_model_path(ref, log)
    kind = kind_of(path)
    name = str(ref)
    if verify and kind == "artifact":
        manifests.check(path)
    qconfig = artifact_format.read_config(path).get("quantization_config") if path.is_dir() else None
    if kind == "packed":
        loaded = _load_packed(path, name, dtype, device)
    elif qconfig is not None:
        if quantized.supports(qconfig) and torch.device(device).type == "cuda":
            loaded = load_with_kernels(path, name, dtype, device, warn)
        elif quantized.supports(qconfig):
            loaded = load_quantized_artifact(path, name, dtype)
        else:
            loaded = _load_foreign_compressed_tensors(path, name, dtype)
    else:
        loaded = load_model(path, dtype=dtype, allow_pickle=allow_pickle, log=log, warn=warn)
        loaded.name = name
    loaded.extra["kind"] = kind
    return loaded


def identify(ref: str | Path, log: Callable[[str], None] = lambda _: None) -> dict:
    """What an evaluation cache keys on: the kind and a content hash. Our artifacts are first
    re-hashed against their manifest (a damaged one is an error naming the damage) and keyed by
    the manifest, which holds every tensor's sha256; anything else by the sha256 of its config
    and weight files."""
    path = resolve_model_path(ref, log)
    kind = kind_of(path)
    if (path / MANIFEST).is_file() if path.is_dir() else False:
        problems = packed_format.verify_packed(path) if kind == "packed" else verify(path)
        if problems:
            raise CompressorError(f"{ref} is damaged: {problems[0]}"
                                  + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                                  "rebuild the artifact or restore it from a good copy")
        digest = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
    else:
        digest = source_hash(path)
    return {"path": str(path), "kind": kind, "sha256": digest}


def describe(ref: str | Path) -> dict:
    """Provenance and size of a model for reports: the manifest's record where there is one."""
    path = resolve_model_path(ref)
    info: dict = {"path": str(path), "kind": kind_of(path)}
    if path.is_file():
        info["size_bytes"] = path.stat().st_size
        return info
    config = artifact_format.read_config(path)
    info["model_type"] = config.get("model_type")
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}
    params, stored = artifact_format.parameter_count(path)
    info.update({"params": params, "size_bytes": stored, "bits_per_weight": 8 * stored / max(params, 1)})
    if manifest:
        info.update({k: manifest.get(k) for k in ("tool_version", "kind", "source", "method", "calibration")})
        info["metrics"] = manifest.get("metrics", {})
        info["kind"] = kind_of(path)
    build = path / "build.json"
    if build.is_file():
        try:
            info["build"] = json.loads(build.read_text())
        except json.JSONDecodeError:
            pass
    return info
