"""The Python API behind the CLI: fetch assets, quantize, evaluate, inspect, verify."""

from __future__ import annotations

import copy
import json
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
from compressor.formats import mixed_precision
from compressor.formats import manifest as manifests
from compressor.formats.manifest import read_manifest
from compressor import export
from compressor.methods import METHODS, Method
from compressor.methods.quant.mixed import MIXED_BUDGETS, MixedPrecision
from compressor.methods.composition import build_methods, method_names
from compressor.methods.composition import describe as describe_methods
from compressor.models import assets
from compressor.models.adapters import adapter_for_config, count_parameters
from compressor.models.loading import (LoadedModel, check_finite, load_model, quick_identity, resolve_model_path,
                                      source_bytes)
from compressor.outputs import check_output, is_safe_name, writes_output
from compressor.pipeline.checkpoint import RunDirectory
from compressor.pipeline.distributed import World
from compressor.pipeline.progress import Progress
from compressor.pipeline.resources import device_batch
from compressor.pipeline.sequential import SequentialPipeline, check_order
from compressor.util import fingerprint, process_age, release_memory, write_atomic


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


def device_peak(device: str) -> dict:
    """Peak memory the compute device's allocator held, where it is a GPU."""
    if torch.device(device).type != "cuda":
        return {}
    return {"device_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


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
         progress: Progress | None = None, verify: bool = True, device: str | None = None,
         lazy: bool = False) -> LoadedModel:
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
        from compressor.formats.universal import load_with_kernels

        return load_with_kernels(path, str(ref), dtype, str(device), progress.warn)
    if path.is_dir() and artifacts.is_quantized(path):
        from compressor.formats.universal import load_quantized_artifact

        return load_quantized_artifact(path, str(ref), dtype)
    loaded = load_model(path, dtype=dtype, allow_pickle=allow_pickle, log=progress.log, warn=progress.warn, lazy=lazy)
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


