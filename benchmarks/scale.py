"""PTQ at scale on one GPU: our `compress quantize` on synthetic Llama-3-shaped checkpoints beside
llm-compressor's `oneshot` in the same run, with the same calibration tokens.

Builds HF directories with random bf16 weights (a config, the reference model's tokenizer),
runs GPTQ W4 g128 act-order, AWQ+GPTQ and SmoothQuant W8A8 through the CLI at 128 × 512
calibration tokens and GPTQ at 512 × 2048, and records the wall time split by phase (load,
embed, per block: load, statistics, solve, propagate, save; write), GPU utilisation sampled
every 0.2 s over the block loop, host peak RSS (VmHWM of the process) and the device's peak
allocation. One 70B-shaped block is measured the same way; its per-block cost extrapolates the
70B and 405B runs. Writes results/scale.json; renders reports/scale.md.

    python benchmarks/scale.py --device cuda --work /tmp/scale     # on the GPU machine
    python benchmarks/scale.py --tiny --work out/scale-tiny        # the whole script on a CPU, tiny shapes
    python benchmarks/scale.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, fmt, report_cli, table, write_report, write_results  # noqa: E402

NAME = "scale"
LLAMA3 = {"rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {  # Llama 3 shapes with the reference tokenizer's vocabulary (49152)
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": 32},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
            "num_hidden_layers": 80},
    "405b": {"hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
             "num_hidden_layers": 126},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 4},
}
VOCAB = 49152
RUNS = {  # name: (method, options)
    "gptq": ("gptq", ["--bits", "4", "--group-size", "128", "--act-order"]),
    "awq+gptq": ("awq+gptq", ["--bits", "4", "--group-size", "128", "--act-order"]),
    "smoothquant-w8a8": ("smoothquant", []),
}
TARGETS = {"vs_llmc": 0.7, "gpu_busy": 0.8, "rss_gb": 8.0, "gptq_512x2048_s": 600.0, "70b_s": 45 * 60.0,
           "method_ratio": 2.0}


# ---------------------------------------------------------------- synthetic checkpoints

def block_linears(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of the seven linears of a Llama block."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def build_checkpoint(directory: Path, shape: str, layers: int, tokenizer_dir: Path, device: str) -> dict:
    """An HF Llama directory with random bf16 weights (std 0.02, unit norms), sharded like HF's."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    started = time.perf_counter()
    config = LlamaConfig(vocab_size=VOCAB, **{**SHAPES[shape], "num_hidden_layers": layers}, **LLAMA3,
                         dtype="bfloat16")
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, directory / f)
    h = config.hidden_size
    generator = torch.Generator(device).manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parts = ["self_attn"] * 4 + ["mlp"] * 3
    shards: list[dict] = [{"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                           "lm_head.weight": rand(VOCAB, h)}]
    for layer in range(layers):
        block = {f"model.layers.{layer}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 f"model.layers.{layer}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        for name, part, (rows, cols) in zip(names, parts, block_linears(SHAPES[shape])):
            block[f"model.layers.{layer}.{part}.{name}.weight"] = rand(rows, cols)
        shards.append(block)
    total = len(shards)
    weight_map, size = {}, 0
    for index, shard in enumerate(shards):
        fname = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in shard.items()}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        size += sum(v.numel() * 2 for v in shard.values())
        shard.clear()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                        "weight_map": weight_map}))
    params = size // 2
    return {"shape": shape, "layers": layers, "params": params, "bytes": size,
            "build_s": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- measuring a process

class GpuSampler:
    """GPU utilisation every 0.2 s from NVML (what nvidia-smi shows), with wall-clock stamps."""

    def __init__(self, index: int = 0, period: float = 0.2):
        self.samples: list[tuple[float, int]] = []
        self.period = period
        self.stop = threading.Event()
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
        except Exception:  # no GPU, no NVML: no samples
            self.handle = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.handle is not None:
                self.samples.append((time.time(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            self.stop.wait(self.period)

    def __enter__(self) -> "GpuSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def mean(self, start: float | None = None, end: float | None = None) -> float | None:
        values = [u for t, u in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return round(sum(values) / len(values) / 100, 3) if values else None


def run_ours(model: Path, out: Path, run: str, samples: int, seq_len: int, device: str, env: dict | None = None,
             calib: str = "wiki", wrapper: list[str] | None = None) -> dict:
    """Our CLI in a fresh process: wall time, its own phase split (build.json), GPU utilisation
    over the block loop, host peak RSS and the device's peak allocation. `wrapper` runs the CLI
    through another script (the profiler's)."""
    method, options = RUNS[run]
    cmd = [sys.executable, *(wrapper or ["-m", "compressor.cli"]), "--json", "quantize", str(model), "-o", str(out),
           "--method", method, *options, "--device", device, "--dtype", "bfloat16", "--samples", str(samples),
           "--seq-len", str(seq_len), "--calib", calib, "--overwrite", "--restart", "--no-verify"]
    started = time.perf_counter()
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed: {proc.stderr.strip()[-1500:]}")
    result = json.loads(proc.stdout)
    build = json.loads((out / "build.json").read_text())
    blocks = build["blocks_s"]
    typical = blocks[:-1] or blocks  # the last block has no successor to propagate to
    per_block = {k: round(sum(b.get(k, 0.0) for b in typical) / len(typical), 3)
                 for k in ("load", "stats", "solve", "propagate", "save")}
    checkpoint = build.get("checkpoint_s") or []  # the checkpoint thread's parts, beside the blocks
    thread_per_block = {k: round(sum(b.get(k, 0.0) for b in checkpoint) / len(checkpoint), 3)
                        for k in dict.fromkeys(k for b in checkpoint for k in b)} if checkpoint else None
    window = build.get("blocks_window") or [None, None]
    phases = result.get("phases_s") or {**build["phases_s"], **({"write": result["write_s"]} if "write_s" in result else {})}
    if "startup" in phases:  # what the process spent outside the phases it timed (its exit, mostly)
        phases["other"] = wall - sum(v for k, v in phases.items() if k not in INNER_PHASES)
    row = {"run": run, "samples": samples, "seq_len": seq_len, "calib": calib, "wall_s": round(wall, 1),
           "phases_s": {k: round(v, 2) for k, v in phases.items()},
           "blocks": len(blocks), "per_block_s": per_block, "block_s": round(sum(per_block.values()), 3),
           **({"checkpoint_thread_per_block_s": thread_per_block} if thread_per_block else {}),
           "block_loop_s": round(window[1] - window[0], 1) if window[0] else None,
           "gpu_busy_blocks": gpu.mean(*window), "gpu_busy_all": gpu.mean(),
           "peak_rss_gb": round(result["peak_rss_mb"] / 1024, 2),
           "device_peak_gb": round(build.get("device_peak_mb", 0) / 1024, 2), "batch_size": build.get("batch_size"),
           "activations": build.get("activations"), "bits_per_weight": result.get("bits_per_weight"),
           "size_gb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2)}
    shutil.rmtree(out, ignore_errors=True)
    return row


LLMC_SCRIPT = r"""
import json, sys, time, torch
started = time.perf_counter()
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
imported = time.perf_counter()
ids = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = time.perf_counter()
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False)
done = time.perf_counter()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "quantize_s": done - loaded,
                  "peak_rss_gb": hwm / 2**20, "device_peak_gb": torch.cuda.max_memory_allocated() / 2**30
                  if torch.cuda.is_available() else 0.0}))
"""


def run_llmc(model: Path, ids_file: Path) -> dict:
    """llm-compressor's oneshot GPTQ W4A16 (group 128) on the same model and calibration tokens."""
    started = time.perf_counter()
    with GpuSampler() as gpu:
        proc = subprocess.run([sys.executable, "-c", LLMC_SCRIPT, str(model.resolve()), str(ids_file.resolve())],
                              capture_output=True, text=True, cwd="/")  # nothing of ours shadows its imports
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor failed: {proc.stderr.strip()[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import llmcompressor

    return {"run": "llm-compressor gptq", "version": llmcompressor.__version__, "wall_s": round(wall, 1),
            "load_s": round(result["load_s"], 1), "quantize_s": round(result["quantize_s"], 1),
            "load_quantize_s": round(result["load_s"] + result["quantize_s"], 1),
            "peak_rss_gb": round(result["peak_rss_gb"], 2), "device_peak_gb": round(result["device_peak_gb"], 2),
            "gpu_busy_all": gpu.mean()}


def calibration_ids(model: Path, samples: int, seq_len: int, path: Path | None = None, calib: str = "wiki") -> float:
    """The calibration tokens our CLI uses (seed 0), saved for llm-compressor where `path` is given.
    Tokenizing fills the compressor cache, as any earlier run on the same data would have: the timed
    runs then start from tokens, as llm-compressor's (handed these ids) does. Returns the seconds taken."""
    import torch
    from transformers import AutoTokenizer

    from compressor.calib.data import calibration_set

    started = time.perf_counter()
    tokens = calibration_set(calib, AutoTokenizer.from_pretrained(model), samples, seq_len, 0, "text", False)
    if path is not None:
        torch.save(tokens.input_ids.clone(), path)
    return round(time.perf_counter() - started, 1)


PROFILE_SCRIPT = r"""
import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from compressor.pipeline import sequential

CUPTI_MARKERS = {"Command Buffer Full", "Activity Buffer Request", "Lazy Function Loading"}
out, block_index = sys.argv[1], int(sys.argv[2])
original = sequential.SequentialPipeline._block


def profiled(self, blocks, index, *args, **kwargs):
    if index != block_index:
        return original(self, blocks, index, *args, **kwargs)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = original(self, blocks, index, *args, **kwargs)
        sync()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    device = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e6
    # Only device-side activity (kernels, copies, memsets): the host ops that launched them carry the
    # same time again, and CUPTI's markers ("Command Buffer Full") are host stalls, not device work.
    on_device = lambda e: "CUDA" in str(getattr(e, "device_type", "")) and e.key not in CUPTI_MARKERS
    kernels = sorted(((e.key, device(e), e.count) for e in events if on_device(e) and device(e) > 0),
                     key=lambda k: -k[1])
    cpu = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in events), key=lambda k: -k[1])
    json.dump({"block": index, "wall_s": wall, "device_busy_s": sum(k[1] for k in kernels),
               "kernels": kernels[:20], "cpu": cpu[:20]},
              open(out, "w"), indent=1)
    return result


sequential.SequentialPipeline._block = profiled
from compressor.cli import main
sys.argv = ["compress", *sys.argv[3:]]
main()
"""


def run_profile(model: Path, out: Path, samples: int, seq_len: int, device: str, work: Path) -> dict:
    """Our GPTQ run with block 1 under torch.profiler: where one block's time goes, kernel by
    kernel (device time) and op by op (host time); the profiler slows the host side."""
    script = work / "profile_block.py"
    script.write_text(PROFILE_SCRIPT)
    target = work / "profile.json"
    row = run_ours(model, out, "gptq", samples, seq_len, device, wrapper=[str(script), str(target), "1"])
    profile = json.loads(target.read_text())
    top = lambda items: [[name[:60], round(t, 4), n] for name, t, n in items[:12]]  # noqa: E731
    return {"run": "gptq profile", "samples": samples, "seq_len": seq_len, "profile": {
        "block": profile["block"], "wall_s": round(profile["wall_s"], 3),
        "device_busy_s": round(profile["device_busy_s"], 3),
        "device_busy": round(profile["device_busy_s"] / profile["wall_s"], 3),
        "kernels": top(profile["kernels"]), "host_ops": top(profile["cpu"])},
        "wall_s": row["wall_s"]}


# ---------------------------------------------------------------- extrapolation

def block_params(shape: str) -> int:
    return sum(o * i for o, i in block_linears(SHAPES[shape]))


def solve_work(shape: str) -> int:
    """GPTQ's solve grows with in² × out per linear group (inverse and sweep over the columns)."""
    lin = block_linears(SHAPES[shape])
    groups = [(lin[0][0] + lin[1][0] + lin[2][0], lin[0][1]), lin[3], (lin[4][0] + lin[5][0], lin[4][1]), lin[6]]
    return sum(i * i * o for o, i in groups)


def extrapolate(row: dict, shape: str, target: str, tokens: int) -> float:
    """Seconds for every block of `target` at `tokens` calibration tokens from one measured block of
    `shape`: statistics and propagation scale with the block's weights × tokens, load and save with
    the weights, the solve with in² × out (it does not see the tokens)."""
    per = row["per_block_s"]
    scale = block_params(target) / block_params(shape)
    token_scale = tokens / (row["samples"] * row["seq_len"])
    block = (per["stats"] + per["propagate"]) * scale * token_scale + (per["load"] + per["save"]) * scale
    block += per["solve"] * solve_work(target) / solve_work(shape)
    return block * SHAPES[target]["num_hidden_layers"]


WRITE_PHASES = ("encode", "write", "verify")  # grow with the artifact's bytes
INNER_PHASES = ("embed",)  # inside "engine"


def artifact_bytes(shape: str, blocks: int, bits: float) -> float:
    """Bytes of an artifact of `blocks` blocks: the bf16 embedding and head, the quantized linears."""
    return 2 * 2 * VOCAB * SHAPES[shape]["hidden_size"] + blocks * block_params(shape) * bits / 8


def scaled_to_32(row: dict, shape: str = "8b") -> float:
    """Seconds for a 32-block run: the typical block's cost × 32, the writing phases (encode, write,
    verify) scaled by the artifact's bytes, plus what does not grow with blocks (start, imports,
    load of the embedding, calibration, embedding the samples)."""
    phases = row.get("phases_s", {})
    writing = sum(phases.get(k, 0.0) for k in WRITE_PHASES)
    fixed = row["wall_s"] - row["block_loop_s"] - writing
    bits = row.get("bits_per_weight") or 16
    grow = artifact_bytes(shape, 32, bits) / artifact_bytes(shape, row["blocks"], bits)
    return fixed + row["block_s"] * 32 + writing * grow


def merge_rows(data: dict, args) -> dict:
    """The committed results with the rows of `args.merge` in place of the same runs; the summary is
    recomputed and a note says which rows come from which call."""
    if not args.merge:
        return data
    try:
        fresh = json.loads(Path(args.merge).read_text())
        if not all(isinstance(r, dict) and "run" in r for r in fresh["rows"]) or "date" not in fresh:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        print(f"error: --merge {args.merge} is not a scale.json a call of this script wrote; pass the $OUT/scale.json "
              "the device call returned", file=sys.stderr)
        raise SystemExit(2) from None
    key = lambda r: (r.get("shape"), r.get("run"), r.get("samples"), r.get("seq_len"))  # noqa: E731
    replacing = {key(r): r for r in fresh["rows"]}
    rows = [replacing.pop(key(r), r) for r in data["rows"]] + list(replacing.values())
    runs = ", ".join(f"{r['shape']} {r['run']}" + (f" {r['samples']}×{r['seq_len']}" if r.get("samples") else "")
                     for r in fresh["rows"])
    note = (f"Rows re-measured on {fresh['date'][:10]} ({fresh['device']}) and merged here by `scale.py "
            f"--report-only --merge`: {runs}. The other rows are from the call of {data['date'][:10]}.")
    return {**data, "rows": rows, "summary": summarize(rows), "notes": [*data.get("notes", []), note]}


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    sizes = sorted({r["samples"] for r in ok if r.get("samples") and r["shape"] == "8b"})
    if not sizes:
        return {}
    n, n2 = sizes[0], sizes[-1]

    def find(shape: str, run: str, samples: int) -> dict | None:
        return next((r for r in ok if r["shape"] == shape and r["run"] == run and r.get("samples") == samples), None)

    out: dict = {}
    ours, llmc = find("8b", "gptq", n), find("8b", "llm-compressor gptq", n)
    if ours and llmc:
        out["vs_llmc"] = round(ours["wall_s"] / llmc["load_quantize_s"], 3)
        # Llama-3-8B has 32 blocks: both tools' per-block costs × 32 plus their fixed costs as measured.
        llmc_32 = llmc["load_s"] + llmc["quantize_s"] / llmc["layers"] * 32
        out["llmc_32_blocks_s"] = round(llmc_32, 1)
        out["vs_llmc_32_blocks"] = round(scaled_to_32(ours) / llmc_32, 3)
        out["block_vs_llmc"] = round(ours["block_s"] / (llmc["quantize_s"] / llmc["layers"]), 3)
    if ours:
        out["gpu_busy"] = ours["gpu_busy_blocks"]
        out["rss_gb"] = ours["peak_rss_gb"]
        out["gptq_32_blocks_s"] = round(scaled_to_32(ours), 1)
    big = find("8b", "gptq", n2) if n2 != n else None
    if big:
        out["gptq_512x2048_s"] = round(scaled_to_32(big), 1)
    block70 = next((r for r in ok if r["shape"] == "70b"), None)
    large = 512 * 2048  # the calibration size the 70B target is stated at
    if block70:
        out["70b_s"] = round(extrapolate(block70, "70b", "70b", large), 1)
        out["405b_s"] = round(extrapolate(block70, "70b", "405b", large), 1)
    for run in ("awq+gptq", "smoothquant-w8a8"):
        other = find("8b", run, n)
        if ours and other:
            out[f"{run}_vs_gptq"] = round(other["block_s"] / ours["block_s"], 2)
    return out


# ---------------------------------------------------------------- report

def _minutes(s):
    return f"{s / 60:.1f} min"


def render(data: dict) -> str:
    s = data.get("summary", {})
    t = TARGETS
    lines = ["# PTQ at scale", "",
             f"Measured {data['date']} on {data['machine']}, {data.get('gpu', 'no GPU')}; written by "
             "`benchmarks/scale.py` (synthetic Llama-3-shaped checkpoints, random bf16 weights, the reference "
             f"tokenizer's 49,152-token vocabulary; calibration: {data.get('protocol', {}).get('calibration', 'wiki, seed 0')}). "
             "Wall times are from process start to finished artifact (ours) or load + quantize (llm-compressor, as "
             "its users time it, without saving). Python's start and imports count for ours (about 20 s of "
             "llm-compressor's process fell outside its load + quantize). Phases: startup (interpreter and imports), "
             "setup (checks and the libraries they import), load, calibration (tokens), prepare, embed, encode, "
             "write (shards hashed as written, manifest), verify (one read-back), other (process exit).", "",
             "## Targets", ""]
    layers = next((r["layers"] for r in data["rows"] if r["shape"] == "8b"), None)
    checks = [
        (f"GPTQ W4 g128, 8B-shaped with {layers} blocks, 128×512: ours (process start to artifact) / "
         "llm-compressor load+quantize", s.get("vs_llmc"), f"≤ {t['vs_llmc']}", lambda v: v <= t["vs_llmc"], "{:.2f}×"),
        ("the same scaled to 32 blocks (each tool's block cost × 32 + its fixed cost)", s.get("vs_llmc_32_blocks"),
         f"≤ {t['vs_llmc']}", lambda v: v <= t["vs_llmc"], "{:.2f}×"),
        ("per block: ours / llm-compressor's quantize time per block", s.get("block_vs_llmc"), "",
         lambda v: True, "{:.2f}×"),
        ("GPU busy during the block loop", s.get("gpu_busy"), f"≥ {t['gpu_busy']:.0%}", lambda v: v >= t["gpu_busy"],
         "{:.0%}"),
        ("host peak RSS (GB)", s.get("rss_gb"), f"≤ {t['rss_gb']:.0f}", lambda v: v <= t["rss_gb"], "{:.1f}"),
        ("GPTQ 8B at 512×2048 (32 blocks)", s.get("gptq_512x2048_s"), "≤ 10 min",
         lambda v: v <= t["gptq_512x2048_s"], _minutes),
        ("GPTQ 70B at 512×2048 (80 blocks, extrapolated)", s.get("70b_s"), "≤ 45 min", lambda v: v <= t["70b_s"],
         _minutes),
        ("AWQ+GPTQ per block / GPTQ per block", s.get("awq+gptq_vs_gptq"), "≤ 2×",
         lambda v: v <= t["method_ratio"], "{:.2f}×"),
        ("SmoothQuant W8A8 per block / GPTQ per block", s.get("smoothquant-w8a8_vs_gptq"), "≤ 2×",
         lambda v: v <= t["method_ratio"], "{:.2f}×"),
    ]
    lines += table(["target", "measured", "goal", "met"],
                   [[name, fmt(v, spec, "not measured"), goal, "" if v is None or not goal else ("yes" if ok(v) else "no")]
                    for name, v, goal, ok, spec in checks])
    lines += ["", "## Runs", ""]
    rows = []
    for r in data["rows"]:
        if "profile" in r:
            continue
        if "error" in r:
            rows.append([r["shape"], r["run"], "", "", "", "", "", "", "", "", r["error"][:120]])
            continue
        per = r.get("per_block_s", {})
        phases = r.get("phases_s", {})
        split = (f"load {per['load']:.2f} · stats {per['stats']:.2f} · solve {per['solve']:.2f} · "
                 f"propagate {per['propagate']:.2f} · save {per['save']:.2f}") if per else ""
        thread = r.get("checkpoint_thread_per_block_s")
        if thread:  # beside the block, not part of its sum
            split += " (checkpoint thread: " + " · ".join(f"{k} {v:.2f}" for k, v in thread.items()) + ")"
        rows.append([
            r["shape"], r["run"], f"{r['samples']}×{r['seq_len']}" if r.get("samples") else "",
            f"{r.get('layers', '')}", fmt(r.get("wall_s"), "{:.1f}"),
            " · ".join(f"{k} {v:.1f}" for k, v in phases.items() if k != "engine") if phases
            else f"load {r['load_s']:.1f} · quantize {r['quantize_s']:.1f}",
            split, fmt(r.get("gpu_busy_blocks", r.get("gpu_busy_all")), "{:.0%}"), fmt(r.get("peak_rss_gb"), "{:.1f}"),
            fmt(r.get("device_peak_gb"), "{:.1f}"), r.get("activations", "") or ""])
    lines += table(["shape", "run", "calibration", "blocks", "wall s", "phases (s)", "per block (s)", "GPU busy",
                    "host RSS GB", "device GB", "notes"], rows)
    notes = data.get("notes", [])
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    cpu = data.get("cpu_fixed")
    if cpu:
        m, e = cpu["manifest"], cpu["early_export"]
        lines += ["", "## Fixed per-run costs, before and now (CPU)", "",
                  f"Measured {cpu['date']} on {cpu['machine']} by `benchmarks/fixed_costs.py`, with both code paths "
                  "(they are both still in the code), on a machine shared with other work.", ""]
        lines += table(["cost", "before", "now"], [
            ["tokenizing 128 × 512 wiki calibration tokens (s)", f"{cpu['tokenize_cold_s']:.2f}",
             f"{cpu['tokenize_cached_s']:.2f} (token cache)"],
            [f"artifact of {m['weights_mb']} MB: shards + manifest + verification (s)",
             f"{m['reread']['write_s']:.2f} + {m['reread']['manifest_s']:.2f} + {m['reread']['verify_s']:.2f}",
             f"{m['as_written']['write_s']:.2f} + {m['as_written']['manifest_s']:.2f} + "
             f"{m['as_written']['verify_s']:.2f} (hashed as written)"],
            ["encoding the blocks after the engine, small bf16 Llama, 6 blocks (s)",
             f"{e['after_engine']['encode_s']:.2f} (wall {e['after_engine']['wall_s']:.1f})",
             f"{e['during_engine']['encode_s']:.2f} (wall {e['during_engine']['wall_s']:.1f}; encoded in the "
             "checkpoint thread)"],
            ["process exit after the imports of a run (s)", f"{cpu['exit_plain_s']:.2f}",
             f"{cpu['exit_freeze_s']:.2f} (gc.freeze)"]])
    prof = next((r["profile"] for r in data["rows"] if "profile" in r), None)
    if prof:
        lines += ["", f"## Where one 8B-shaped block's time goes (block {prof['block']}, under torch.profiler)", "",
                  f"{prof['wall_s']:.2f} s of wall time, {prof['device_busy_s']:.2f} s of it with a kernel running "
                  f"({prof['device_busy']:.0%}); the profiler adds host overhead.", ""]
        lines += table(["kernel (device time)", "s", "calls"], [[k, f"{t:.3f}", str(n)] for k, t, n in prof["kernels"]])
        lines += [""]
        lines += table(["op (host time, self)", "s", "calls"], [[k, f"{t:.3f}", str(n)] for k, t, n in prof["host_ops"]])
    lines += ["", "GPU busy: NVML utilisation sampled every 0.2 s over our block loop (llm-compressor: its whole "
              "process). Per-block phases are synchronized device time: load (read from the checkpoint, copy to "
              "the GPU), stats (forward passes gathering Hessians), solve (GPTQ or the scale search), propagate "
              "(the block's outputs for the next block), save (handing the checkpoint to the background writer).",
              "", "## Extrapolation", "",
              "From the measured 70B-shaped block at 512 × 2048: load, statistics, propagation and save scale with "
              "the block's weights, the solve with in² × out of each linear group; times the block count. The 8B "
              "512 × 2048 figure (and every 32-block figure) scales the measured blocks to 32, the writing phases "
              "(encode, write, verify) by the artifact's bytes, and adds what does not grow with blocks (startup, "
              "setup, load of the embedding, calibration, embed, exit).", ""]
    lines += table(["model", "blocks", "GPTQ W4 g128 at 512×2048"],
                   [["Llama-3-70B shape", "80", fmt(s.get("70b_s"), _minutes, "not measured")],
                    ["Llama-3-405B shape", "126", fmt(s.get("405b_s"), _minutes, "not measured")]])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="out/scale")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on any device (checks the script)")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the 8B-shaped model (32 in Llama-3-8B; "
                        "per-block costs scale to 32, host memory does not grow with them)")
    parser.add_argument("--stages", default="gptq,llmc,gptq-2048,70b,profile,awq+gptq,smoothquant-w8a8",
                        help="in the order they run")
    parser.add_argument("--calib-large", default="wiki,austen:train",
                        help="calibration data of the 512 × 2048 run (the wiki calibration split alone has 961k tokens)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip a stage (recorded as skipped) when its estimated time would pass this many seconds "
                             "since the start (one device call's limit)")
    parser.add_argument("--results", default=None, help="where to write the results JSON")
    parser.add_argument("--merge", default=None,
                        help="with --report-only: the rows of another scale.json (a call that ran some stages) "
                             "replace the committed rows of the same shape, run and calibration")
    args = report_cli(parser, NAME, render, refresh=merge_rows)
    if args is None:
        return
    from compressor.models import assets

    began = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = assets.fetch_model("smollm2-135m") if not os.environ.get("SCALE_TOKENIZER") \
        else Path(os.environ["SCALE_TOKENIZER"])
    big, huge = ("tiny", "tiny") if args.tiny else ("8b", "70b")
    n, l, n2, l2 = (8, 64, 16, 128) if args.tiny else (128, 512, 512, 2048)
    results_path = Path(args.results) if args.results else RESULTS / f"{NAME}.json"
    rows: list[dict] = []
    notes: list[str] = []
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass

    committed = RESULTS / f"{NAME}.json"  # the CPU part (benchmarks/fixed_costs.py) is kept
    cpu_fixed = json.loads(committed.read_text()).get("cpu_fixed") if committed.is_file() else None

    def save():
        data = {"device": args.device if args.device == "cpu" else f"{args.device} ({gpu})", "gpu": gpu,
                "summary": summarize(rows), "targets": TARGETS, "notes": notes,
                **({"cpu_fixed": cpu_fixed} if cpu_fixed else {})}
        write_results(NAME, rows, {"calibration": f"wiki, seed 0, {n}×{l}; {args.calib_large}, seed 0, {n2}×{l2}",
                                   "weights": "random bf16, std 0.02", "vocab": VOCAB,
                                   "tokenized_before_timing": True}, data, path=results_path)
        print(json.dumps(data["summary"]), flush=True)

    # Seconds each stage takes on one H200 with 8 blocks (fewer blocks: less), to stay inside --budget-s.
    estimates = {"gptq": 45, "llmc": 50, "gptq-2048": 100, "70b": 80, "profile": 40, "awq+gptq": 55,
                 "smoothquant-w8a8": 40}

    def stage(name: str, label: str, layers: int, fn) -> None:
        if name not in args.stages.split(","):
            return
        elapsed = time.perf_counter() - began
        estimate = estimates.get(name, 60) * ((0.4 + 0.6 * args.layers / 8) if label == "8b" else 1.0)
        if args.budget_s is not None and elapsed + estimate > args.budget_s:
            rows.append({"shape": label, "layers": layers, "run": name,
                         "error": f"skipped: {elapsed:.0f} s used of the call's {args.budget_s:.0f} s budget"})
            save()
            return
        try:
            row = fn()
        except Exception as exc:  # one failed stage leaves the others' measurements
            row = {"run": name, "error": f"{type(exc).__name__}: {exc}"}
        rows.append({"shape": label, "layers": layers, **row})
        print(json.dumps(rows[-1]), flush=True)
        save()

    block70 = work / f"model-70b-{huge}"
    built = {}

    def model(path: Path, shape: str, layers: int) -> Path:
        if path not in built:
            built[path] = build_checkpoint(path, shape, layers, tokenizer_dir, args.device)
            print(json.dumps({"built": str(path), **built[path]}), flush=True)
        return path

    ids = work / "calib-ids.pt"
    # One 8B-shaped checkpoint of --layers blocks for every 8B run (llm-compressor's too: same model,
    # same tokens, same process conditions); 32-block figures scale the typical block's cost.
    eight = work / f"model-8b-{big}"
    if any(st in args.stages.split(",") for st in ("gptq", "llmc", "awq+gptq", "smoothquant-w8a8", "profile")):
        seconds = calibration_ids(model(eight, big, args.layers), n, l, ids)
        notes.append(f"The {n}×{l} wiki calibration tokens were made before the timed runs ({seconds} s, "
                     "tokenizing or reading the compressor's token cache): our runs read them from the cache, "
                     "llm-compressor was handed the same ids.")
    stage("gptq", "8b", args.layers, lambda: run_ours(model(eight, big, args.layers), work / "out", "gptq", n, l,
                                                       args.device))
    stage("llmc", "8b", args.layers, lambda: {"samples": n, "seq_len": l, **run_llmc(eight, ids)})

    def large():
        seconds = calibration_ids(model(eight, big, args.layers), n2, l2, calib=args.calib_large)
        notes.append(f"The {n2}×{l2} calibration tokens of {args.calib_large} were made before the timed run "
                     f"({seconds} s).")
        return run_ours(model(eight, big, args.layers), work / "out", "gptq", n2, l2, args.device,
                        calib=args.calib_large)

    stage("gptq-2048", "8b", args.layers, large)
    # Two 70B-shaped blocks (the first one's cost, which includes propagating to the second, is what
    # extrapolates) at a quarter of the 512 × 2048 tokens: its activations then stay on the GPU (28 GB);
    # the token-proportional phases are scaled ×4 in the extrapolation.
    stage("70b", "70b", 2, lambda: run_ours(model(block70, huge, 2), work / "out", "gptq", n2 // 4, l2, args.device))
    if block70.exists():
        shutil.rmtree(block70)
    if args.device != "cpu":
        stage("profile", "8b", args.layers, lambda: run_profile(model(eight, big, args.layers), work / "out", n, l,
                                                                 args.device, work))
    for run in ("awq+gptq", "smoothquant-w8a8"):
        stage(run, "8b", args.layers, lambda run=run: run_ours(model(eight, big, args.layers), work / "out", run, n,
                                                               l, args.device))
    if eight.exists():
        shutil.rmtree(eight)
    save()


if __name__ == "__main__":
    main()
