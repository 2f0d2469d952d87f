"""Multi-GPU runs on the two-GPU machine: distillation with DDP and FSDP, data-parallel GPTQ
calibration over NCCL, measured scaling.

Parts (each writes DIR/multigpu_<part>.json; `merge` joins them into results/multigpu.json):

    torchrun --nproc-per-node N benchmarks/multigpu.py ddp --out DIR     # tokens/s of the distill step, N GPUs
    python benchmarks/multigpu.py curve --out DIR --models DIR           # `compress distill` 1 GPU vs 2 (accelerate
                                                                         # launch), checkpoint + kill + resume on 2
    python benchmarks/multigpu.py fsdp --out DIR                         # 8B-shaped student: 1 GPU OOMs, FSDP on 2
    python benchmarks/multigpu.py calib --out DIR --models DIR           # GPTQ calibration 1 GPU vs torchrun 2
    python benchmarks/multigpu.py make-models --out DIR --tokenizer DIR  # the synthetic models the parts use
    python benchmarks/multigpu.py merge DIR/*.json ; python benchmarks/multigpu.py --report-only

Models are random-weight models of fixed shapes (built on the machine from a config): the
reference pair (smollm2-135m's shape and a ~99M width-pruned student) and an 8B-shaped Llama
(Llama-3-8B's widths). Speed and memory do not depend on the weights; the loss-curve comparison
only needs the same weights in both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, fmt, machine, report_cli, table, write_report, write_results  # noqa: E402
from minitron import H200_BF16, flops_per_token, reference_shapes, time_steps  # noqa: E402

NAME = "multigpu"
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(ENV)


def eight_b_config(layers: int = 32, vocab: int = 128256):
    """Llama-3-8B's shape (hidden 4096, MLP 14336, 32 heads / 8 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_part(out: Path, part: str, rows: list[dict], **extra) -> Path:
    path = Path(out) / f"multigpu_{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"part": part, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "device": gpu_name(), "rows": rows, **extra}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(rows[-1] if rows else {}), flush=True)
    return path


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------- DDP: tokens/s of the distill step


def ddp(args) -> None:
    """`compress distill`'s Trainer (fused KL, bf16 autocast, fused AdamW; DDP through accelerate
    when launched on several processes) on the reference shapes, at --batch sequences per GPU."""
    from compressor.distill.data import TrainingWindows
    from compressor.distill.run import make_accelerator
    from compressor.distill.settings import DistillSettings
    from compressor.distill.trainer import Trainer
    from compressor.models.adapters import adapter_for, count_parameters
    from transformers import AutoModelForCausalLM

    settings = DistillSettings(tokens=10**12, seq_len=512, batch_size=args.batch, compile=args.compile)
    accelerator = make_accelerator("cuda", settings)
    teacher_cfg, student_cfg = reference_shapes()
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(teacher_cfg, dtype=torch.bfloat16).to(accelerator.device)
    student = AutoModelForCausalLM.from_config(student_cfg, dtype=torch.float32).to(accelerator.device)
    windows = torch.randint(0, teacher_cfg.vocab_size, (4096, 512), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(accelerator, teacher, adapter_for(teacher), student, adapter_for(student),
                      TrainingWindows(windows, [], 0), settings, windows[:2])
    seconds = time_steps(trainer.step, args.warmup, args.steps, "cuda")
    peak = accelerator.gather(torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=accelerator.device))
    gpus = accelerator.num_processes
    rate = args.batch * 512 * gpus / seconds
    flops = flops_per_token(count_parameters(teacher), count_parameters(trainer.unwrapped.student))
    if accelerator.is_main_process:
        path = Path(args.out) / "multigpu_ddp.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        rows.append({"method": "distill-ddp", "gpus": gpus, "device": gpu_name(),
                     "config": {"batch_per_gpu": args.batch, "seq_len": 512, "compile": args.compile,
                                "student_params": count_parameters(trainer.unwrapped.student),
                                "teacher_params": count_parameters(teacher)},
                     "tokens_per_s": rate, "step_s": seconds, "mfu": rate * flops / (gpus * H200_BF16),
                     "peak_memory_gb_per_gpu": [float(x) for x in peak.cpu()]})
        one = next((r for r in rows if r["gpus"] == 1 and r["config"]["compile"] == args.compile), None)
        if one and gpus > 1:
            rows[-1]["scaling_efficiency"] = rate / (gpus * one["tokens_per_s"])
        write_part(args.out, "ddp", rows)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the synthetic models on disk


