"""The Python API behind the CLI: fetch assets, quantize, evaluate, inspect, verify."""

from __future__ import annotations

import copy
import resource
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from pydantic import ValidationError

from compressor import __version__
from compressor.calib.data import calibration_set, evaluation_set
from compressor.devices import check_device
from compressor.errors import CompressorError
from compressor.formats import artifact as artifacts
from compressor.formats import activations, mixed_precision
from compressor.formats import manifest as manifests
from compressor.formats.manifest import read_manifest
from compressor import export
from compressor.methods import METHODS, Method
from compressor.methods.quant.mixed import MIXED_BUDGETS, MixedPrecision
from compressor.methods.composition import build_methods, method_names
from compressor.methods.composition import describe as describe_methods
from compressor.models import assets
from compressor.models.adapters import adapter_for_config, count_parameters
from compressor.models.loading import (LoadedModel, build_model, load_model, load_tokenizer, resolve_model_path,
                                      source_bytes, stored_float_dtype)
from compressor.outputs import check_output
from compressor.pipeline.checkpoint import RunDirectory
from compressor.pipeline.distributed import World
from compressor.pipeline.progress import Progress
from compressor.pipeline.sequential import SequentialPipeline, check_order
from compressor.util import fingerprint, release_memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, unlike ru_maxrss, is not inherited from a
    parent process across fork and exec, so a child reports only its own peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- assets

def fetch_assets(names: list[str], progress: Progress | None = None) -> list[dict]:
    progress = progress or Progress()
    out = []
    for name in names or ["smollm2-135m", "wiki"]:
        path = assets.fetch(name, progress.log)
        out.append({"name": name, "path": str(path)})
    return out


# ---------------------------------------------------------------- loading

def load(ref: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
         progress: Progress | None = None, verify: bool = True, device: str | None = None) -> LoadedModel:
    """A checkpoint, GGUF file, reference name or compressor artifact, as a float model.

    A compressor artifact is checked against its manifest first (every header, tensor and file;
    `verify=False` skips it), so a tampered artifact is an error rather than a wrong number. With a
    CUDA `device`, a quantized artifact keeps its linears quantized there (QuantLinear, our kernels).
    """
    progress = progress or Progress()
    path = resolve_model_path(ref, progress.log)
    refuse_packed(path)
    if path.is_dir() and (path / manifests.MANIFEST).is_file() and verify:
        manifests.check(path)
        progress.log(f"verified {path} against its manifest")
    if path.is_dir() and artifacts.is_quantized(path) and device is not None and torch.device(device).type == "cuda":
        from compressor.models.quant_runtime import load_quantized

        model, dtype = load_quantized(path, dtype, torch.device(device), progress.warn)
        manifest = read_manifest(path) if (path / "manifest.json").exists() else {}
        return LoadedModel(model, load_tokenizer(path), adapter_for_config(model.config), path,
                           manifest.get("source", {}).get("sha256", ""), str(ref), {"manifest": manifest},
                           stored_dtype=dtype)
    if path.is_dir() and artifacts.is_quantized(path):
        from transformers import AutoConfig

        config_dict, state = artifacts.load_quantized_state(path, dtype)
        config_dict = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
        model_type = config_dict.pop("model_type", None)
        config = AutoConfig.for_model(model_type, **config_dict)
        adapter = adapter_for_config(config)
        input_scales = activations.pop_input_scales(state)
        model = build_model(config, state, dtype)
        # Artifacts that quantize linear inputs (W8A8, FP8) compute as transformers would.
        activations.attach(model, artifacts.read_config(path)["quantization_config"], input_scales)
        manifest = read_manifest(path) if (path / "manifest.json").exists() else {}
        source = manifest.get("source", {}).get("sha256", "")
        return LoadedModel(model, load_tokenizer(path), adapter, path, source, str(ref), {"manifest": manifest},
                           stored_dtype=stored_float_dtype(artifacts.weight_files(path)) or dtype)
    loaded = load_model(path, dtype=dtype, allow_pickle=allow_pickle, log=progress.log, warn=progress.warn)
    loaded.name = str(ref)
    return loaded


def refuse_packed(path: Path) -> None:
    from compressor.formats import packed

    if packed.is_packed(path):
        raise CompressorError(f"{path} is a packed (lossless) artifact, which this command cannot read directly",
                              f"rebuild its weights first: compress unpack {path} -o DIR")


# ---------------------------------------------------------------- compress (quantize, prune, lists)

