"""Minitron pruning and `compress distill` on the reference model.

Quality (GPU): smollm2-135m pruned to ~100M and ~70M parameters along width, depth and both,
before and after distillation from the unpruned model, plus SliceGPT 25% and MoDeGPT 25% students
distilled with the same token budget. Perplexity and KL to the base on held-out text only: the wiki
eval split and Jane Austen's Persuasion, which the training mix (wiki calibration split + the other
five novels) leaves out. Throughput: tokens/s of one distillation step of the reference shapes
(teacher smollm2-135m, a ~99M student) for a plain PyTorch step (full-vocabulary float32 KL) and
for `compress distill`'s step (fused chunked KL; with torch.compile), model FLOPs utilisation
(2 x teacher + 6 x student parameters per token over the device's bf16 rate), and on the CPU
the peak memory of `compress distill` on the reference pair.

    python benchmarks/minitron.py prepare --out DIR          # Austen splits for the carry folder
    python benchmarks/minitron.py throughput --device cuda --out DIR [--sweep [B/CHUNK/MODE,...]] [--profile]
    python benchmarks/minitron.py quality --device cuda --tokens 4M --austen DIR --out DIR
    python benchmarks/minitron.py quality --device cuda --rows modegpt,minitron-70M-both --tokens 20M
        [--generate-data 2M] --compile --austen DIR --out DIR   # chosen rows only
    python benchmarks/minitron.py cpu --out DIR
    python benchmarks/minitron.py merge DIR/*.json           # into benchmarks/results/minitron.json, reports/minitron.md
    python benchmarks/minitron.py --report-only              # reports/minitron.md from the results JSON

Every part appends its rows to its own JSON file as they finish, so a run cut short keeps them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, print_table, report_cli, write_report, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
HELD_OUT_NOVEL = "persuasion"
H200_BF16 = 790e12  # FLOP/s, dense bf16 matrix rate measured on the lent H200 (the reference)
AXES = ("width", "depth", "both")


# ---------------------------------------------------------------- shared


class Part:
    """One part's results file, rewritten after every row."""

    def __init__(self, out: Path, name: str, device: str, extra: dict | None = None):
        self.path = Path(out) / f"minitron_{name}.json"
        self.data = {"part": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                     "device": device, "rows": [], **(extra or {})}
        self.save()

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        print(json.dumps(row), flush=True)
        return row

    def note(self, **items) -> None:
        self.data.update(items)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def flops_per_token(teacher_params: int, student_params: int) -> float:
    return 2 * teacher_params + 6 * student_params


# ---------------------------------------------------------------- Austen splits


def prepare(out: Path) -> None:
    """The training novels and the held-out one, as jsonl (one chapter per line)."""
    from compressor.models import assets

    source = assets.cache_dir() / "data" / "austen" / "eval.jsonl"
    if not source.is_file() and "austen" in getattr(assets, "TEXT_ASSETS", {}):
        assets.fetch("austen")
    if not source.is_file():
        raise SystemExit(f"{source} is missing: fetch the Austen text (compress assets fetch austen) first")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "austen-train.jsonl", "w") as train, open(out / f"austen-{HELD_OUT_NOVEL}.jsonl", "w") as held:
        for line in source.read_text().splitlines():
            record = json.loads(line)
            (held if record["title"].startswith(HELD_OUT_NOVEL) else train).write(json.dumps(record) + "\n")
    print(f"wrote {out}/austen-train.jsonl and austen-{HELD_OUT_NOVEL}.jsonl")


# ---------------------------------------------------------------- throughput


def reference_shapes(student_ffn: int = 864):
    """The teacher's config (smollm2-135m) and the ~99M width-pruned student's (ffn 864)."""
    from transformers import LlamaConfig

    teacher = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                          max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    student = LlamaConfig(**{**teacher.to_dict(), "intermediate_size": student_ffn})
    return teacher, student


def synthetic_model(config, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def plain_step_fn(teacher, student, optimizer, temperature: float = 1.0):
    """The plain PyTorch step the issue measures against: full-vocabulary logits of both models,
    float32 KL, bf16 autocast, fused AdamW."""
    import torch.nn.functional as F

    def step(ids):
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
            s = student(input_ids=ids, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1),
                        log_target=True, reduction="batchmean") / ids.shape[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, warmup: int, steps: int, device: str) -> float:
    """Median seconds per call of step(i) after warm-up (device-synchronized)."""
    import statistics

    for i in range(warmup):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for i in range(warmup, warmup + steps):
        began = time.perf_counter()
        step(i)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def trainer_for(teacher, student, device: str, batch: int, seq: int, compile_: bool, kl_chunk: int = 4096,
                compile_mode: str = "default"):
    """The Trainer `compress distill` runs, on in-memory models and random tokens."""
    from compressor.distill.data import TrainingWindows
    from compressor.distill.settings import DistillSettings
    from compressor.distill.trainer import Trainer
    from compressor.distill.run import make_accelerator
    from compressor.models.adapters import adapter_for

    settings = DistillSettings(tokens=10**12, seq_len=seq, batch_size=batch, compile=compile_, kl_chunk=kl_chunk,
                               compile_mode=compile_mode, precision="auto" if device.startswith("cuda") else "fp32")
    windows = torch.randint(0, teacher.config.vocab_size, (max(4 * batch, 64), seq),
                            generator=torch.Generator().manual_seed(0))
    accelerator = make_accelerator(device, settings)
    return Trainer(accelerator, teacher, adapter_for(teacher), student, adapter_for(student),
                   TrainingWindows(windows, [], 0), settings, windows[:2])