def make_models(args) -> None:
    """teacher/ and student/ (the reference shapes) and eight-b/ (Llama-3-8B widths, --layers
    layers, the reference vocabulary) with the reference tokenizer, random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    teacher_cfg, student_cfg = reference_shapes()
    out = Path(args.out)
    targets = {"teacher": (teacher_cfg, torch.bfloat16), "student": (student_cfg, torch.float32),
               "eight-b": (eight_b_config(args.layers, teacher_cfg.vocab_size), torch.bfloat16)}
    for name, (config, dtype) in targets.items():
        if (out / name / "config.json").is_file():
            continue
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if name == "teacher":  # a confident teacher, so the KL is far from zero
            with torch.no_grad():
                model.lm_head.weight.mul_(20)
        model.save_pretrained(out / name, safe_serialization=True)
        tokenizer.save_pretrained(out / name)
        del model
        print(f"wrote {out / name}", flush=True)


# ---------------------------------------------------------------- loss curves, checkpoint and resume


def distill_cmd(models: Path, out: Path, gpus: int, tokens: int, batch: int, *extra: str) -> list[str]:
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "--num_machines", "1", "-m", "compressor"]
              if gpus > 1 else [sys.executable, "-m", "compressor"])
    return [*launch, "--json", "distill", "--teacher", str(models / "teacher"), "--student", str(models / "student"),
            "--data", "wiki", "--eval-data", "wiki", "-o", str(out), "--device", "cuda", "--tokens", str(tokens),
            "--batch-size", str(batch), "--seq-len", "512", "--eval-windows", "8", "--save-every", "10",
            "--lr", "3e-4", "--overwrite", *extra]


def run_logged(cmd: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout[-20000:] + "\n---\n" + proc.stderr[-20000:])
    proc.wall_s = time.perf_counter() - began
    return proc


def build_of(out: Path) -> dict:
    return json.loads((out / "build.json").read_text())


def curve(args) -> None:
    """The same global batch (16 x 512) on 1 GPU (batch 16) and on 2 (batch 8 each, accelerate
    launch, DDP): loss curves compared; then the 2-GPU run is killed after a checkpoint and
    resumed on 2 GPUs, and on 1 GPU (refused: the data order is split by process count)."""
    models, work = Path(args.models), Path(args.work)
    tokens = args.curve_steps * 16 * 512
    rows = []
    runs = {}
    pairs = ((1, 16), (2, 8)) if torch.cuda.device_count() >= 2 else ((1, 16),)
    for gpus, batch in pairs:
        out = work / f"curve-{gpus}"
        proc = run_logged(distill_cmd(models, out, gpus, tokens, batch), Path(args.out) / f"curve-{gpus}.log")
        row = {"method": "distill-curve", "gpus": gpus, "config": {"batch_per_gpu": batch, "global_batch": 16,
                                                                   "steps": args.curve_steps, "tokens": tokens},
               "rc": proc.returncode, "wall_s": proc.wall_s}
        if proc.returncode == 0:
            build = build_of(out)
            runs[gpus] = build["losses"]
            row.update(tokens_per_s=build["tokens_per_s"], losses=build["losses"], final_loss=build["losses"][-1])
        else:
            row["error"] = proc.stderr[-600:]
        rows.append(row)
        write_part(args.out, "curve", rows)
    if 1 in runs and 2 in runs:
        diffs = [abs(a - b) / max(abs(a), 1e-9) for a, b in zip(runs[1], runs[2])]
        rows.append({"method": "curve-match", "max_rel_diff": max(diffs), "mean_rel_diff": sum(diffs) / len(diffs),
                     "steps": len(diffs)})
        write_part(args.out, "curve", rows)
    if 2 not in runs:
        return
    # kill the 2-GPU run once its checkpoint after step 20 is written, then resume it
    out = work / "curve-2-killed"
    from compressor.distill.checkpoint import checkpoint_dir

    state = checkpoint_dir(out) / "latest" / "state.json"
    cmd = distill_cmd(models, out, 2, tokens, 8)
    log = open(Path(args.out) / "curve-kill.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text()).get("step")
        except (OSError, ValueError):
            step = None
        if step and step >= 20:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.2)
    proc.wait()
    row = {"method": "distill-kill-resume", "gpus": 2, "killed_after_step": killed_at}
    refused = run_logged(distill_cmd(models, out, 1, tokens, 16, "--resume"), Path(args.out) / "resume-1.log")
    row["resume_on_1_gpu"] = {"rc": refused.returncode, "message": refused.stderr.strip().splitlines()[-1:]}
    resumed = run_logged(distill_cmd(models, out, 2, tokens, 8, "--resume"), Path(args.out) / "resume-2.log")
    row["rc"] = resumed.returncode
    if resumed.returncode == 0 and 2 in runs:
        losses = build_of(out)["losses"]
        row.update(losses_equal=losses == runs[2], max_abs_diff=max(abs(a - b) for a, b in zip(losses, runs[2])))
        files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != "build.json"}  # noqa
        row["artifact_identical"] = files(out) == files(work / "curve-2")
    elif resumed.returncode:
        row["error"] = resumed.stderr[-600:]
    rows.append(row)
    write_part(args.out, "curve", rows)


# ---------------------------------------------------------------- FSDP: an 8B-shaped student


def fsdp(args) -> None:
    """An 8B-shaped student (random weights, fp32 master weights, AdamW) learning from a
    reference-shaped teacher of the same vocabulary (replicated): without sharding on one GPU, and
    fully sharded (FSDP2, one unit per decoder block) over the processes torchrun starts."""
    import torch.distributed as dist
    from compressor.distill.kl import KLSettings
    from compressor.distill.trainer import DistillModule, final_hidden
    from compressor.models.adapters import adapter_for, count_parameters
    from transformers import AutoModelForCausalLM, LlamaConfig

    rank, size = world()
    if size > 1:
        dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    vocab = 128256
    teacher_cfg = LlamaConfig(**{**reference_shapes()[0].to_dict(), "vocab_size": vocab, "tie_word_embeddings": False})
    row = {"method": "distill-fsdp" if size > 1 else "distill-1gpu", "gpus": size,
           "config": {"student": f"Llama-3-8B shape ({args.fsdp_layers} layers), fp32 weights + AdamW",
                      "batch_per_gpu": args.fsdp_batch, "seq_len": 512, "teacher": "smollm2-135m shape, replicated"}}
    try:
        torch.manual_seed(0)
        with device:
            teacher = AutoModelForCausalLM.from_config(teacher_cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
            student = AutoModelForCausalLM.from_config(eight_b_config(args.fsdp_layers, vocab), dtype=torch.float32)
        row["config"]["student_params"] = params = count_parameters(student)
        adapter, tadapter = adapter_for(student), adapter_for(teacher)
        module = DistillModule(student, adapter, KLSettings(), 0.0, teacher_cfg.hidden_size, torch.bfloat16, False)
        if size > 1:
            from torch.distributed.fsdp import fully_shard

            for block in adapter.blocks(student):
                fully_shard(block)
            fully_shard(module)
        torch.cuda.synchronize()
        row["memory_after_build_gb"] = torch.cuda.memory_allocated() / 1e9
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
        times = []
        for step in range(args.fsdp_steps):
            began = time.perf_counter()
            ids = torch.randint(0, vocab, (args.fsdp_batch, 512), device=device,
                                generator=torch.Generator(device).manual_seed(step * size + rank))
            with torch.no_grad():
                hidden = final_hidden(teacher, tadapter, ids)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = module(ids, hidden, tadapter.head(teacher).weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
            row["losses"] = row.get("losses", []) + [float(loss)]
        step_s = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        rate = args.fsdp_batch * 512 * size / step_s
        row.update(ok=True, step_s=step_s, tokens_per_s=rate,
                   mfu=rate * flops_per_token(count_parameters(teacher), params) / (size * H200_BF16))
    except torch.OutOfMemoryError as exc:
        row.update(ok=False, oom=True, error=str(exc).splitlines()[0][:300])
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=device)
    if size > 1:
        gathered = [torch.zeros_like(peak) for _ in range(size)]
        dist.all_gather(gathered, peak)
        peak = torch.cat(gathered)
    row["peak_memory_gb_per_gpu"] = [float(x) for x in peak.cpu()]
    if rank == 0:
        path = Path(args.out) / "multigpu_fsdp.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        write_part(args.out, "fsdp", rows + [row])
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- data-parallel GPTQ calibration


def calib(args) -> None:
    """`compress quantize --method gptq` of the 8B-shaped model: one process on one GPU, then
    `torchrun --nproc-per-node 2` (each process calibrates on its half of the samples, the
    statistics are summed over NCCL); wall time, per-phase split and byte identity."""
    models, work = Path(args.models), Path(args.work)
    rows = []
    outs = {}
    for gpus in (1, 2):
        out = work / f"gptq-{gpus}"
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "compressor"] if gpus > 1 else [sys.executable, "-m", "compressor"])
        cmd = [*launch, "--json", "quantize", str(models / "eight-b"), "--method", "gptq", "-o", str(out),
               "--device", "cuda", "--calib", "wiki", "--samples", str(args.calib_samples), "--seq-len", "512",
               "--batch-size", "8", "--overwrite"]
        proc = run_logged(cmd, Path(args.out) / f"gptq-{gpus}.log", timeout=400)
        row = {"method": "gptq-calibration", "gpus": gpus, "rc": proc.returncode, "process_wall_s": proc.wall_s,
               "config": {"model": f"Llama-3-8B widths, {args.layers} layers, reference vocabulary",
                          "samples": args.calib_samples, "seq_len": 512, "bits": 4}}
        if proc.returncode == 0:
            build = json.loads((out / "build.json").read_text())
            row.update(wall_s=build["wall_s"], engine_s=build["engine_s"], processes=build.get("processes"))
            outs[gpus] = out
        else:
            row["error"] = proc.stderr[-600:]
        rows.append(row)
        write_part(args.out, "calib", rows)
    if len(outs) == 2:
        files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir())  # noqa: E731
                           if f.suffix == ".safetensors" or f.name == "config.json"}
        one, two = files(outs[1]), files(outs[2])
        rows[-1]["byte_identical"] = one == two
        rows[-1]["differing_files"] = sorted(k for k in set(one) | set(two) if one.get(k) != two.get(k))
        rows[-1]["speedup"] = rows[0]["process_wall_s"] / rows[1]["process_wall_s"]
        rows[-1]["engine_speedup"] = rows[0]["engine_s"] / rows[1]["engine_s"]
        write_part(args.out, "calib", rows)


# ---------------------------------------------------------------- merge and report


def merge(paths: list[str], not_run: str = "") -> None:
    rows, parts = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        parts[data["part"]] = {k: v for k, v in data.items() if k != "rows"}
        rows += [{"part": data["part"], **row} for row in data["rows"]]
    device = next((p["device"] for p in parts.values() if p.get("device") != "cpu"), "cpu")
    written = write_results(NAME, rows, {"peak_bf16_flops_per_gpu": H200_BF16, "nccl_env": ENV},
                            {"parts": parts, **({"not_run": not_run} if not_run else {})})
    data = json.loads(written.read_text())
    gpus = max((r.get("gpus", 1) for r in rows), default=1)
    data["device"] = f"{gpus} x {device}"
    written.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {written}")
    print(f"wrote {write_report(NAME, render(data))}")


def _gb(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else ""


def render(data: dict) -> str:
    rows = data["rows"]
    lines = ["# Multi-GPU distillation and calibration", "",
             f"Generated by `python benchmarks/multigpu.py --report-only` from `benchmarks/results/multigpu.json` "
             f"({data['date']}, {data['device']}). Models are random-weight models of fixed shapes built on the "
             "machine: the reference pair (smollm2-135m's shape as teacher, a ~99M width-pruned student) and an "
             "8B-shaped Llama (Llama-3-8B's widths). NVLink multicast off (NCCL_NVLS_ENABLE=0).", ""]
    if data.get("not_run"):
        lines += [f"Not measured: {data['not_run']}", ""]
    ddp_rows = [r for r in rows if r.get("method") == "distill-ddp"]
    if ddp_rows:
        lines += ["## Distillation with DDP (reference pair)", ""]
        lines += table(["GPUs", "batch per GPU x seq", "compile", "tokens/s", "MFU", "scaling efficiency",
                        "peak GB per GPU"],
                       [[str(r["gpus"]), f"{r['config']['batch_per_gpu']} x {r['config']['seq_len']}",
                         str(r["config"]["compile"]), f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                         fmt(r.get("scaling_efficiency"), "{:.1%}", "-"), _gb(r.get("peak_memory_gb_per_gpu"))]
                        for r in ddp_rows])
        lines += ["", "Scaling efficiency: tokens/s on 2 GPUs / (2 x tokens/s on 1) at the same per-GPU batch.", ""]
    curve_rows = [r for r in rows if r.get("part") == "curve"]
    if curve_rows:
        lines += ["## Loss curve: 1 GPU vs 2 (`accelerate launch`), same global batch", ""]
        for r in curve_rows:
            if r["method"] == "distill-curve":
                lines.append(f"- {r['gpus']} GPU(s), batch {r['config']['batch_per_gpu']} per GPU, "
                             f"{r['config']['steps']} steps: " + (
                                 f"final loss {r['final_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s"
                                 if "final_loss" in r else f"failed ({r.get('error', '')[-200:]!r})"))
            elif r["method"] == "curve-match":
                lines.append(f"- largest relative difference between the two loss curves over {r['steps']} steps: "
                             f"{r['max_rel_diff']:.2e} (mean {r['mean_rel_diff']:.2e})")
            elif r["method"] == "distill-kill-resume":
                lines.append(f"- 2-GPU run SIGKILLed after its checkpoint at step {r.get('killed_after_step')}, "
                             f"resumed on 2 GPUs: " + (
                                 f"loss curve identical: {r.get('losses_equal')} (largest difference "
                                 f"{fmt(r.get('max_abs_diff'), '{:.2e}')}), artifact byte-identical: "
                                 f"{r.get('artifact_identical')}" if r.get("rc") == 0 else
                                 f"failed ({r.get('error', '')[-200:]!r})"))
                one = r.get("resume_on_1_gpu", {})
                lines.append(f"- resuming that checkpoint on 1 GPU: exit {one.get('rc')} "
                             f"({' '.join(one.get('message') or [])})")
        lines.append("")
    fsdp_rows = [r for r in rows if r.get("part") == "fsdp"]
    if fsdp_rows:
        lines += ["## FSDP: an 8B-shaped student", ""]
        lines += table(["run", "GPUs", "batch per GPU x seq", "student params", "outcome", "tokens/s", "MFU",
                        "peak GB per GPU"],
                       [[r["method"], str(r["gpus"]), f"{r['config']['batch_per_gpu']} x 512", fmt(r["config"].get("student_params"), lambda v: f"{v / 1e9:.2f}B"),
                         "fits, trains" if r.get("ok") else ("out of memory" if r.get("oom") else "failed"),
                         fmt(r.get("tokens_per_s"), "{:,.0f}", "-"), fmt(r.get("mfu"), "{:.1%}", "-"),
                         _gb(r.get("peak_memory_gb_per_gpu"))] for r in fsdp_rows])
        lines += ["", f"Student: {fsdp_rows[0]['config']['student']}; teacher: {fsdp_rows[0]['config']['teacher']}.", ""]
    calib_rows = [r for r in rows if r.get("part") == "calib"]
    if calib_rows:
        lines += ["## Data-parallel GPTQ calibration (`torchrun --nproc-per-node 2`)", ""]
        lines += table(["GPUs", "model", "samples", "process wall s", "command wall s", "engine s (calibrate + "
                        "quantize)", "speedup (process / engine)", "byte-identical"],
                       [[str(r["gpus"]), r["config"]["model"], str(r["config"]["samples"]),
                         fmt(r.get("process_wall_s"), "{:.1f}"), fmt(r.get("wall_s"), "{:.1f}", "-"),
                         fmt(r.get("engine_s"), "{:.1f}", "-"),
                         f"{fmt(r.get('speedup'), '{:.2f}x', '-')} / {fmt(r.get('engine_speedup'), '{:.2f}x', '-')}",
                         fmt(r.get("byte_identical"), "{}", "-")] for r in calib_rows])
        lines += ["", "Per phase: the engine time is loading nothing and writing nothing (block-by-block "
                      "calibration and quantization); the rest of the command's wall time is loading the model "
                      "and writing the artifact; the process wall time adds Python and CUDA start-up.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=["ddp", "curve", "fsdp", "calib", "make-models", "merge"])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--out", default=str(RESULTS / "parts"))
    parser.add_argument("--work", default="/tmp/multigpu")
    parser.add_argument("--models", default="/tmp/multigpu/models")
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--batch", type=int, default=32, help="DDP: sequences of 512 per GPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--curve-steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=8, help="layers of the 8B-shaped model for calibration")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--fsdp-layers", type=int, default=32)
    parser.add_argument("--fsdp-batch", type=int, default=8,
                        help="sequences per GPU (at 4 the 8B-shaped student still fit one H200: 138.5 GB peak)")
    parser.add_argument("--fsdp-steps", type=int, default=4)
    parser.add_argument("--not-run", default="", help="merge: what was not measured, and why (shown in the report)")
    args = report_cli(parser, NAME, render)
    if args is None:
        return
    {"ddp": ddp, "curve": curve, "fsdp": fsdp, "calib": calib, "make-models": make_models,
     "merge": lambda a: merge(a.paths, a.not_run)}[args.part](args)


if __name__ == "__main__":
    main()