@writes_output
def compress(model: str, methods: str | list[str] | list[Method], out: str | Path,
             options: dict[str, Any] | None = None, *,
             calib: str = "wiki", samples: int = 128, seq_len: int = 512, seed: int = 0,
             text_field: str = "text", chat_template: bool = False, device: str = "cpu", batch_size: int = 8,
             dtype: torch.dtype = torch.float32, hessian_dtype: torch.dtype = torch.float32,
             keep_dtype: torch.dtype | None = None,
             overwrite: bool = False, resume: bool = False, restart: bool = False, allow_pickle: bool = False,
             verify: bool = True, progress: Progress | None = None, command: str = "quantize",
             extra_metrics: dict | Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Run a list of methods over a model in one engine pass and write the artifact.

    `methods` is a spec (names, lists) or methods already configured; `extra_metrics` (a dict, or
    a function of the model as the engine left it) joins the manifest's metrics; `keep_dtype`
    stores the tensors left unquantized (embeddings, norms, a tied head) in that dtype instead of
    the checkpoint's own."""
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
    export.check_formats(chain)
    planless = next((m for m in chain if isinstance(m, MixedPrecision) and not m.config.plan), None)
    if planless is not None:  # a mixed-precision budget: search a plan, then come back here to build it
        from compressor.mixed.driver import Calibration, quantize_mixed

        # The sensitivity pass resumes from its own directory by itself; --resume / --restart are
        # about the build after the search (its run directory beside the output), checked before the pass.
        check_output(out, overwrite=overwrite, sources=[resolve_model_path(model, progress.log)])
        _check_run_state(out, resume, restart)
        return quantize_mixed(model, chain, out, calib=Calibration(calib, samples, seq_len, seed, text_field,
                                                                   chat_template, batch_size),
                              device=device, dtype=dtype, hessian_dtype=hessian_dtype, overwrite=overwrite,
                              resume=resume, restart=restart,
                              allow_pickle=allow_pickle, verify=verify, progress=progress, load=load, build=compress)
    prunes = any(m.produces == "structure" for m in chain)
    if resume and restart:
        _check_run_state(out, resume, restart)
    if batch_size < 1:
        raise CompressorError(f"batch size must be at least 1 (got {batch_size})", "raise --batch-size")
    if samples < 1 or seq_len < 1:  # checked whether or not a method calibrates: a wrong setting is never ignored
        raise CompressorError(f"--samples and --seq-len must be at least 1 (got {samples} and {seq_len})",
                              "e.g. --samples 128 --seq-len 512")
    if hessian_dtype not in (torch.float32, torch.float64):
        raise CompressorError(f"Hessians accumulate in float32 or float64, not {hessian_dtype}",
                              "pass --hessian-dtype float32 or float64")
    if keep_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise CompressorError(f"unquantized tensors are stored in float32, bfloat16 or float16, not {keep_dtype}",
                              "pass --keep-dtype bfloat16, float16, float32 or source")
    source = resolve_model_path(model, progress.log)
    # The run directory keeps every finished block (about the source's size) beside the artifact;
    # per-block slicing can add shortcut matrices, so a sliced model may outgrow its source.
    check_output(out, overwrite=overwrite, sources=[source],
                 needs_bytes=source_bytes(source) * (2 if prunes else 3) // (1 if prunes else 2))
    run_path = _check_run_state(out, resume, restart)

    # Without a pruner (which edits the whole model) the blocks stay on disk until the engine reads
    # them: host memory holds one block, the embedding and the head, whatever the model's size.
    # Metrics measured on the finished model in memory (mixed precision's) need it whole.
    phases: dict[str, float] = {}
    startup = process_age()  # interpreter start and imports, before this call
    if startup is not None:
        phases["startup"] = max(startup - (time.perf_counter() - started), 0.0)
    phases["setup"] = time.perf_counter() - started  # checks, and the libraries they import
    mark = time.perf_counter()
    lazy = not prunes and extra_metrics is None
    loaded = load(model, dtype=dtype, allow_pickle=allow_pickle, progress=progress, verify=verify, lazy=lazy)
    phases["load"] = time.perf_counter() - mark
    if keep_dtype is not None:
        loaded.stored_dtype = keep_dtype
    if prunes and getattr(loaded.model.config, "base_model_type", None):
        raise CompressorError(f"{model} is already a sliced artifact", "prune the original checkpoint instead")
    prepared = time.perf_counter()  # "prepare": the methods' checks, the run's identity, the engine's set-up
    for method in chain:
        method.check(loaded.model, loaded.adapter)
    original_config = copy.deepcopy(loaded.model.config)
    params_before = count_parameters(loaded.model)
    tokens = None
    if any(m.needs_calibration for m in chain):
        mark = time.perf_counter()
        tokens = calibration_set(calib, loaded.tokenizer, samples, seq_len, seed, text_field, chat_template,
                                 progress.log)
        phases["calibration"] = time.perf_counter() - mark
    blocks = loaded.adapter.blocks(loaded.model)
    described = describe_methods(chain, None if configured else methods)
    # Everything that changes the numbers; a resumed run must match it exactly.
    key = fingerprint(__version__, quick_identity(loaded.path), described,
                               tokens.sha256 if tokens else None, str(dtype), str(hessian_dtype), batch_size,
                               torch.device(device).type, world.size)
    run = RunDirectory(run_path, key, len(blocks), rank=world.rank if world.size > 1 else None)
    if restart and run_path.exists() and world.is_main:
        shutil.rmtree(run_path)
    world.barrier()
    early = export.EarlyExport(loaded, chain, run) if export.EarlyExport.applies(loaded, chain) else None
    pipeline = SequentialPipeline(loaded.model, loaded.adapter, chain, run, tokens, device=device,
                                  batch_size=device_batch(batch_size, seq_len, torch.device(device)),
                                  hessian_dtype=hessian_dtype, progress=progress, world=world, lazy=loaded.lazy,
                                  on_block_saved=early.block if early is not None else None)
    mark = time.perf_counter()
    phases["prepare"] = mark - prepared - phases.get("calibration", 0.0)
    pipeline.execute(resume=resume)
    phases["engine"] = time.perf_counter() - mark
    engine_s = time.perf_counter() - started
    if not world.is_main:  # every process holds the same result; the first one writes it
        world.barrier()
        return {"output": str(out), "rank": world.rank, "world_size": world.size}

    mark = time.perf_counter()
    config, tensors, metrics = export.artifact_contents(loaded, chain, pipeline.block_meta, run, original_config,
                                                        params_before, early)
    if extra_metrics is not None:
        metrics.update(extra_metrics(loaded.model) if callable(extra_metrics) else extra_metrics)
    spec = export.structure(chain, pipeline.block_meta, loaded)
    phases["encode"] = time.perf_counter() - mark
    source_sha256 = loaded.source_sha256()
    phases["source_hash_wait"] = time.perf_counter() - mark - phases["encode"]
    writer_phases: dict[str, float] = {}
    artifacts.write_artifact(
        out, config=config, tensors=tensors, tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None), kind=export.artifact_kind(chain),
        source={"ref": loaded.name, "sha256": source_sha256}, method=described,
        calibration=tokens.describe() | {"seed": seed} if tokens else None, metrics=metrics,
        overwrite=overwrite, build={"wall_s": time.perf_counter() - started, "engine_s": engine_s, "device": device,
                                    "processes": world.size, "peak_rss_mb": peak_rss_mb(),
                                    "phases_s": {**phases, "embed": pipeline.embed_s},
                                    "blocks_s": pipeline.block_times, "checkpoint_s": pipeline.checkpoint_times,
                                    "batch_size": pipeline.batch_size,
                                    "activations": pipeline.activations, "blocks_window": pipeline.window,
                                    **device_peak(device), **({"spec": spec} if spec else {})},
        timings=writer_phases)
    mark_cleanup = time.perf_counter()
    shutil.rmtree(run_path, ignore_errors=True)
    writer_phases["cleanup"] = time.perf_counter() - mark_cleanup
    world.barrier()
    result = {"output": str(out), "method": described, **metrics, "wall_s": time.perf_counter() - started,
              "peak_rss_mb": peak_rss_mb(), "write_s": time.perf_counter() - mark,
              "phases_s": {**phases, "embed": pipeline.embed_s, **writer_phases}}
    if prunes:
        result.update({"model_type": config["model_type"], "slice_s": engine_s})
    return result


def _check_run_state(out: Path, resume: bool, restart: bool) -> Path:
    """The run directory beside `out`, after checking --resume / --restart against it."""
    if resume and restart:
        raise CompressorError("--resume and --restart contradict each other",
                              "pass --resume to continue the interrupted run or --restart to discard it")
    run_path = run_directory_for(out)
    interrupted = (run_path / "run.json").is_file()
    if resume and not interrupted:
        raise CompressorError(f"no interrupted run to resume at {run_path}", "drop --resume to start a new run")
    if interrupted and not (resume or restart):
        raise CompressorError(f"an interrupted run of this output exists at {run_path}",
                              "pass --resume to continue it or --restart to discard it")
    return run_path


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
                               verify=verify, progress=progress, load=load)