def make_methods(spec: str | list[str], options: dict[str, Any] | None, command: str = "quantize") -> list[Method]:
    """Configured methods for a spec (`gptq`, `awq+gptq`, `slicegpt,gptq`), checked as one pass."""
    methods = build_methods(spec, options, command)
    check_order(methods)
    return methods


def run_directory_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.run")


def compress(model: str, methods: str | list[str] | list[Method], out: str | Path,
             options: dict[str, Any] | None = None, *,
             calib: str = "wiki", samples: int = 128, seq_len: int = 512, seed: int = 0,
             text_field: str = "text", chat_template: bool = False, device: str = "cpu", batch_size: int = 8,
             dtype: torch.dtype = torch.float32, hessian_dtype: torch.dtype = torch.float32,
             overwrite: bool = False, resume: bool = False, restart: bool = False, allow_pickle: bool = False,
             verify: bool = True, progress: Progress | None = None, command: str = "quantize",
             extra_metrics: dict | Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Run a list of methods over a model in one engine pass and write the artifact.

    `methods` is a spec (names, lists) or methods already configured; `extra_metrics` (a dict, or
    a function of the model as the engine left it) joins the manifest's metrics."""
    started = time.perf_counter()
    device = check_device(device)
    world = World.from_env(device)
    device = world.device(device)
    progress = (progress or Progress()) if world.is_main else Progress()
    out = Path(out)
    configured = isinstance(methods, list) and all(isinstance(m, Method) for m in methods) and methods
    chain = methods if configured else make_methods(methods, options, command)
    if configured:
        check_order(chain)
    planless = next((m for m in chain if isinstance(m, MixedPrecision) and not m.config.plan), None)
    if planless is not None:  # a mixed-precision budget: search a plan, then come back here to build it
        from compressor.mixed.driver import Calibration, quantize_mixed

        if resume or restart:
            raise CompressorError("--resume and --restart do not apply to a mixed-precision search",
                                  "rerun it: the sensitivity pass resumes from its cache by itself")
        check_output(out, overwrite=overwrite, sources=[resolve_model_path(model, progress.log)])
        return quantize_mixed(model, chain, out, calib=Calibration(calib, samples, seq_len, seed, text_field,
                                                                   chat_template, batch_size),
                              device=device, dtype=dtype, hessian_dtype=hessian_dtype, overwrite=overwrite,
                              allow_pickle=allow_pickle, verify=verify, progress=progress, build=compress)
    prunes = any(m.produces == "structure" for m in chain)
    if resume and restart:
        raise CompressorError("--resume and --restart contradict each other",
                              "pass --resume to continue the interrupted run or --restart to discard it")
    if batch_size < 1:
        raise CompressorError(f"batch size must be at least 1 (got {batch_size})", "raise --batch-size")
    if hessian_dtype not in (torch.float32, torch.float64):
        raise CompressorError(f"Hessians accumulate in float32 or float64, not {hessian_dtype}",
                              "pass --hessian-dtype float32 or float64")
    source = resolve_model_path(model, progress.log)
    # The run directory keeps every finished block (about the source's size) beside the artifact;
    # per-block slicing can add shortcut matrices, so a sliced model may outgrow its source.
    check_output(out, overwrite=overwrite, sources=[source],
                 needs_bytes=source_bytes(source) * (2 if prunes else 3) // (1 if prunes else 2))
    run_path = run_directory_for(out)
    interrupted = (run_path / "run.json").is_file()
    if resume and not interrupted:
        raise CompressorError(f"no interrupted run to resume at {run_path}", "drop --resume to start a new run")
    if interrupted and not (resume or restart):
        raise CompressorError(f"an interrupted run of this output exists at {run_path}",
                              "pass --resume to continue it or --restart to discard it")

    loaded = load(model, dtype=dtype, allow_pickle=allow_pickle, progress=progress, verify=verify)
    if prunes and getattr(loaded.model.config, "base_model_type", None):
        raise CompressorError(f"{model} is already a sliced artifact", "prune the original checkpoint instead")
    for method in chain:
        method.check(loaded.model, loaded.adapter)
    original_config = copy.deepcopy(loaded.model.config)
    params_before = count_parameters(loaded.model)
    tokens = None
    if any(m.needs_calibration for m in chain):
        tokens = calibration_set(calib, loaded.tokenizer, samples, seq_len, seed, text_field, chat_template,
                                 progress.log)
    blocks = loaded.adapter.blocks(loaded.model)
    described = describe_methods(chain, None if configured else methods)
    # Everything that changes the numbers; a resumed run must match it exactly.
    key = fingerprint(__version__, loaded.source_hash, described,
                               tokens.sha256 if tokens else None, str(dtype), str(hessian_dtype), batch_size,
                               torch.device(device).type, world.size)
    run = RunDirectory(run_path, key, len(blocks), rank=world.rank if world.size > 1 else None)
    if restart and run_path.exists() and world.is_main:
        shutil.rmtree(run_path)
    world.barrier()
    pipeline = SequentialPipeline(loaded.model, loaded.adapter, chain, run, tokens, device=device,
                                  batch_size=batch_size, hessian_dtype=hessian_dtype, progress=progress, world=world)
    pipeline.execute(resume=resume)
    engine_s = time.perf_counter() - started
    if not world.is_main:  # every process holds the same result; the first one writes it
        world.barrier()
        return {"output": str(out), "rank": world.rank, "world_size": world.size}

    config, tensors, metrics = export.artifact_contents(loaded, chain, pipeline.block_meta, run, original_config,
                                                        params_before)
    if extra_metrics is not None:
        metrics.update(extra_metrics(loaded.model) if callable(extra_metrics) else extra_metrics)
    spec = export.structure(chain, pipeline.block_meta, loaded)
    artifacts.write_artifact(
        out, config=config, tensors=tensors, tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None), kind=export.artifact_kind(chain),
        source={"ref": loaded.name, "sha256": loaded.source_hash}, method=described,
        calibration=tokens.describe() | {"seed": seed} if tokens else None, metrics=metrics,
        overwrite=overwrite, build={"wall_s": time.perf_counter() - started, "engine_s": engine_s, "device": device,
                                    "processes": world.size, "peak_rss_mb": peak_rss_mb(),
                                    **({"spec": spec} if spec else {})})
    shutil.rmtree(run_path, ignore_errors=True)
    world.barrier()
    result = {"output": str(out), "method": described, **metrics, "wall_s": time.perf_counter() - started,
              "peak_rss_mb": peak_rss_mb()}
    if prunes:
        result.update({"model_type": config["model_type"], "slice_s": engine_s})
    return result


def quantize(model: str, method: str, out: str | Path, options: dict[str, Any] | None = None, mixed: bool = False,
             **settings) -> dict:
    """Quantize a model (a method or a list, e.g. "gptq", "awq+gptq") into a compressed-tensors artifact.
    `mixed` chooses each linear's format under the budget in `options` (target_bits, max_kl or
    max_ppl_increase), with the list's quantizer as the base."""
    from compressor.methods.quant.mixed import mixed_spec

    if mixed or any((options or {}).get(k) is not None for k in MIXED_BUDGETS):
        method, options = mixed_spec(method, options, mixed)
    return compress(model, method, out, options, command="quantize", **settings)


def prune(model: str, method: str, out: str | Path, sparsity: float | None = None,
          options: dict[str, Any] | None = None, **settings) -> dict:
    """Structurally prune a model (SliceGPT, MoDeGPT) into an artifact that transformers loads;
    `sparsity` None keeps the pruner's default."""
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise CompressorError(f"sparsity must be in (0, 1), got {sparsity}", "pass e.g. --sparsity 0.25")
    try:
        names = method_names(method)
    except CompressorError:
        names = []
    if not any(METHODS.get(n).produces == "structure" for n in names):
        pruners = [n for n, cls in METHODS.items() if cls.produces == "structure"]
        raise CompressorError(f"unknown pruning method {method!r}", f"choose one of: {', '.join(pruners)}")
    return compress(model, method, out, {"sparsity": sparsity, **(options or {})}, command="prune", **settings)


def sensitivity(model: str, method: str, out: str | Path, options: dict[str, Any] | None = None, *,
                calib: str = "wiki", samples: int = 128, seq_len: int = 512, seed: int = 0, text_field: str = "text",
                chat_template: bool = False, device: str = "cpu", batch_size: int = 8,
                dtype: torch.dtype = torch.float32, hessian_dtype: torch.dtype = torch.float32,
                overwrite: bool = False, allow_pickle: bool = False, verify: bool = True,
                progress: Progress | None = None) -> dict:
    """Per-linear sensitivities of every candidate format (one calibration pass, reused by later
    `quantize --mixed --sensitivity OUT` searches), with a heatmap and the most sensitive linears."""
    from compressor.methods.quant.mixed import mixed_spec
    from compressor.mixed.driver import Calibration, sensitivity_command

    progress = progress or Progress()
    device = check_device(device)
    names, options = mixed_spec(method, options, True)
    chain = make_methods(names, options, "sensitivity")
    if chain[-1].config.budget() is not None:
        raise CompressorError("a sensitivity pass takes no budget", "search one with `compress quantize --mixed`")
    out = Path(out)
    if (out / "run.json").is_file() and overwrite:
        shutil.rmtree(out)
    if not (out / "run.json").is_file():  # a directory of this pass's own is resumed or reused
        check_output(out, overwrite=overwrite, sources=[resolve_model_path(model, progress.log)])
    return sensitivity_command(model, chain, out, calib=Calibration(calib, samples, seq_len, seed, text_field,
                                                                    chat_template, batch_size),
                               device=device, dtype=dtype, hessian_dtype=hessian_dtype, allow_pickle=allow_pickle,
                               verify=verify, progress=progress)


# ---------------------------------------------------------------- recipes

def run_recipe(recipe_path: str | Path, model: str, out: str | Path, *, calib: str | None = None,
               device: str = "cpu", overwrite: bool = False, resume: bool = False, restart: bool = False,
               allow_pickle: bool = False, verify: bool = True, progress: Progress | None = None) -> dict:
    """Run a recipe's stages in order; each stage's output is the next one's input.

    A one-stage recipe writes OUT directly; longer chains keep intermediates in `.OUT.stages/`.
    `calib` overrides every stage's calibration data (the recipe's is the default).
    """
    from compressor.recipes import load_recipe

    progress = progress or Progress()
    recipe = load_recipe(recipe_path)
    for stage in recipe.stages:  # every stage's settings, before any work
        make_methods(stage.spec.method, stage.spec.options, stage.kind)
    check_device(device)
    out = Path(out)
    path = resolve_model_path(model, progress.log)
    check_output(out, overwrite=overwrite, sources=[path], needs_bytes=source_bytes(path) * 3 // 2)
    source, results = model, []
    for index, stage in enumerate(recipe.stages):
        last = index == len(recipe.stages) - 1
        target = out if last else out.with_name(f".{out.name}.stages") / f"{index:02d}-{stage.kind}"
        spec = stage.spec
        if resume and not last and (target / "manifest.json").is_file():
            progress.log(f"stage {index + 1}/{len(recipe.stages)} finished before; reusing {target}")
            source = str(target)
            continue
        progress.log(f"stage {index + 1}/{len(recipe.stages)}: {stage.kind} {spec.method}")
        cal = spec.calib
        interrupted = (run_directory_for(target) / "run.json").is_file()
        results.append(compress(source, spec.method, target, spec.options, command=stage.kind, calib=calib or cal.data,
                                samples=cal.samples, seq_len=cal.seq_len, seed=cal.seed, text_field=cal.text_field,
                                chat_template=cal.chat_template, batch_size=cal.batch_size, device=device,
                                overwrite=overwrite or not last, resume=resume and interrupted,
                                restart=restart and interrupted, allow_pickle=allow_pickle, verify=verify,
                                progress=progress))
        source = str(target)
    shutil.rmtree(out.with_name(f".{out.name}.stages"), ignore_errors=True)
    return {"recipe": recipe.name, "output": str(out), "stages": results}


# ---------------------------------------------------------------- evaluate

def evaluate(model: str, base: str | None = None, data: str = "wiki", windows: int = 64, window_len: int = 512,
             batch_size: int = 4, device: str = "cpu", text_field: str = "text", allow_pickle: bool = False,
             verify: bool = True, progress: Progress | None = None) -> dict:
    """Perplexity (and KL to `base`) on the held-out windows of the protocol."""
    from compressor.evaluation.perplexity import evaluate_models

    progress = progress or Progress()
    started = time.perf_counter()
    device = check_device(device)
    if batch_size < 1:
        raise CompressorError(f"batch size must be at least 1 (got {batch_size})", "raise --batch-size")
    for ref in (model, base):  # both exist before either is loaded
        if ref is not None:
            resolve_model_path(ref, progress.log)
    candidate = load(model, allow_pickle=allow_pickle, progress=progress, verify=verify, device=device)
    reference = load(base, allow_pickle=allow_pickle, progress=progress, verify=verify) if base else None
    tokenizer = candidate.tokenizer or (reference.tokenizer if reference else None)
    if reference is not None and candidate.model.config.vocab_size != reference.model.config.vocab_size:
        raise CompressorError(
            f"{model} and {base} have different vocabularies ({candidate.model.config.vocab_size} vs "
            f"{reference.model.config.vocab_size})", "KL needs a base model with the same tokenizer")
    tokens = evaluation_set(data, tokenizer, windows, window_len, text_field, progress.log)
    for m in (candidate, reference):
        if m is not None:
            m.model.to(device)
    results = evaluate_models({"model": candidate.model}, tokens,
                              reference.model if reference else None, batch_size, device, progress)
    row = results["model"]
    out = {
        "model": str(model), "base": base, "data": tokens.describe(), "windows": tokens.samples,
        "window_len": tokens.seq_len, "ppl": row["ppl"], "nll": row["nll"], "tokens": row["tokens"],
        "size_bytes": _size_on_disk(candidate.path),
        "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
    }
    if reference is not None:
        out.update({"kl": row["kl"], "base_ppl": results["base"]["ppl"]})
    return out


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return artifacts.weights_size(path) or sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ---------------------------------------------------------------- inspect / verify

def inspect(ref: str) -> dict:
    """Architecture, parameter count, bits per weight and size of a checkpoint or artifact."""
    path = resolve_model_path(ref)
    if path.is_file():  # GGUF: the dequantized model tells the architecture and parameter count
        loaded = load(path)
        config = loaded.model.config.to_dict()
        params, size = count_parameters(loaded.model), path.stat().st_size
        return {"path": str(path), "kind": "gguf", "architecture": (config.get("architectures") or ["?"])[0],
                "model_type": config.get("model_type"), "layers": config.get("num_hidden_layers"),
                "hidden_size": config.get("hidden_size"), "params": params, "size_bytes": size,
                "bits_per_weight_linears": None, "bits_per_weight_file": round(8 * size / params, 3)}
    config = artifacts.read_config(path)
    storage = artifacts.storage_summary(path)
    params, stored = storage["params"], storage["stored_bytes"]
    manifest = read_manifest(path) if (path / "manifest.json").exists() else {}
    qconfig = config.get("quantization_config")
    try:
        adapter = type(adapter_for_config(SimpleNamespace(model_type=config.get("model_type"),
                                                           base_model_type=config.get("base_model_type")))).__name__
    except CompressorError:
        adapter = None
    mixed = None
    if mixed_precision.is_mixed(qconfig):  # a format per linear: the bit map, and the bits over all of them
        layers = mixed_precision.bit_map(path, qconfig)
        weights = sum(v["params"] for v in layers.values())
        mixed = {"bits_per_weight_linears": round(sum(v["bits_per_weight"] * v["params"] for v in layers.values())
                                                  / weights, 4), "quantized_params": weights,
                 "quantization": {"formats": _counts(v["format"] for v in layers.values())},
                 "bit_map": {m: v["format"] for m, v in layers.items()}}
    return {
        "path": str(path), "kind": manifest.get("kind", "checkpoint"),
        "architecture": (config.get("architectures") or ["?"])[0], "model_type": config.get("model_type"),
        "adapter": adapter,
        "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
        "params": params, "size_bytes": stored,
        # The quantized linears' own bits (codes, scales, zero points), and the whole file's per
        # parameter, which also counts what stays in 16/32 bits (embeddings, norms, the head).
        "bits_per_weight_linears": (round(8 * storage["quantized_bytes"] / storage["quantized_params"], 4)
                                    if storage["quantized_params"] else None),
        "quantized_params": storage["quantized_params"],
        "bits_per_weight_file": round(8 * stored / max(params, 1), 3),
        "quantization": qconfig["config_groups"]["group_0"]["weights"] if qconfig else None,
        "method": manifest.get("method"), "source": manifest.get("source"),
        **(mixed or {}),
    }


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def verify(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CompressorError(f"artifact {path} does not exist", "pass the directory written by compress")
    from compressor.formats import packed

    problems = packed.verify_packed(path) if packed.is_packed(path) else manifests.verify(path)
    if problems:
        raise CompressorError(f"{path} failed verification: {'; '.join(problems)}",
                              "rebuild the artifact or restore it from a good copy")
    manifest = read_manifest(path)
    count = sum(len(v) for v in manifest["tensors"].values())
    return {"path": str(path), "ok": True, "tensors": count, "files": len(manifest["files"])}


# ---------------------------------------------------------------- lossless packing

def pack(model: str | Path, out: str | Path, *, dtype: str | None = None, options: dict[str, Any] | None = None,
         overwrite: bool = False, check: bool = True, verify: bool = True) -> dict:
    """Entropy-code a model's (or a quantized artifact's) tensors losslessly into a packed artifact."""
    from compressor.formats import packed
    from compressor.methods.lossless import native
    from compressor.methods.lossless.dfloat import PackConfig
    from compressor.models.loading import parse_dtype, source_hash

    path = resolve_model_path(model)
    if path.is_file():
        raise CompressorError(f"{path} is a GGUF file; pack works on safetensors directories",
                              "convert it first (e.g. `compress assets fetch` for the reference models)")
    if verify and (path / manifests.MANIFEST).is_file() and not packed.is_packed(path):
        manifests.check(path)  # never pack (and so bless) a tampered artifact
    try:
        config = PackConfig(**{k: v for k, v in (options or {}).items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CompressorError(f"invalid pack option {'.'.join(map(str, first['loc']))}: {first['msg']}",
                              "see `compress pack --help`") from None
    cast = None if dtype in (None, "keep") else parse_dtype(dtype)
    check_output(Path(out), overwrite=overwrite, sources=[path])  # before hashing the source
    result = packed.pack(path, Path(out), config, cast, overwrite=overwrite, check=check,
                         source={"path": str(path), "hash": source_hash(path)})
    return {**{k: v for k, v in result.items() if k != "files"}, "codec": native.status()}


def unpack(packed_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Rebuild the original tensors of a packed artifact, byte for byte (sha256 checked)."""
    from compressor.formats import packed
    from compressor.methods.lossless import native

    return {**packed.unpack(Path(packed_dir), Path(out), overwrite=overwrite), "codec": native.status()}


# ---------------------------------------------------------------- bench

def bench(artifact: str, device: str = "auto", batches: tuple[int, ...] = (1, 16), prompt_len: int = 512,
          gen_len: int = 128, base: str | None = None, repeats: int = 3, progress: Progress | None = None) -> dict:
    """Prefill and decode tokens/s and peak memory of an artifact through the loader `eval` uses,
    beside a dense base in the same run (default: the artifact's own weights dequantized)."""
    from compressor.evaluation.speed import measure
    from compressor.models.quant_runtime import kernel_summary

    progress = progress or Progress()
    target = _bench_device(device)
    if not batches or min(batches) < 1 or prompt_len < 1 or gen_len < 1:
        raise CompressorError(f"batch sizes, --prompt-len and --gen-len must be positive (got {list(batches)}, "
                              f"{prompt_len}, {gen_len})", "e.g. --batch 1,16 --prompt-len 512 --gen-len 128")
    cuda = target.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    runs = {}
    for label, ref in (("base", base or artifact), ("artifact", artifact)):
        progress.log(f"loading {label} {ref}")
        loaded = load(ref, dtype=dtype, progress=progress, device=str(target) if label == "artifact" else None)
        model = loaded.model.to(target)
        if cuda:
            torch.cuda.synchronize(target)
        weights_mb = (torch.cuda.memory_allocated(target) / 2**20) if cuda else None
        runtime = kernel_summary(model) or "dense float weights"
        progress.log(f"measuring {label} on {target} (batches {list(batches)})")
        rows = measure(model, target, list(batches), prompt_len, gen_len, repeats=repeats)
        runs[label] = {"ref": str(ref), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                       "runtime": runtime, "weights_memory_mb": weights_mb, "rows": rows}
        del loaded, model
        release_memory()
        if cuda:
            torch.cuda.empty_cache()
    speedup = [{"batch": a["batch"],
                "prefill_x": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                "decode_x": a["decode_tokens_per_s"] / b["decode_tokens_per_s"]}
               for a, b in zip(runs["artifact"]["rows"], runs["base"]["rows"])]
    note = None if cuda else ("CPU: the artifact runs the reference path (weights dequantized to float32 at load), "
                              "so it is no faster than the base; speed-ups need the CUDA kernels")
    return {"artifact": str(artifact), "device": torch.cuda.get_device_name(target) if cuda else "cpu",
            "peak_rss_mb": peak_rss_mb(), **runs, "speedup": speedup, "note": note}


def _bench_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(check_device(device))
    if target.type not in ("cpu", "cuda"):
        raise CompressorError(f"bench runs on cpu or cuda, not {device}", "use --device cpu or --device cuda")
    return target