# The sweep of `compress distill` step configurations (--sweep), most promising first: (batch,
# --kl-chunk, --compile-mode). Larger batches and KL chunks give the GEMMs more rows; max-autotune
# tunes the GEMM kernels of the narrow (576-wide) blocks; reduce-overhead replays CUDA graphs.
SWEEP = "64/4096/default,128/8192/default,128/8192/reduce-overhead,128/8192/max-autotune-no-cudagraphs," \
        "128/16384/default,64/8192/default"


def sweep_configs(text: str) -> list[tuple[int, int, str]]:
    configs = []
    for item in text.split(","):
        batch, chunk, mode = item.strip().split("/")
        configs.append((int(batch), int(chunk), mode))
    return configs


def kernel_breakdown(step, device: str, steps: int = 1) -> dict:
    """Device time per step by kernel family (GEMM, attention, fused Triton, other) and the top
    kernels, from torch.profiler over `steps` step(s) after the timed ones (warm)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) / 1000 / steps
        if ms > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + ms

    def family(name: str) -> str:
        low = name.lower()
        if any(k in low for k in ("flash", "fmha", "attention", "attn")):
            return "attention"
        if any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "sm90", "matmul", "triton_tem")):
            return "gemm"
        if low.startswith("triton"):
            return "fused (triton)"
        return "other"

    families: dict[str, float] = {}
    for name, ms in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {"device_ms_per_step": sum(kernels.values()), "by_family_ms": families,
            "top_kernels_ms": [[name[:90], ms] for name, ms in top]}


def throughput(args) -> None:
    """The plain PyTorch step, then `compress distill`'s step: eager and compiled (default), or
    every configuration of --sweep (each measured in this process after a dynamo reset, within
    --sweep-budget seconds; the fastest is the headline row), with a profile of where the
    device time goes."""
    from compressor.models.adapters import count_parameters

    device, cuda = args.device, args.device.startswith("cuda")
    batch, seq = (args.batch or (64 if cuda else 2)), 512
    part = Part(args.out, f"throughput_{'cuda' if cuda else 'cpu'}", device_name(device))
    teacher_cfg, student_cfg = reference_shapes()
    peak = H200_BF16 if cuda else cpu_matmul_rate()
    part.note(peak_flops=peak, peak_note="H200 bf16 dense rate (issue)" if cuda else
              "measured fp32 matmul rate of this CPU (4096^3, median of 5)")
    # (name, batch, compile, kl_chunk, compile mode)
    variants = [("plain", batch, False, 4096, "default")]
    if args.sweep:
        variants += [("compress-distill+compile", b, True, chunk, mode) for b, chunk, mode in sweep_configs(args.sweep)]
    else:
        variants += [("compress-distill", batch, False, args.kl_chunk, "default")]
        if cuda and not args.no_compile:
            variants.append(("compress-distill+compile", batch, True, args.kl_chunk, "default"))
    clock = Clock(args.sweep_budget)
    for name, batch, compile_, chunk, mode in variants:
        config = {"batch": batch, "seq_len": seq, "precision": "bf16 autocast" if cuda else "fp32"}
        if name != "plain":
            config.update(kl_chunk=chunk, compile_mode=mode if compile_ else None)
        if args.sweep and clock.left() < (args.sweep_estimate_s * (3 if "autotune" in mode else 1)):
            part.add({"method": f"kd-step:{name}", "config": config, "skipped": f"sweep budget ({clock.left():.0f}s left)"})
            continue
        started = time.perf_counter()
        try:
            if cuda:
                torch._dynamo.reset()
            teacher = synthetic_model(teacher_cfg, torch.bfloat16 if cuda else torch.float32).to(device)
            student = synthetic_model(student_cfg, torch.float32).to(device)
            flops = flops_per_token(count_parameters(teacher), count_parameters(student))
            ids = torch.randint(0, 49152, (batch, seq), device=device, generator=None)
            config.update(student_params=count_parameters(student), teacher_params=count_parameters(teacher))
            if name == "plain":
                student.train()
                optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda or None)
                plain = plain_step_fn(teacher, student, optimizer)
                step = lambda i, plain=plain, ids=ids: plain(ids)  # noqa: E731
            else:
                trainer = trainer_for(teacher, student, device, batch, seq, compile_, chunk, mode)
                step = trainer.step
            seconds = time_steps(step, args.warmup, args.steps, device)
            rate = batch * seq / seconds
            row = {"model": MODEL, "method": f"kd-step:{name}", "device": device_name(device), "config": config,
                   "tokens_per_s": rate, "step_s": seconds, "mfu": rate * flops / peak,
                   "flops_per_token": flops, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
            if cuda and args.profile:
                try:
                    row["profile"] = kernel_breakdown(step, device)
                except Exception as exc:  # the timing stands without it
                    row["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            row["wall_s"] = time.perf_counter() - started
            part.add(row)
            rank_rows(part)
        except Exception as exc:  # record and go on: the other variants still measure
            part.add({"method": f"kd-step:{name}", "config": config, "error": f"{type(exc).__name__}: {exc}"[:500]})
            traceback.print_exc()
        finally:
            teacher = student = trainer = optimizer = step = None  # noqa: F841
            gc.collect()  # the accelerator and compiled graphs hold the models until collected
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()


def rank_rows(part: Part) -> None:
    """Each row's speedup over the plain step and the fastest of ours marked best (after every
    row: a run cut short by its time limit keeps them)."""
    plain = next((r for r in part.data["rows"] if r.get("method") == "kd-step:plain" and "tokens_per_s" in r), None)
    measured = [r for r in part.data["rows"] if "tokens_per_s" in r]
    for row in measured:
        row.pop("best", None)
        if plain:
            row["speedup_vs_plain"] = row["tokens_per_s"] / plain["tokens_per_s"]
    ours = [r for r in measured if r["method"] != "kd-step:plain"]
    if ours:
        best = max(ours, key=lambda r: r["tokens_per_s"])
        best["best"] = True
        part.note(best={"config": best["config"], "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"]})
    part.save()


def cpu_matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    import statistics

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    return 2 * n ** 3 / statistics.median(times)


# ---------------------------------------------------------------- quality


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def evaluate_row(path: str, texts: dict[str, str], windows: int, device: str) -> dict:
    from compressor import api

    row = {}
    for label, data in texts.items():
        result = api.evaluate(path, base=MODEL, data=data, windows=windows, device=device, batch_size=16)
        suffix = "" if label == "wiki" else f"_{label}"
        row.update({f"ppl{suffix}": result["ppl"], f"kl{suffix}": result["kl"], f"base_ppl{suffix}": result["base_ppl"]})
    return row


def recovery(pruned: float, distilled: float, base: float) -> float:
    """Fraction of the perplexity gap between the pruned model and the base that distillation closed."""
    return (pruned - distilled) / (pruned - base) if pruned != base else float("nan")


def quality(args) -> None:
    """Prune, evaluate, distill and evaluate again, most important rows first, within --budget
    seconds (a row that would not fit is recorded as skipped)."""
    from compressor import api

    device = args.device
    clock = Clock(args.budget)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    austen = Path(args.austen)
    texts = {"wiki": "wiki", "austen": str(austen / f"austen-{HELD_OUT_NOVEL}.jsonl")}
    data = ["wiki", str(austen / "austen-train.jsonl")]
    tokens = distill_tokens(args)
    aggregation = {"seq_agg": args.seq_agg, "batch_agg": args.batch_agg}
    settings = {"tokens": tokens, "seq_len": 512, "batch_size": args.batch, "lr": args.lr, "warmup": 0.05,
                "eval_windows": 16, "save_every": 10_000, "compile": args.compile}
    generated = api_count(args.generate_data) if args.generate_data else 0
    if generated:
        settings["generate_data"] = generated
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else []
    part_name = (f"quality_{'_'.join(chosen)}" if chosen else "quality" if args.group == "all"
                 else f"quality_{args.group}") + (f"_gen{label(generated)}" if generated else "")
    part = Part(args.out, part_name, device_name(device), {
        "protocol": {"eval_windows": args.windows, "window": 512, "texts": texts, "training_data": data,
                     "distill": settings, "calib_samples": args.samples, "sliced_calib_samples": args.sliced_samples,
                     "held_out_novel": HELD_OUT_NOVEL, "minitron_aggregation": aggregation}})
    base = {"model": MODEL, "method": "fp32", "config": {}, "params": api.inspect(MODEL)["params"],
            **evaluate_row(MODEL, texts, args.windows, device), "kl": 0.0, "kl_austen": 0.0}
    if (args.group in ("all", "a") and not chosen) or "fp32" in chosen:  # one base row in the merged results
        part.add(base)
    big, small = (api_count(t) for t in args.targets.split(","))
    rows: dict[str, dict] = {}

    def prune(name: str, target: int | None = None, axis: str | None = None, method: str = "minitron",
              options: dict | None = None) -> None:
        if method == "minitron":
            config = {"target_params": target, "axis": axis, **(options or aggregation)}
            work_fn = lambda: prune_minitron(work / name, target, axis, config, args, texts)  # noqa: E731
        else:
            config = {"sparsity": 0.25}
            work_fn = lambda: prune_sliced(work / name, method, args, texts)  # noqa: E731
        rows[name] = run_safely(part, {"model": MODEL, "method": method, "config": config}, clock, work_fn,
                                need_s=args.prune_estimate_s * (3 if method != "minitron" else 1))

    def distill(name: str, lr: float) -> None:
        before = rows.get(name, {})
        if "ppl" not in before:
            return
        row = {"model": MODEL, "method": f"{before['method']}+kd", "config": {**before["config"], "tokens": tokens,
                                                                          **({"generate_data": generated}
                                                                             if generated else {})}}
        result = run_safely(part, row, clock, lambda: distill_row(before["artifact"], work / f"{name}-kd", data,
                                                                  {**settings, "lr": lr}, args, texts),
                            need_s=args.distill_estimate_s)
        if "ppl" in result:
            result["config"].update(tokens=result["tokens"], lr=lr)
            result["recovery"] = recovery(before["ppl"], result["ppl"], base["ppl"])
            result["recovery_austen"] = recovery(before["ppl_austen"], result["ppl_austen"], base["ppl_austen"])
            part.save()

    name = lambda target, axis: f"minitron-{label(target)}-{axis}"  # noqa: E731
    # Two groups run side by side on two GPUs (--group a / b); --group all runs both in one process.
    groups = {"a": [(big, axis) for axis in AXES] + ["slicegpt"], "b": [(small, axis) for axis in AXES] + ["modegpt"],
              "c": ["slicegpt"], "d": ["modegpt"]}
    todo = groups["a"] + groups["b"] if args.group == "all" else groups[args.group]
    if chosen:
        todo = [row_item(r) for r in chosen if r != "fp32"]
    keys = []
    for item in todo:
        if isinstance(item, str):
            prune(item, method=item)
            keys.append(item)
        else:
            prune(name(*item), *item)
            keys.append(name(*item))
    lr = probe_lr(part, rows.get(keys[0], {}), work, data, settings, args, clock)
    for key in keys:
        distill(key, lr)


def row_item(name: str):
    """A --rows name: slicegpt, modegpt (25%), or minitron-<100M|70M|...>-<width|depth|both>."""
    import re

    if name in ("slicegpt", "modegpt"):
        return name
    match = re.fullmatch(r"minitron-(\d+[kM])-(width|depth|both)", name)
    if not match:
        raise SystemExit(f"unknown --rows entry {name!r}: use fp32, slicegpt, modegpt or minitron-<70M|100M>-"
                         f"<width|depth|both>")
    return api_count(match.group(1)), match.group(2)


def distill_tokens(args) -> int:
    """--tokens when given, else (with --tokens-from a throughput part) what the measured eager
    step reads in --seconds-per-run, in whole millions, at most 20M; else 4M."""
    if args.tokens:
        return api_count(args.tokens)
    path = Path(args.tokens_from) if args.tokens_from else None
    if path and path.is_file():
        rows = json.loads(path.read_text())["rows"]
        rate = next((r["tokens_per_s"] for r in rows if r.get("method") == "kd-step:compress-distill"
                     and "tokens_per_s" in r), None)
        if rate:
            return int(min(20e6, max(1e6, rate * args.seconds_per_run // 1e6 * 1e6)))
    return api_count("4M")


def probe_lr(part: Part, student: dict, work: Path, data: list[str], settings: dict, args, clock: Clock) -> float:
    """The learning rate for every run: the candidates distill the first student on a quarter of
    the budget, and the lowest training loss over the last fifth of the steps wins (training data
    only; the held-out texts play no part)."""
    from compressor import api

    candidates = [float(x) for x in args.lr_probe.split(",")] if args.lr_probe else []
    if len(candidates) < 2 or "artifact" not in student or clock.left() < 3 * args.distill_estimate_s:
        return args.lr
    results = {}
    for lr in candidates:
        try:
            result = api.distill(MODEL, student["artifact"], data, work / f"probe-{lr}",
                                 {**settings, "lr": lr, "tokens": max(settings["tokens"] // 4, 1)}, device=args.device,
                                 overwrite=True)
            tail = result["losses"][-max(1, len(result["losses"]) // 5):]
            results[lr] = sum(tail) / len(tail)
        except Exception as exc:
            results[lr] = float("inf")
            traceback.print_exc()
            part.note(lr_probe_error=f"{type(exc).__name__}: {exc}"[:300])
    chosen = min(results, key=results.get)
    part.note(lr_probe={"student": Path(student["artifact"]).name, "tokens": settings["tokens"] // 4,
                        "final_train_loss": {str(k): v for k, v in results.items()}, "chosen": chosen})
    return chosen


def label(count: int) -> str:
    return f"{count // 10**6}M" if count >= 10**6 else f"{count // 1000}k"


def api_count(value: str) -> int:
    from compressor.util import parse_count

    return parse_count(value, "--tokens")


def run_safely(part: Part, row: dict, clock: Clock, work, need_s: float = 20) -> dict:
    if clock.left() < need_s:
        row["skipped"] = f"time budget ({clock.left():.0f}s left)"
        return part.add(row)
    try:
        row.update(work())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    return part.add(row)


def prune_minitron(out: Path, target: int, axis: str, config: dict, args, texts) -> dict:
    from compressor import api

    started = time.perf_counter()
    result = api.prune(MODEL, "minitron", out, None, {**config, "target_params": str(target)},
                       samples=args.samples, device=args.device, batch_size=16, overwrite=True)
    report = json.loads((out / "build.json").read_text())["spec"]["minitron"]
    return {"artifact": str(out), "params": result["params"], "shape": report["shape"],
            "dropped_layers": report["dropped_layers"], "prune_s": time.perf_counter() - started,
            **evaluate_row(str(out), texts, args.windows, args.device)}


def prune_sliced(out: Path, method: str, args, texts) -> dict:
    from compressor import api

    started = time.perf_counter()
    result = api.prune(MODEL, method, out, 0.25, None, samples=args.sliced_samples, device=args.device,
                       batch_size=16, overwrite=True)
    return {"artifact": str(out), "params": result["params"], "prune_s": time.perf_counter() - started,
            **evaluate_row(str(out), texts, args.windows, args.device)}


def distill_row(student: str, out: Path, data: list[str], settings: dict, args, texts) -> dict:
    from compressor import api

    from compressor.progress import LineProgress

    result = api.distill(MODEL, student, data, out, settings, device=args.device, overwrite=True,
                         progress=LineProgress(interval=30))  # the GPU call's log shows where its time goes
    return {"artifact": str(out), "params": result["params"], "tokens": result["tokens"], "steps": result["steps"],
            "distill_s": result["wall_s"], "tokens_per_s": result["tokens_per_s"],
            "train_loss_first": result["losses"][0], "train_loss_last": result["losses"][-1],
            "epochs": result["tokens"] / max(1, json.loads((out / "manifest.json").read_text())["calibration"]["tokens"]),
            **evaluate_row(str(out), texts, args.windows, args.device)}


# ---------------------------------------------------------------- CPU memory of the reference pair


def cpu(args) -> None:
    """`compress distill` on the CPU with the reference teacher and a ~99M Minitron student: its
    peak RSS, tokens/s and FLOPs utilisation against this CPU's measured matmul rate."""
    from compressor import api

    part = Part(args.out, "cpu", device_name("cpu"))
    student = Path(args.work) / "cpu-student"
    if not (student / "manifest.json").is_file():
        api.prune(MODEL, "minitron", student, None, {"ffn": 864}, samples=8, overwrite=True)
    peak = cpu_matmul_rate()
    for checkpointing in [c == "checkpointing" for c in args.cpu_modes.split(",")]:
        out = Path(args.work) / f"cpu-distilled-{checkpointing}"
        cmd = [sys.executable, "-m", "compressor.cli", "--json", "distill", "--teacher", MODEL, "--student",
               str(student), "--data", "wiki", "-o", str(out), "--overwrite",
               "--tokens", str(args.cpu_steps * args.cpu_batch * 512), "--batch-size", str(args.cpu_batch),
               "--kl-chunk", str(args.kl_chunk), "--eval-windows", "2"]
        if checkpointing:
            cmd.append("--gradient-checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            part.add({"method": "kd-step:compress-distill", "device": device_name("cpu"),
                      "config": {"batch": args.cpu_batch, "seq_len": 512, "gradient_checkpointing": checkpointing,
                                 "kl_chunk": args.kl_chunk},
                      "returncode": proc.returncode,
                      "error": (proc.stderr + proc.stdout)[-500:] or f"killed (exit code {proc.returncode})"})
            continue
        result = json.loads(proc.stdout)
        params = result["params"]
        flops = flops_per_token(api.inspect(MODEL)["params"], params)
        part.add({"model": MODEL, "method": "kd-step:compress-distill", "device": device_name("cpu"),
                  "config": {"batch": args.cpu_batch, "seq_len": 512, "precision": "fp32", "kl_chunk": args.kl_chunk,
                             "gradient_checkpointing": checkpointing,
                             "steps": result["steps"], "student_params": params},
                  "tokens_per_s": result["tokens_per_s"], "mfu": result["tokens_per_s"] * flops / peak,
                  "peak_flops": peak, "peak_rss_mb": result["peak_rss_mb"], "wall_s": result["wall_s"]})