# ---------------------------------------------------------------- distill

@writes_output
def distill(teacher: str, student: str, data: str | list[str], out: str | Path, settings: dict | None = None,
            **options) -> dict:
    """Distill `teacher` into `student` on `data` (a reference text, files; comma-separated or a
    list) and write the student as an artifact; `settings` are DistillSettings fields."""
    from compressor.distill.run import distill as run
    from compressor.distill.settings import parse_settings

    refs = [d.strip() for d in data.split(",") if d.strip()] if isinstance(data, str) else list(data)
    return run(teacher, student, refs, out, parse_settings(settings), load=load, peak_rss_mb=peak_rss_mb, **options)


# ---------------------------------------------------------------- recipes

RECIPE_STATE = "recipe-run.json"


def check_stage(stage) -> None:
    """A recipe stage's settings, checked before any stage runs."""
    if stage.kind in ("prune", "quantize"):
        make_methods(stage.spec.method, stage.spec.options, stage.kind)
    elif stage.kind == "pack":
        _pack_config(stage.spec.options)
    elif stage.kind == "distill":
        from compressor.distill.settings import parse_settings

        parse_settings(stage.spec.settings)


@writes_output
def run_recipe(recipe_path: str | Path, model: str, out: str | Path, *, calib: str | None = None,
               device: str = "cpu", overwrite: bool = False, resume: bool = False, restart: bool = False,
               allow_pickle: bool = False, verify: bool = True, progress: Progress | None = None) -> dict:
    """Run a recipe's stages in order, each reading what the stage before it made; every stage's
    output goes under OUT (`01-prune/`, `02-distill/`, ..., `04-eval.json`, `05-report/`), and
    `--resume` continues after the last finished stage (inside an interrupted engine pass, from its
    last finished block). `calib` overrides every stage's calibration data."""
    from compressor.recipes import load_recipe

    progress = progress or Progress()
    recipe = load_recipe(recipe_path)
    names = recipe.stage_names()
    for stage in recipe.stages:  # every stage's settings, before any work
        check_stage(stage)
    if resume and restart:
        raise CompressorError("--resume and --restart contradict each other",
                              "pass --resume to continue the interrupted run or --restart to discard it")
    check_device(device)
    out = Path(out)
    source = resolve_model_path(model, progress.log)
    if not out.exists():
        check_output(out, overwrite=False, sources=[source], needs_bytes=source_bytes(source) * 2)
    state = _recipe_state(out, recipe, names, str(source), overwrite, resume, restart)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RECIPE_STATE, json.dumps(state, indent=2, default=str).encode())
    try:
        return _run_stages(recipe, names, state, out, model, calib=calib, device=device, resume=resume,
                           allow_pickle=allow_pickle, verify=verify, progress=progress)
    except CompressorError:
        # Bad input found in the first stage, before anything was kept: leave no trace of this run.
        if created and not state["done"] and not any(out.glob(".*.run/run.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_stages(recipe, names: list[str], state: dict, out: Path, model: str, *, calib: str | None, device: str,
                resume: bool, allow_pickle: bool, verify: bool, progress: Progress) -> dict:
    current, made, eval_settings = model, [], None
    for index, (stage, name) in enumerate(zip(recipe.stages, names)):
        spec, target = stage.spec, out / name
        if stage.kind == "eval":
            eval_settings = spec
        if name in state["done"]:
            progress.log(f"stage {index + 1}/{len(names)} {name}: finished before")
        else:
            progress.log(f"stage {index + 1}/{len(names)} {name}")
            result = _run_stage(stage, target, current, model, made, eval_settings, out, calib=calib, device=device,
                                resume=resume, allow_pickle=allow_pickle, verify=verify, progress=progress)
            state["done"][name] = result
            write_atomic(out / RECIPE_STATE, json.dumps(state, indent=2, default=str).encode())
        if stage.makes_artifact:
            current = str(target)
            made.append(current)
    return {"recipe": recipe.name, "output": str(out), "stages": state["done"], "artifact": current}


def _recipe_state(out: Path, recipe, names: list[str], source: str, overwrite: bool, resume: bool,
                  restart: bool) -> dict:
    """The recipe run's state file: a new one, or the interrupted one to resume; an existing
    finished run is replaced only with --overwrite, and a directory we did not write never."""
    fresh = {"tool": "compressor", "recipe": recipe.model_dump(mode="json"), "source": source,
             "stages": names, "done": {}}
    state_file = out / RECIPE_STATE
    if not out.exists():
        if resume:
            raise CompressorError(f"no interrupted recipe run to resume at {out}", "drop --resume to start one")
        return fresh
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("tool") != "compressor":
        check_output(out, overwrite=overwrite)  # the same rules as any output: refused unless ours
        return fresh
    finished = set(state.get("done", {})) >= set(state.get("stages", []))
    if resume:
        if state.get("recipe") != fresh["recipe"] or state.get("source") != source:
            raise CompressorError(f"the recipe run in {out} was started with another recipe or model",
                                  "rerun with the original ones, or pass --restart to discard it")
        return state
    if not (restart or (finished and overwrite)):
        raise CompressorError(
            f"{'a finished' if finished else 'an interrupted'} recipe run exists at {out}",
            "pass --overwrite to replace it" if finished else "pass --resume to continue it or --restart to discard it")
    for name in state.get("stages", []):  # only what that run wrote
        entry = out / name
        if is_safe_name(name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        for extra in (out / f"{name}.json", run_directory_for(entry)):
            if is_safe_name(name) and extra.is_file():
                extra.unlink()
            elif is_safe_name(name) and extra.is_dir():
                shutil.rmtree(extra)
    return fresh


def _run_stage(stage, target: Path, current: str, source: str, made: list[str], eval_settings, out: Path, *,
               calib: str | None, device: str, resume: bool, allow_pickle: bool, verify: bool,
               progress: Progress) -> dict:
    spec = stage.spec
    if stage.kind in ("prune", "quantize"):
        cal = spec.calib
        interrupted = (run_directory_for(target) / "run.json").is_file()
        return compress(current, spec.method, target, spec.options, command=stage.kind, calib=calib or cal.data,
                        samples=cal.samples, seq_len=cal.seq_len, seed=cal.seed, text_field=cal.text_field,
                        chat_template=cal.chat_template, batch_size=cal.batch_size, device=device, overwrite=True,
                        resume=resume and interrupted, restart=not (resume and interrupted) and interrupted,
                        allow_pickle=allow_pickle, verify=verify, progress=progress)
    if stage.kind == "distill":
        from compressor.distill.checkpoint import checkpoint_dir

        interrupted = (checkpoint_dir(target) / "latest" / "state.json").is_file()
        return distill(spec.teacher or source, current, spec.data, target, spec.settings, eval_data=spec.eval_data,
                       device=device, overwrite=True, resume=resume and interrupted,
                       restart=not (resume and interrupted) and interrupted, allow_pickle=allow_pickle,
                       verify=verify, progress=progress)
    if stage.kind == "pack":
        return pack(current, target, dtype=spec.dtype, options=spec.options, overwrite=True, verify=verify,
                    progress=progress)
    from compressor.evaluation.suite import EvalCache, SuiteSettings, evaluate_all
    from compressor.recipes import EvalStage

    evaluation = eval_settings or EvalStage()  # a report without an eval stage uses the defaults
    settings = SuiteSettings(tuple(evaluation.texts), evaluation.windows, evaluation.window_len,
                             tuple(evaluation.tasks), evaluation.limit, evaluation.batch_size, device)
    cache = out / ".eval-cache"
    if stage.kind == "eval":
        # The recipe made `current` from `source` through its earlier stages: no lineage check needed.
        base, (candidate,) = evaluate_all([current], source, settings, EvalCache(cache), True, progress)
        if candidate.error:
            raise CompressorError(f"cannot evaluate {current}: {candidate.error}", "rebuild that stage's artifact")
        result = {"model": current, "base": source, "settings": settings.key(), "result": candidate.result,
                  "base_result": base.result}
        write_atomic(target.with_name(target.name + ".json"), json.dumps(result, indent=1, default=str).encode())
        return {"output": str(target.with_name(target.name + ".json"))}
    return report(made or [current], source, target, texts=settings.texts, windows=settings.windows,
                  window_len=settings.window_len, tasks=settings.tasks, limit=settings.limit,
                  batch_size=settings.batch_size, device=device, cache=cache, title=spec.title, overwrite=True,
                  progress=progress)


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
    from compressor.formats.universal import open_model

    candidate = open_model(model, allow_pickle=allow_pickle, device=device, verify=verify, log=progress.log,
                           warn=progress.warn)
    reference = (open_model(base, allow_pickle=allow_pickle, verify=verify, log=progress.log,
                            warn=progress.warn) if base else None)
    for loaded, ref in ((candidate, model), (reference, base)):
        if loaded is not None:
            check_finite(loaded.model, ref)
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


def evaluate_tasks(model: str, tasks: list[str], *, limit: float | None = None, num_fewshot: int | None = None,
                   device: str = "cpu", batch_size: int = 1, add_bos_token: bool | None = None,
                   chat_template: bool = False, verify: bool = True, progress: Progress | None = None) -> dict:
    """lm-eval tasks (local or any whose data is available offline) on any artifact, in-process."""
    from compressor.evaluation.lm_eval_bridge import run_tasks

    started = time.perf_counter()
    device = check_device(device)
    resolve_model_path(model)
    result = run_tasks(model, tasks, limit=limit, num_fewshot=num_fewshot, device=device, batch_size=batch_size,
                       add_bos_token=add_bos_token, apply_chat_template=chat_template, verify=verify,
                       progress=progress)
    return {"model": str(model), **result, "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


@writes_output
def report(artifacts_: list[str], base: str, out: str | Path, *, texts: tuple[str, ...] = ("wiki", "austen"),
           windows: int = 64, window_len: int = 512, tasks: tuple[str, ...] = (), limit: float | None = None,
           batch_size: int = 4, device: str = "cpu", allow_mixed_base: bool = False, cache: str | Path | None = None,
           title: str | None = None, overwrite: bool = False, bench: list[str | Path] = (),
           progress: Progress | None = None) -> dict:
    """Evaluate candidates against a base (cached by content hash) and write report.md + report.html.

    Candidates that cannot be read are named in the report and in the error raised after it is
    written; the others are still reported."""
    from compressor.evaluation.suite import EvalCache, SuiteSettings, evaluate_all
    from compressor.reporting import render
    from compressor.outputs import atomic_dir
    from compressor.reporting.compare import build_page

    progress = progress or Progress()
    started = time.perf_counter()
    if not artifacts_:
        raise CompressorError("no artifacts to report on", "pass one or more artifact paths")
    if batch_size < 1 or windows < 1:
        raise CompressorError("--batch-size and --windows must be at least 1", "raise them")
    out = Path(out)
    device = check_device(device)
    for ref in (base, *artifacts_):  # every input exists before anything is evaluated
        resolve_model_path(ref, progress.log)
    _check_report_output(out, overwrite)
    settings = SuiteSettings(tuple(texts), windows, window_len, tuple(tasks), limit, batch_size, device)
    base_c, candidates = evaluate_all(list(artifacts_), base, settings, EvalCache(cache), allow_mixed_base, progress)
    page = build_page(base_c, candidates, settings, title, [_read_json(p, "bench result") for p in bench])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        written = render.write(page, tmp)
        data = {"base": base_c.ref, "settings": settings.key(),
                "rows": [{"ref": c.ref, "identity": c.identity, "error": c.error, "flags": c.flags,
                          "cached": c.cached, "result": c.result} for c in [base_c, *candidates]]}
        (tmp / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    evaluated = sum(1 for c in [base_c, *candidates] if c.result is not None and not c.cached)
    result = {"output": str(out), "report": str(out / "report.md"), "html": str(out / "report.html"),
              "figures": len(written["figures"]), "candidates": len(candidates), "evaluated": evaluated,
              "cached": sum(1 for c in [base_c, *candidates] if c.cached), "wall_s": time.perf_counter() - started}
    failed = [c for c in candidates if c.error]
    if failed:
        names = "; ".join(f"{c.ref}: {c.error}" for c in failed)
        raise CompressorError(f"report written to {out} without {len(failed)} of {len(candidates)} artifacts "
                              f"({names})", "fix or remove the named artifacts and rerun (evaluations are cached)")
    return result


def _read_json(path: str | Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressorError(f"cannot read {what} {path} ({exc})", "pass the JSON `compress bench --json` printed")
    if not isinstance(data, dict):
        raise CompressorError(f"{what} {path} is not a JSON object", "pass the JSON `compress bench --json` printed")
    return data


REPORT_ENTRIES = {"report.md", "report.html", "report.json", "report_files"}


def _check_report_output(out: Path, overwrite: bool) -> None:
    """A report directory `compress report` wrote may be replaced with --overwrite; anything else
    goes through the artifact output checks."""
    if overwrite and out.is_dir() and not out.is_symlink() and (out / "report.json").is_file() \
            and {p.name for p in out.iterdir()} <= REPORT_ENTRIES:
        return
    check_output(out, overwrite=overwrite, kind="report")


def publish(results: str | Path, out: str | Path) -> dict:
    """reports/index.md and reports/index.html from the committed benchmark results."""
    from compressor.reporting import render
    from compressor.reporting.published import build_index

    page = build_index(Path(results))
    Path(out).mkdir(parents=True, exist_ok=True)
    written = render.write(page, Path(out), stem="index")
    return {**written, "sections": [s.title for s in page.sections], "rows": sum(len(s.rows) for s in page.sections)}


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

def _pack_config(options: dict[str, Any] | None):
    from compressor.codecs.dfloat import PackConfig

    try:
        return PackConfig(**{k: v for k, v in (options or {}).items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CompressorError(f"invalid pack option {'.'.join(map(str, first['loc']))}: {first['msg']}",
                              "see `compress pack --help`") from None


@writes_output
def pack(model: str | Path, out: str | Path, *, dtype: str | None = None, options: dict[str, Any] | None = None,
         overwrite: bool = False, check: bool = True, verify: bool = True,
         progress: Progress | None = None) -> dict:
    """Entropy-code a model's (or a quantized artifact's) tensors losslessly into a packed artifact."""
    from compressor.formats import packed
    from compressor.codecs import native
    from compressor.models.loading import parse_dtype, source_hash

    path = resolve_model_path(model)
    if path.is_file():
        raise CompressorError(f"{path} is a GGUF file; pack works on safetensors directories",
                              "convert it first (e.g. `compress assets fetch` for the reference models)")
    if verify and (path / manifests.MANIFEST).is_file() and not packed.is_packed(path):
        manifests.check(path)  # never pack (and so bless) a tampered artifact
    config = _pack_config(options)
    cast = None if dtype in (None, "keep") else parse_dtype(dtype)
    check_output(Path(out), overwrite=overwrite, sources=[path])  # before hashing the source
    result = packed.pack(path, Path(out), config, cast, overwrite=overwrite, check=check,
                         source={"path": str(path), "hash": source_hash(path)}, progress=progress)
    return {**{k: v for k, v in result.items() if k != "files"}, "codec": native.status()}


@writes_output
def unpack(packed_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Rebuild the original tensors of a packed artifact, byte for byte (sha256 checked)."""
    from compressor.formats import packed
    from compressor.codecs import native

    return {**packed.unpack(Path(packed_dir), Path(out), overwrite=overwrite), "codec": native.status()}


# ---------------------------------------------------------------- bench

def bench(artifact: str, device: str = "auto", batches: tuple[int, ...] = (1, 16), prompt_len: int = 512,
          gen_len: int = 128, base: str | None = None, repeats: int = 3, progress: Progress | None = None) -> dict:
    """Prefill and decode tokens/s and peak memory of an artifact through the loader `eval` uses,
    beside a dense base in the same run (default: the artifact's own weights dequantized)."""
    from compressor.evaluation.speed import measure
    from compressor.formats.quant_runtime import kernel_summary

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
