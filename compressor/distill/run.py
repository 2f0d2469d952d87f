"""`compress distill`: check everything that can be checked, then train, checkpoint, resume and
write the distilled student as an ordinary artifact (its own config, the teacher and data named
in the manifest), which `compress quantize`, `prune` and `pack` accept like any other."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from compressor import __version__
from compressor.calib.data import evaluation_set
from compressor.devices import check_device
from compressor.distill.checkpoint import TrainingCheckpoint, checkpoint_dir
from compressor.distill.data import TrainingWindows, teacher_samples, training_windows, with_teacher_samples
from compressor.distill.settings import DistillSettings
from compressor.distill.sharding import fsdp_requested
from compressor.distill.trainer import Trainer
from compressor.errors import CompressorError
from compressor.formats import artifact as artifacts
from compressor.models.adapters import count_parameters
from compressor.models.loading import LoadedModel, check_finite, resolve_model_path, source_bytes
from compressor.outputs import check_output
from compressor.progress import Progress


def make_accelerator(device: str, settings: DistillSettings):
    from accelerate import Accelerator

    cuda = torch.device(device).type == "cuda"
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and cuda)
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")


def check_pair(teacher: LoadedModel, student: LoadedModel, settings: DistillSettings) -> None:
    """The student can learn from this teacher: finite weights, one vocabulary; for the hidden-state
    loss, a narrower or equal model of the same family."""
    check_finite(teacher.model, f"the teacher {teacher.name}")
    check_finite(student.model, f"the student {student.name}")
    tv, sv = teacher.model.config.vocab_size, student.model.config.vocab_size
    if tv != sv:
        raise CompressorError(f"the teacher's vocabulary ({tv} tokens) differs from the student's ({sv})",
                              "distill between models that share a tokenizer")
    if teacher.tokenizer is not None and student.tokenizer is not None \
            and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise CompressorError("the teacher's and the student's tokenizers map tokens differently",
                              "distill between models that share a tokenizer")
    if settings.hidden_weight:
        t = teacher.adapter.text_config(teacher.model.config)
        s = student.adapter.text_config(student.model.config)
        if type(teacher.adapter) is not type(student.adapter) or s.hidden_size > t.hidden_size \
                or s.num_hidden_layers > t.num_hidden_layers:
            raise CompressorError(
                f"the hidden-state loss needs a student pruned from the teacher's architecture (got a "
                f"{type(student.adapter).__name__} {s.hidden_size}x{s.num_hidden_layers} student for a "
                f"{type(teacher.adapter).__name__} {t.hidden_size}x{t.num_hidden_layers} teacher)",
                "drop --hidden-weight, or distill into a pruned copy of the teacher")


def check_data(data: TrainingWindows, settings: DistillSettings, world: int) -> int:
    """The number of optimizer steps; errors when one batch or one step does not fit."""
    per_step = settings.batch_size * settings.grad_accum * world
    if data.windows.shape[0] < per_step:
        raise CompressorError(
            f"the training data has {data.tokens} tokens in {data.windows.shape[0]} windows of {settings.seq_len}; "
            f"one step needs {per_step} windows ({per_step * settings.seq_len} tokens)",
            "add text, or lower --batch-size, --grad-accum or --seq-len")
    step_tokens = per_step * settings.seq_len
    if settings.tokens < step_tokens:
        raise CompressorError(f"--tokens {settings.tokens} is less than one optimizer step ({step_tokens} tokens)",
                              f"pass --tokens {step_tokens} or more")
    return settings.tokens // step_tokens


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def distill(teacher: str, student: str, data: list[str], out: str | Path, settings: DistillSettings, *,
            eval_data: str = "wiki", device: str = "cpu", text_field: str = "text", overwrite: bool = False,
            resume: bool = False, restart: bool = False, allow_pickle: bool = False, verify: bool = True,
            progress: Progress | None = None, load: Callable[..., LoadedModel],
            peak_rss_mb: Callable[[], float]) -> dict:
    """`load` reads a model or artifact as a float model (api.load: manifest checks, every format);
    `peak_rss_mb` reads this process's peak memory."""
    started = time.perf_counter()
    device = check_device(device)
    if resume and restart:
        raise CompressorError("--resume and --restart contradict each other",
                              "pass --resume to continue the interrupted run or --restart to discard it")
    if not data:
        raise CompressorError("no training data given", "pass --data wiki or a text file")
    progress = progress or Progress()
    out = Path(out)
    paths = [resolve_model_path(ref, progress.log) for ref in (teacher, student)]
    for path in paths:
        if path.is_dir() and artifacts.is_quantized(path):
            raise CompressorError(f"{path} is quantized; distillation trains float weights",
                                  "distill the float model, then quantize the distilled one")
    check_output(out, overwrite=overwrite, sources=paths, needs_bytes=3 * source_bytes(paths[1]))
    saved = checkpoint_dir(out)
    if resume and not (saved / "latest" / "state.json").is_file():
        raise CompressorError(f"no interrupted distillation to resume at {saved}", "drop --resume to start a new run")
    if (saved / "latest" / "state.json").is_file() and not (resume or restart):
        raise CompressorError(f"an interrupted distillation of this output exists at {saved}",
                              "pass --resume to continue it or --restart to discard it")

    accelerator = make_accelerator(device, settings)
    if not accelerator.is_main_process:
        progress = Progress()
    bf16_teacher = accelerator.device.type == "cuda" and accelerator.mixed_precision == "bf16"
    teacher_model = load(teacher, dtype=torch.bfloat16 if bf16_teacher else torch.float32,
                         allow_pickle=allow_pickle, progress=progress, verify=verify)
    student_model = load(student, dtype=torch.float32, allow_pickle=allow_pickle, progress=progress, verify=verify)
    check_pair(teacher_model, student_model, settings)
    tokenizer = student_model.tokenizer or teacher_model.tokenizer
    windows = training_windows(data, tokenizer, settings.seq_len, settings.seed, text_field, progress.log)
    if settings.generate_data:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        progress.log(f"sampling {settings.generate_data} tokens of text from the teacher")
        teacher_model.model.to(accelerator.device)
        windows = with_teacher_samples(windows, teacher_samples(teacher_model.model, bos, settings.generate_data,
                                                                settings.seq_len, settings.seed, progress))
    steps = check_data(windows, settings, accelerator.num_processes)
    sharded = fsdp_requested(accelerator, settings.fsdp)
    if settings.fsdp and not sharded:
        progress.log("--fsdp shards the student over several processes (accelerate launch / torchrun); "
                     "this single process trains it whole")
    held_out = evaluation_set(eval_data, tokenizer, settings.eval_windows, settings.seq_len, text_field, progress.log)
    progress.log(f"distilling {student} from {teacher}: {steps} steps of "
                 f"{steps and settings.tokens // steps} tokens on {accelerator.num_processes} process(es)"
                 f"{' (FSDP)' if sharded else ''}, "
                 f"{windows.tokens} tokens of text ({windows.tokens and settings.tokens / windows.tokens:.1f} epochs)")
    run = TrainingCheckpoint(out, fingerprint(
        __version__, teacher_model.source_hash, student_model.source_hash, windows.sha256, settings.fingerprinted(),
        accelerator.num_processes, accelerator.device.type, sharded))
    if resume:
        run.state()  # a resume with other settings is refused before the models move
    elif restart and accelerator.is_main_process:
        shutil.rmtree(saved, ignore_errors=True)
    accelerator.wait_for_everyone()

    trainer = Trainer(accelerator, teacher_model.model, teacher_model.adapter, student_model.model,
                      student_model.adapter, windows, settings, held_out.input_ids, sharded)
    start = 0
    if resume:
        state, tensors, optimizer = run.load()
        trainer.load_optimizer_state(optimizer)
        trainer.load_model_state(tensors)
        start = state["step"]
        trainer.history.losses, trainer.history.evals = state["losses"], state["evals"]
        progress.log(f"resuming after step {start}/{steps}")
    else:
        trainer.evaluate(0, progress)

    def save(step: int) -> None:
        model, optimizer = trainer.model_state(), trainer.optimizer_state()  # every process: sharded ones gather
        if accelerator.is_main_process:
            run.save({"step": step, "losses": trainer.history.losses, "evals": trainer.history.evals}, model, optimizer)
        accelerator.wait_for_everyone()

    trainer.train(start, save, progress)
    final = trainer.evaluate(steps, progress)
    tensors = trainer.student_state()  # every process: sharded ones gather
    result = {"output": str(out), "steps": steps, "tokens": steps * trainer.tokens_per_step,
              "rank": accelerator.process_index, "world_size": accelerator.num_processes}
    if accelerator.is_main_process:
        train_s = trainer.history.train_seconds
        rate = (steps - start) * trainer.tokens_per_step / train_s if train_s else None
        metrics = {"params": count_parameters(trainer.unwrapped.student), "tokens": result["tokens"], "steps": steps,
                   "loss": trainer.history.losses[-1], "eval": {k: final[k] for k in ("ppl", "kl")},
                   "eval_before": {k: trainer.history.evals[0][k] for k in ("ppl", "kl")}}
        write_student(out, student_model, trainer, tensors, overwrite=overwrite, method={
            "name": "distill", "config": settings.model_dump(), "teacher": {"ref": teacher, "sha256":
                                                                           teacher_model.source_hash}},
            data=windows.describe() | {"eval": held_out.describe()}, metrics=metrics,
            build={"wall_s": time.perf_counter() - started, "train_s": train_s, "tokens_per_s": rate,
                   "device": str(accelerator.device), "processes": accelerator.num_processes, "fsdp": sharded,
                   "peak_rss_mb": peak_rss_mb(), "losses": trainer.history.losses, "evals": trainer.history.evals})
        shutil.rmtree(saved, ignore_errors=True)
        result.update(metrics, tokens_per_s=rate, wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
                      losses=trainer.history.losses)
    accelerator.wait_for_everyone()
    return result


def write_student(out: Path, student: LoadedModel, trainer: Trainer, state: dict[str, torch.Tensor], *,
                  overwrite: bool, method: dict, data: dict, metrics: dict, build: dict) -> Path:
    """The student's own config (a sliced artifact stays the registered sliced class) with the
    trained weights (`state`: full tensors) in the dtype it was stored in."""
    model, adapter = trainer.unwrapped.student, student.adapter
    source_config = student.path / "config.json" if student.path.is_dir() else None
    config = json.loads(source_config.read_text()) if source_config else model.config.to_dict()
    config["dtype"] = str(student.stored_dtype).removeprefix("torch.")
    state = dict(state)
    for name in adapter.tied_weight_names(model):
        state.pop(name, None)
    keep = student.stored_dtype
    tensors = {k: (v.detach().to(keep) if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in sorted(state.items())}
    return artifacts.write_artifact(
        out, config=config, tensors=tensors, tokenizer=student.tokenizer,
        generation_config=getattr(model, "generation_config", None), kind="distilled",
        source={"ref": student.name, "sha256": student.source_hash}, method=method, calibration=data,
        metrics=metrics, overwrite=overwrite, build=build)