# ---------------------------------------------------------------- aggregation study (CPU)


def aggregation(args) -> None:
    """Which aggregation of MLP activations ranks neurons best on our model: every (sequence,
    batch) pair the paper compares, from one pass over the calibration set, each pruning the MLPs
    alone to --ffn neurons, judged by held-out perplexity without any retraining."""
    import copy

    from compressor import api
    from compressor.calib.data import calibration_set, evaluation_set
    from compressor.evaluation.perplexity import evaluate_models
    from compressor.methods.prune.minitron import select
    from compressor.methods.prune.minitron_importance import AGGREGATIONS, Aggregate, top_indices

    part = Part(args.out, "aggregation", device_name("cpu"),
                {"protocol": {"calib_samples": args.samples, "eval_windows": args.windows, "ffn": args.ffn}})
    loaded = api.load(MODEL)
    model, adapter = loaded.model, loaded.adapter
    pairs = [(seq, batch) for seq in AGGREGATIONS for batch in AGGREGATIONS]
    blocks = adapter.blocks(model)
    stats = [{pair: Aggregate(*pair) for pair in pairs} for _ in blocks]
    handles = []
    for block, aggregates in zip(blocks, stats):
        def record(_module, inputs, aggregates=aggregates):
            for aggregate in aggregates.values():
                aggregate.add(inputs[0].abs())
        handles.append(block.get_submodule(adapter.layout.mlp_output).register_forward_pre_hook(record))
    ids = calibration_set("wiki", loaded.tokenizer, args.samples, 512, 0).input_ids
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            model(input_ids=ids[start:start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    held_out = evaluation_set("wiki", loaded.tokenizer, args.windows, 512)
    for seq, batch in pairs:
        pruned = copy.deepcopy(model)
        for block, aggregates in zip(adapter.blocks(pruned), stats):
            keep = top_indices(aggregates[(seq, batch)].result(), args.ffn)
            for name in adapter.layout.mlp_inputs:
                select(block.get_submodule(name), rows=keep)
            select(block.get_submodule(adapter.layout.mlp_output), cols=keep)
        ppl = evaluate_models({"pruned": pruned}, held_out, None, 4, "cpu")["pruned"]["ppl"]
        part.add({"model": MODEL, "method": "minitron-mlp", "config": {"seq_agg": seq, "batch_agg": batch,
                                                                      "ffn": args.ffn}, "ppl": ppl})
        del pruned


# ---------------------------------------------------------------- merge and report


def row_identity(row: dict) -> tuple:
    return row.get("method"), json.dumps(row.get("config"), sort_keys=True), row.get("device")


def merge(paths: list[str], fresh: bool = False) -> None:
    """Join part files into results/minitron.json and render. The rows already there stay (unless
    --fresh) except those a new part replaces: every row of a part with the same name (a re-run
    part, e.g. a new throughput sweep, replaces all of its old rows) and every row with the same
    method, config and device (a row measured again keeps its later measurement). Rows skipped
    for time are left out."""
    path = RESULTS / "minitron.json"
    old = json.loads(path.read_text()) if path.is_file() and not fresh else {}
    rows, parts = old.get("rows", []), old.get("parts", {})
    for part_path in paths:
        data = json.loads(Path(part_path).read_text())
        parts[data["part"]] = {k: v for k, v in data.items() if k != "rows"}
        rows = [r for r in rows if r.get("part") != data["part"]]
        for row in data["rows"]:
            if "skipped" in row:
                continue
            row = {"part": data["part"], **{k: v for k, v in row.items() if k != "artifact"}}
            rows = [r for r in rows if row_identity(r) != row_identity(row)]
            rows.append(row)
    quality_part = next((v for k, v in parts.items() if k.startswith("quality")), {})
    written = write_results("minitron", rows, quality_part.get("protocol", {}), {"parts": parts})
    data = json.loads(written.read_text())
    data["device"] = "mixed: see parts (quality and throughput on the GPU, memory on the CPU)"
    written.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {written}")
    print(f"wrote {write_report('minitron', render(data))}")


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _find(rows: list[dict], method: str, **config) -> dict | None:
    return next((r for r in rows if r.get("method") == method and "ppl" in r
                 and all(r.get("config", {}).get(k) == v for k, v in config.items())), None)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with the measured figure it is judged on."""
    out = []
    width, depth = _find(rows, "minitron", target_params=100_000_000, axis="width"), \
        _find(rows, "minitron", target_params=100_000_000, axis="depth")
    if width and depth:
        gain = 1 - width["ppl"] / depth["ppl"]
        out.append(f"- Width vs depth pruning to ~100M before distillation (wiki): ppl {width['ppl']:.2f} vs "
                   f"{depth['ppl']:.2f}, {100 * gain:.0f}% lower (target at least 20%): "
                   f"{'met' if gain >= 0.2 else 'missed'}.")
    for target, need in ((100_000_000, 0.7), (70_000_000, 0.5)):
        best = max((r for r in rows if r.get("method") == "minitron+kd" and "recovery" in r
                    and r["config"].get("target_params") == target), key=lambda r: r["recovery"], default=None)
        if best:
            out.append(f"- ~{target // 10**6}M student after distillation on {best['tokens'] / 1e6:.1f}M tokens: "
                       f"{100 * best['recovery']:.0f}% of the perplexity gap recovered ({best['config']['axis']}; "
                       f"target at least {100 * need:.0f}%): {'met' if best['recovery'] >= need else 'missed'}.")
    base = next((r for r in rows if r.get("method") == "fp32"), None)
    modegpt = min((r for r in rows if r.get("method") == "modegpt+kd" and "ppl" in r and r["tokens"] <= 20_000_000),
                  key=lambda r: r["ppl"], default=None)
    if base and modegpt:
        over = modegpt["ppl"] / base["ppl"] - 1
        mix = f" + {modegpt['config']['generate_data'] / 1e6:.1f}M teacher-sampled" \
            if modegpt["config"].get("generate_data") else ""
        out.append(f"- MoDeGPT 25% + distillation ({modegpt['tokens'] / 1e6:.1f}M tokens{mix}): ppl "
                   f"{modegpt['ppl']:.2f} vs base {base['ppl']:.2f}, {100 * over:.0f}% above (target within 10%): "
                   f"{'met' if over <= 0.1 else 'missed'}.")
    gpu = [r for r in rows if str(r.get("method", "")).startswith("kd-step:compress") and "mfu" in r
           and "H200" in str(r.get("device"))]
    if gpu:
        best = max(gpu, key=lambda r: r["mfu"])
        out.append(f"- Distillation on the H200: {100 * best['mfu']:.1f}% MFU (target at least 35%): "
                   f"{'met' if best['mfu'] >= 0.35 else 'missed'}; {best.get('speedup_vs_plain', 0):.2f}x the plain "
                   f"PyTorch step's tokens/s (target at least 1.5x): "
                   f"{'met' if best.get('speedup_vs_plain', 0) >= 1.5 else 'missed'} ({best['method']}).")
    cpu = [r for r in rows if r.get("peak_rss_mb")]
    if cpu:
        peak = max(r["peak_rss_mb"] for r in cpu)
        out.append(f"- Peak memory of distillation on the CPU (reference pair): {peak / 1024:.2f} GiB (target under "
                   f"6 GB): {'met' if peak * 2**20 < 6e9 else 'missed'}.")
    return out


def other_parts(data: dict) -> dict:
    """Distillation tokens per quality part after the first (whose settings the protocol gives)."""
    out = {}
    for name, part in list(data.get("parts", {}).items()):
        distill = part.get("protocol", {}).get("distill", {})
        if name.startswith("quality") and distill != (data.get("protocol") or {}).get("distill"):
            out[name] = {"tokens": distill.get("tokens"), "compile": distill.get("compile"),
                         **({"generate_data": distill["generate_data"]} if distill.get("generate_data") else {})}
    return out


def render(data: dict) -> str:
    rows = data["rows"]
    lines = ["# Minitron pruning and distillation", "",
             f"Generated by `python benchmarks/minitron.py --report-only` from `benchmarks/results/minitron.json` "
             f"(merged {data['date']}). Parts: " + "; ".join(f"{k}: {v.get('device')} ({v.get('date')})"
                                                              for k, v in data.get("parts", {}).items()) + ".", ""]
    protocol = data.get("protocol") or {}
    if protocol:
        lines += [f"Held-out text: the wiki eval split and Austen's {protocol.get('held_out_novel', '')} "
                  f"({protocol.get('eval_windows')} windows x 512 tokens each, no BOS); KL(base || model) per token. "
                  f"Training text: {', '.join(protocol.get('training_data', []))} (the other five novels); tokens per "
                  f"run in the table (repeated epochs count). Distillation settings of the first quality part: "
                  f"{json.dumps(protocol.get('distill', {}))}; the other quality parts' tokens (and teacher-sampled "
                  f"tokens, --generate-data): {json.dumps(other_parts(data))}.", ""]
    found = targets(rows)
    if found:
        lines += ["## Targets", "", *found, ""]
    quality_rows = [r for r in rows if str(r.get("part", "")).startswith("quality")]
    if quality_rows:
        lines += ["## Quality", "",
                  "| method | target | axis / sparsity | shape | params (M) | tokens | wiki ppl | wiki KL | Austen ppl | "
                  "Austen KL | gap recovered (wiki / Austen) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in quality_rows:
            c = r.get("config", {})
            shape = r.get("shape")
            shape_text = (f"h{shape['hidden']} f{shape['ffn']} {shape['heads']}/{shape['kv_heads']} L{shape['layers']}"
                          if shape else "-")
            status = r.get("error")
            lines.append("| " + " | ".join([
                r.get("method", ""), fmt(c.get("target_params") and c["target_params"] // 10**6) + ("M" if c.get(
                    "target_params") else ""), c.get("axis") or fmt(c.get("sparsity")), shape_text,
                fmt(r.get("params") and r["params"] / 1e6, 2), fmt(r.get("tokens")),
                fmt(r.get("ppl")) if not status else f"({status[:80]})", fmt(r.get("kl"), 4), fmt(r.get("ppl_austen")),
                fmt(r.get("kl_austen"), 4),
                f"{fmt(r.get('recovery'), 2)} / {fmt(r.get('recovery_austen'), 2)}" if "recovery" in r else "-"]) + " |")
        lines += ["", "Gap recovered: (pruned ppl - distilled ppl) / (pruned ppl - base ppl).", ""]
    speed = [r for r in rows if str(r.get("method", "")).startswith("kd-step") or r.get("part") == "cpu"]
    if speed:
        lines += ["## Distillation throughput", "",
                  "| step | device | batch x seq | KL chunk | compile mode | tokens/s | MFU | vs plain | peak GPU GB | "
                  "peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            c = r.get("config", {})
            if "error" in r:
                what = r["error"][:80] or "the process was killed without output (out of memory on the CPU machine)"
                lines.append(f"| {r['method']} | - | {c.get('batch', '-')} x {c.get('seq_len', '-')} | "
                             f"{fmt(c.get('kl_chunk'))} | {fmt(c.get('compile_mode'))} | ({what}) | - | - | - | - |")
                continue
            lines.append("| " + " | ".join([
                r["method"].removeprefix("kd-step:") + (" (gradient checkpointing)" if c.get("gradient_checkpointing")
                                                          else "") + (" **(best)**" if r.get("best") else ""),
                r.get("device", ""), f"{c.get('batch')} x {c.get('seq_len')}", fmt(c.get("kl_chunk")),
                fmt(c.get("compile_mode")), f"{r['tokens_per_s']:,.0f}",
                f"{100 * r['mfu']:.1f}%", fmt(r.get("speedup_vs_plain"), 2), fmt(r.get("peak_memory_gb"), 1),
                fmt(r.get("peak_rss_mb"), 0)]) + " |")
        profiled = [r for r in speed if isinstance(r.get("profile"), dict) and "by_family_ms" in r["profile"]]
        if profiled:
            lines += ["", "Device time per step by kernel family (torch.profiler, one warm step):", "",
                      "| step | batch | KL chunk | compile mode | step ms | device ms | GEMM | attention | fused (triton) "
                      "| other |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in profiled:
                c, prof = r["config"], r["profile"]
                fam = prof["by_family_ms"]
                lines.append("| " + " | ".join([
                    r["method"].removeprefix("kd-step:"), fmt(c.get("batch")), fmt(c.get("kl_chunk")),
                    fmt(c.get("compile_mode")), fmt(1000 * r["step_s"], 1), fmt(prof["device_ms_per_step"], 1),
                    *(fmt(fam.get(k, 0.0), 1) for k in ("gemm", "attention", "fused (triton)", "other"))]) + " |")
        lines += ["", "MFU counts 2 x teacher + 6 x student parameters per token (embeddings included) over the "
                      "H200's 790 TFLOP/s bf16 rate on the GPU, and over this CPU's measured float32 matmul rate "
                      "on the CPU (CPU figures taken on a shared, loaded 2-core machine).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=["prepare", "throughput", "quality", "cpu", "aggregation", "merge"])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--out", default=str(RESULTS / "parts"))
    parser.add_argument("--work", default="/tmp/minitron-bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--austen", default="")
    parser.add_argument("--tokens", default="", help="distillation tokens per student (default: from --tokens-from, "
                                                     "else 4M)")
    parser.add_argument("--rows", default="", help="quality part: only these rows, e.g. modegpt,minitron-70M-both "
                                                   "(fp32, slicegpt, modegpt, minitron-<size>-<axis>); overrides --group")
    parser.add_argument("--generate-data", default="", help="quality part: tokens of teacher-sampled text added to "
                                                            "the training mix, e.g. 2M")
    parser.add_argument("--fresh", action="store_true", help="merge: start from the parts only, not the results file")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--samples", type=int, default=32, help="Minitron calibration samples")
    parser.add_argument("--sliced-samples", type=int, default=64, help="SliceGPT/MoDeGPT calibration samples")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="100M,70M")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds the quality part may take")
    parser.add_argument("--distill-estimate-s", type=float, default=30)
    parser.add_argument("--prune-estimate-s", type=float, default=15)
    parser.add_argument("--tokens-from", default="", help="a throughput part's JSON: tokens from its measured rate")
    parser.add_argument("--seconds-per-run", type=float, default=15)
    parser.add_argument("--lr-probe", default="", help="learning rates to probe on the first student (comma-separated)")
    parser.add_argument("--group", default="all", choices=["all", "a", "b", "c", "d"],
                        help="quality rows: a (~100M students, SliceGPT), b (~70M students, MoDeGPT), c (SliceGPT), "
                             "d (MoDeGPT) or all")
    parser.add_argument("--seq-agg", default="l2", help="Minitron aggregation over the sequence (the CPU study's best)")
    parser.add_argument("--batch-agg", default="l2")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--sweep", nargs="?", const=SWEEP, default="",
                        help="throughput part: measure these step configurations BATCH/KL_CHUNK/COMPILE_MODE,... "
                             "(no value: the default sweep)")
    parser.add_argument("--sweep-budget", type=float, default=1e9, help="seconds the throughput part may take")
    parser.add_argument("--sweep-estimate-s", type=float, default=15,
                        help="seconds one compiled configuration needs (x3 with max-autotune)")
    parser.add_argument("--profile", action="store_true", help="throughput part: device time by kernel family")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-steps", type=int, default=3)
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--kl-chunk", type=int, default=4096, help="cpu part: tokens per chunk of the fused KL")
    parser.add_argument("--cpu-modes", default="plain,checkpointing",
                        help="cpu part: plain and/or checkpointing (gradient checkpointing)")
    parser.add_argument("--ffn", type=int, default=864, help="aggregation study: MLP neurons kept")
    args = report_cli(parser, "minitron", render)
    if args is None:
        return
    global MODEL
    MODEL = args.model
    if args.part == "prepare":
        prepare(Path(args.out))
    elif args.part == "throughput":
        throughput(args)
    elif args.part == "quality":
        args.batch = args.batch or 64
        quality(args)
    elif args.part == "cpu":
        cpu(args)
    elif args.part == "aggregation":
        aggregation(args)
    elif args.part == "merge":
        merge(args.paths, args.fresh)


if __name__ == "__main__":
    main()
