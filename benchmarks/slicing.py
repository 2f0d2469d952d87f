"""Slicing benchmark: SliceGPT (per-block and global rotation) and MoDeGPT against the dense
model, on the reference model and gemma3-270m: parameters, perplexity, KL, wall time and peak
RSS of `compress prune`, CPU forward latency against the FLOPs removed; and SliceGPT's
reference implementation on the same model, calibration tokens and protocol when it can run.

    flock /tmp/compressor-bench.lock ... is taken by this script around every timed part.
    python benchmarks/slicing.py --models smollm2-135m --methods slicegpt,modegpt --sparsities 0.25 [--append]

The reference implementation needs transformers 4.41: set SLICEGPT_PYTHON (a venv's python with
transformers==4.41 and ml-collections) and SLICEGPT_SRC (TransformerCompression's src/ folder);
otherwise its rows are skipped with the reason printed. Writes benchmarks/results/slicing.json and
reports/slicing.md (`--report-only`: the report alone, from the committed results).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (RESULTS, compress_json, evaluate, machine, print_table, read_results,  # noqa: E402
                    report_cli, table, write_report, write_results)

LOCK = "/tmp/compressor-bench.lock"
METHODS = {  # row method name -> compress prune options
    "slicegpt": ["--method", "slicegpt", "--rotation", "per-block"],
    "slicegpt-global": ["--method", "slicegpt", "--rotation", "global"],
    "slicegpt-keep": ["--method", "slicegpt", "--rotation", "per-block", "--embeddings", "keep"],
    "modegpt": ["--method", "modegpt"],
    "modegpt-mlp": ["--method", "modegpt", "--modules", "mlp", "--allocation", "uniform"],
}


@contextmanager
def bench_lock():
    """The shared benchmark lock (flock), so timings are not polluted by other benchmarks."""
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def forward_flops(model, seq: int) -> float:
    """Forward FLOPs per token at context `seq`: 2 x every linear's weights (blocks, shortcuts,
    head) plus causal attention (scores and mix, average context seq/2)."""
    from compressor.models.adapters import adapter_for

    adapter = adapter_for(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 0
    for block in adapter.blocks(model):
        a = block.self_attn
        heads = a.q_proj.out_features // a.head_dim
        attn += 2 * (seq / 2) * heads * (a.head_dim + getattr(a, "v_head_dim", a.head_dim))
    return 2 * linear + attn


@torch.no_grad()
def latency_ms(model, seq: int = 512, repeats: int = 5) -> float:
    """Median wall time of one forward pass over a batch of one `seq`-token sequence."""
    ids = torch.randint(10, 1000, (1, seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


DEVICE = "cpu"


def prune_row(model: str, method: str, sparsity: float, work: Path, samples: int, reuse: bool = False) -> dict:
    out = work / f"{model}-{method}-{sparsity}"
    args = ["prune", model, "-o", str(out), "--sparsity", str(sparsity), "--samples", str(samples), "--overwrite",
            *METHODS[method]]
    if DEVICE != "cpu":
        args += ["--device", DEVICE, "--batch-size", "16"]
    if reuse and (out / "manifest.json").is_file():  # an artifact of an interrupted run of this benchmark
        manifest = json.loads((out / "manifest.json").read_text())
        build = json.loads((out / "build.json").read_text())
        result = {**manifest["metrics"], "model_type": json.loads((out / "config.json").read_text())["model_type"],
                  "wall_s": build["wall_s"], "slice_s": build.get("slice_s"), "process_wall_s": None,
                  "peak_rss_mb": build.get("peak_rss_mb")}
    else:
        with bench_lock():
            result = compress_json(*args)
    name = {"modegpt-mlp": "modegpt", "slicegpt-keep": "slicegpt"}.get(method, method)
    config = {"sparsity": sparsity, "calib_samples": samples}
    if method == "slicegpt-keep":
        config["embeddings"] = "keep"
    if method == "modegpt-mlp":
        config.update(modules="mlp", allocation="uniform")
    elif method == "modegpt":
        config.update(modules="all", allocation="global")
    return {"model": model, "method": name, "config": config, "artifact": str(out), "device": DEVICE,
            "params": result["params"], "param_reduction": round(result["param_reduction"], 4),
            "ordinary_config": result["ordinary_config"], "model_type": result["model_type"],
            "size_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "wall_s": result["wall_s"], "slice_s": result["slice_s"], "process_wall_s": result["process_wall_s"],
            "peak_rss_mb": result["peak_rss_mb"]}


LATENCY_REPEATS = 5


def quality(model: str, rows: list[dict], windows: int) -> dict:
    """Perplexity and KL of the artifacts (one base forward per batch), latency and FLOPs."""
    from compressor.models.adapters import count_parameters

    cpu = DEVICE == "cpu"  # CPU latency is measured only in a CPU run
    dense: dict = {}

    def measure_base(base) -> None:
        dense["flops"] = forward_flops(base.model, 512)
        if cpu:
            with bench_lock():
                dense["ms"] = latency_ms(base.model, repeats=LATENCY_REPEATS)

    by_artifact = {row["artifact"]: row for row in rows}

    def measure(artifact: str, m) -> None:
        row = by_artifact[artifact]
        row["flops_ratio"] = forward_flops(m, 512) / dense["flops"]
        if cpu:
            with bench_lock():
                ms = latency_ms(m, repeats=LATENCY_REPEATS)
            removed = 1 - row["flops_ratio"]
            row.update(latency_ms=ms, dense_latency_ms=dense["ms"], latency_ratio=ms / dense["ms"],
                       latency_vs_ideal=(1 - ms / dense["ms"]) / removed if removed > 0 else None)

    # A few candidates per pass share one base forward per batch; a large vocabulary (Gemma's
    # 262k) makes the logits the memory peak, so fewer candidates and windows per pass there.
    from compressor.models.loading import resolve_model_path

    big = json.loads((resolve_model_path(model) / "config.json").read_text()).get("vocab_size", 0) > 100_000
    per_pass, batch = ((4, 1) if big else (3, 4)) if cpu else (4, 8)
    results = evaluate(model, {row["artifact"]: row["artifact"] for row in rows}, windows, device=DEVICE,
                       batch_size=batch, per_pass=per_pass, each=measure, before=measure_base)
    for row in rows:
        r = results[row["artifact"]]
        row.update(ppl=r["ppl"], kl=r["kl"], eval_windows=windows)
    base = results["loaded_base"]
    base_row = {"model": model, "method": "fp32", "config": {}, "params": count_parameters(base.model),
                "size_bytes": sum(f.stat().st_size for f in base.path.glob("*.safetensors")),
                "ppl": results["base"]["ppl"], "kl": 0.0, "wall_s": 0.0, "peak_rss_mb": 0.0,
                "latency_ms": dense.get("ms"), "latency_ratio": 1.0 if cpu else None, "flops_ratio": 1.0,
                "eval_windows": windows, "device": DEVICE}
    return {"base": base_row, "tokens": results["tokens"]}


def peer_row(model: str, sparsity: float, samples: int, windows: int, work: Path) -> dict | None:
    python, src = os.environ.get("SLICEGPT_PYTHON"), os.environ.get("SLICEGPT_SRC")
    if model != "smollm2-135m":
        print(f"peer:slicegpt skipped on {model}: the reference implementation has no Gemma 3 adapter")
        return None
    if not (python and src and Path(python).exists() and Path(src, "slicegpt").is_dir()):
        print("peer:slicegpt skipped: set SLICEGPT_PYTHON and SLICEGPT_SRC (see this file's docstring)")
        return None
    from compressor.calib.data import calibration_set, evaluation_set
    from compressor.models.loading import load_tokenizer, resolve_model_path

    src_dir = resolve_model_path(model)
    v4 = work / f"{model}-transformers4"
    v4.mkdir(parents=True, exist_ok=True)
    config = json.loads((src_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["torch_dtype"] = config.pop("dtype", "float32")
    (v4 / "config.json").write_text(json.dumps(config, indent=2))
    if not (v4 / "model.safetensors").exists():
        os.symlink(src_dir / "model.safetensors", v4 / "model.safetensors")
    tok = load_tokenizer(src_dir)
    torch.save(calibration_set("wiki", tok, samples, 512, 0).input_ids, work / "calib.pt")
    torch.save(evaluation_set("wiki", tok, windows, 512).input_ids, work / "eval.pt")
    args = {"src": src, "model_dir": str(v4), "calib": str(work / "calib.pt"), "eval": str(work / "eval.pt"),
            "sparsity": sparsity, "out": str(work / "peer.json")}
    (work / "peer-args.json").write_text(json.dumps(args))
    with bench_lock():
        subprocess.run([python, str(Path(__file__).with_name("peer_slicegpt.py")), str(work / "peer-args.json")],
                       check=True, stderr=subprocess.DEVNULL)
    r = json.loads((work / "peer.json").read_text())
    return {"model": model, "method": "peer:slicegpt:slice", "config": {"sparsity": sparsity, "calib_samples": samples},
            "params": r["params"], "ppl": r["ppl"], "kl": r["kl"], "wall_s": r["wall_s"],
            "peak_rss_mb": r["peak_rss_mb"], "note": "TransformerCompression @6b12cde, transformers 4.41, CPU; "
            "wall_s covers loading, fusion and rotate_and_slice"}


@torch.no_grad()
def remeasure_latency(rows: list[dict], work: Path, rounds: int) -> None:
    """CPU latency of every row whose artifact is still in `work`, interleaved with its dense
    model round by round (one forward each per round, medians), so that drift and other load hit
    both sides alike. Updates the rows in place."""
    from compressor import api

    ids = torch.randint(10, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and _device(r) == "cpu" and r["method"] in METHODS
                and (work / f"{model}-{r['method']}-{r['config']['sparsity']}").is_dir()]
        if not mine:
            continue
        models = {"dense": api.load(model).model}
        models |= {id(r): api.load(work / f"{model}-{r['method']}-{r['config']['sparsity']}").model for r in mine}
        times = {k: [] for k in models}
        with bench_lock():
            for m in models.values():
                m(input_ids=ids, use_cache=False)
            for _ in range(rounds):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(input_ids=ids, use_cache=False)
                    times[k].append(time.perf_counter() - t0)
        dense = statistics.median(times["dense"])
        for r in mine:
            ms = statistics.median(times[id(r)])
            removed = 1 - r["flops_ratio"]
            r.update(latency_ms=1000 * ms, dense_latency_ms=1000 * dense, latency_ratio=ms / dense,
                     latency_vs_ideal=(1 - ms / dense) / removed if removed > 0 else None,
                     latency_protocol=f"interleaved with the dense model, median of {rounds} rounds")
        for r in rows:
            if r["model"] == model and r["method"] == "fp32" and _device(r) == "cpu":
                r["latency_ms"] = 1000 * dense
        del models


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _device(row: dict) -> str:
    return row.get("device", "cpu")


def notes(rows: list[dict]) -> list[str]:
    """What the tables alone do not say; figures only from the rows."""
    def find(model, method, device, **config):
        return next((r for r in rows if r["model"] == model and r["method"] == method and _device(r) == device
                     and all(r["config"].get(k) == v for k, v in config.items())), None)

    out = ["## Notes", ""]
    cpu, gpu = find("gemma3-270m", "fp32", "cpu"), find("gemma3-270m", "fp32", "cuda")
    if cpu and gpu:
        out.append(f"- gemma3-270m on the GPU: transformers there converts the Gemma 3 GGUF tokenizer differently, "
                   f"so the GPU run uses the config and tokenizer converted on the CPU machine; its fp32 ppl, "
                   f"{gpu['ppl']:.3f}, then equals the CPU's ({cpu['ppl']:.3f}).")
    gemma, smol = (find(m, "modegpt", "cpu", sparsity=0.25, modules="all") for m in ("gemma3-270m", "smollm2-135m"))
    if gemma and smol:
        out.append(f"- The gemma3-270m MoDeGPT CPU row ({gemma['wall_s']:.0f} s) predates block importance from "
                   f"32 samples; the smollm2 row ({smol['wall_s']:.0f} s) and every GPU row use it.")
    out += [
        "- CPU latency does not fall in proportion to FLOPs at this size: torch's CPU attention kernel takes the "
        "same time at MoDeGPT's reduced head widths, SliceGPT keeps every head and the MLP's elementwise work at "
        "full width, and the GEMMs alone scale with their FLOPs (profiled while developing; not in the results). "
        "MoDeGPT's reduced attention pads q/k or v to one width so the fused kernel runs at all.",
        "- Gemma 3's post-norms: SliceGPT on Gemma writes RMS probe channels (`--probe`) from o_proj and "
        "down_proj; every Gemma SliceGPT artifact is therefore the registered class (`--probe 0` refits the norms "
        "per channel instead and keeps an ordinary config for a global slice, far less accurately).",
        "- Global slicing of Gemma 3 is unusable (the table above), although the global basis keeps almost all "
        "of the energy at every residual point. Gemma's residual stream is dominated by a few massive channels, "
        "so energy-ranked PCA drops directions that carry little energy but much of what the normalized readers "
        "use. Reader-weighted or token-normalized covariances were tried (no consistent gain) and are not in "
        "the code.",
        "- Per-block SliceGPT *adds* parameters on small tied-embedding models at low sparsity, as the reference "
        "implementation does: the head is untied and each block gets two d x d shortcuts. `--embeddings keep` "
        "avoids the untying.",
        "",
    ]
    return out


def render(data: dict) -> str:
    """reports/slicing.md from the CPU results and, where present, the GPU quality grid."""
    rows = list(data["rows"])
    gpu = RESULTS / "slicing_cuda.json"
    if gpu.exists():
        rows += json.loads(gpu.read_text())["rows"]
    lines = [
        "# Structured slicing: SliceGPT and MoDeGPT",
        "",
        f"Generated by `python benchmarks/slicing.py` (last run {data['date']}, {data['machine']}). Perplexity: "
        "`windows` x 512 held-out wiki tokens (per row), no BOS; KL(base || model) per token "
        "on the same tokens. Calibration: wiki, 512-token windows, seed 0, samples per row. Prune wall time and "
        "latency are taken under the benchmark lock (`flock /tmp/compressor-bench.lock`), which other timed work "
        "also takes; untimed work (evaluation, development) may run beside them, so CPU figures carry some noise.",
        "",
        "Columns: `params` counts every stored weight (shortcut matrices and norm scales included); `ordinary` = the "
        "artifact is the original architecture with smaller widths (loads in plain transformers without compressor), "
        "otherwise the registered `compressor_sliced` class; `lat` = CPU forward latency of one 512-token sequence "
        "relative to the dense model (rows with `latency_protocol`: re-measured by `--latency-rounds`, interleaved "
        "with the dense model on the quiet machine; those figures supersede the first pass's 5-repeat medians); "
        "`flops` = forward FLOPs relative to dense (attention at the original q/k head width); `lat/ideal` = latency reduction over "
        "FLOPs reduction (target >= 0.8). `device`: cpu rows are timed runs on this machine; cuda rows are the "
        "quality grid run with `--device cuda` on the lent GPU (`benchmarks/results/slicing_cuda.json`), same "
        "protocol, their own fp32 row, wall time of the GPU run, no CPU latency.",
        "",
    ]
    order = {"fp32": 0, "slicegpt": 1, "peer:slicegpt:slice": 2, "slicegpt-global": 3, "modegpt": 4}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        bases = {_device(r): r for r in mrows if r["method"] == "fp32"}
        cells = []
        for r in sorted(mrows, key=lambda r: (_device(r), order.get(r["method"], 9), r["config"].get("modules", ""),
                                              r["config"].get("sparsity", 0))):
            base = bases.get(_device(r))
            c = r["config"]
            method = r["method"] + (f" ({c['modules']}, {c['allocation']})" if "modules" in c else "")
            method += " (embeddings kept)" if c.get("embeddings") == "keep" else ""
            dppl = 100 * (r["ppl"] / base["ppl"] - 1) if base and r.get("ppl") else None
            cells.append([_device(r), method, str(c.get("sparsity", "-")), str(c.get("calib_samples", "-")),
                          str(r.get("eval_windows", 64)), f"{r['params'] / 1e6:.2f}",
                          _f(r.get("param_reduction"), "{:.1%}"), "yes" if r.get("ordinary_config") else "-",
                          _f(r.get("ppl")), _f(dppl, "{:.1f}"), _f(r.get("kl"), "{:.4f}"),
                          _f(r.get("wall_s"), "{:.0f}"), _f(r.get("peak_rss_mb"), "{:.0f}"),
                          _f(r.get("latency_ratio")), _f(r.get("flops_ratio")),
                          _f(r.get("latency_vs_ideal"), "{:.2f}")])
        lines += [f"## {model}", ""]
        lines += table(["device", "method", "sparsity", "calib", "windows", "params (M)", "param reduction",
                        "ordinary", "ppl", "dppl %", "KL", "prune s", "peak RSS MB", "lat", "flops", "lat/ideal"],
                       cells)
        lines.append("")
    lines += targets(rows) + notes(rows)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """Each target from the CPU rows where they exist (timings need them), else the GPU grid."""
    out = ["## Targets", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        def pick(method, device=None, **kw):
            found = [r for r in rows if r["model"] == model and r["method"] == method
                     and all(r["config"].get(k) == v for k, v in kw.items()) and "embeddings" not in r["config"]
                     and (device is None or _device(r) == device)]
            return min(found, key=lambda r: _device(r) != "cpu", default=None)

        ours, peer = pick("slicegpt", sparsity=0.25), pick("peer:slicegpt:slice", sparsity=0.25)
        if ours and peer and peer["config"].get("calib_samples") == ours["config"].get("calib_samples"):
            diff = 100 * (ours["ppl"] / peer["ppl"] - 1)
            out.append(f"- {model}: SliceGPT 25% ppl {ours['ppl']:.3f} vs reference implementation "
                       f"{peer['ppl']:.3f} on the same model, calibration tokens and protocol: {diff:+.2f}% "
                       f"({'met' if diff <= 1 else 'missed'}, target: no worse than the reference +1%).")
        mode = pick("modegpt", sparsity=0.25, modules="all")
        if ours and mode:
            base = pick("fp32", device=_device(mode))
            same = pick("slicegpt", device=_device(mode), sparsity=0.25)
            d_s, d_m = same["ppl"] - base["ppl"], mode["ppl"] - base["ppl"]
            out.append(f"- {model} ({_device(mode)}): MoDeGPT at 25% of block parameters (whole-model reduction "
                       f"{mode['param_reduction']:.1%}) raises ppl by {d_m:.2f}, SliceGPT 25% by {d_s:.2f}: ratio "
                       f"{d_m / d_s:.2f} ({'met' if d_m <= 0.7 * d_s else 'missed'}, target <= 0.70).")
        for method in ("slicegpt", "slicegpt-global", "modegpt"):
            r = pick(method, device="cpu", sparsity=0.25, **({"modules": "all"} if method == "modegpt" else {}))
            if r:
                out.append(f"- {model}: {r['method']} 25% prune wall time {r['wall_s']:.0f} s on the CPU with "
                           f"{r['config'].get('calib_samples')} calibration samples "
                           f"({'met' if r['wall_s'] < 300 else 'missed'}, target < 300 s); latency reduction / "
                           f"FLOPs reduction {_f(r.get('latency_vs_ideal'), '{:.2f}')} (target >= 0.8).")
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--methods", default="slicegpt,slicegpt-global,modegpt")
    parser.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--peer", action="store_true", help="also run the reference implementation at 0.25")
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--reuse", action="store_true", help="reuse artifacts already in --work (no new timing)")
    parser.add_argument("--append", action="store_true", help="keep rows of earlier runs not measured now")
    parser.add_argument("--work", default=None)
    parser.add_argument("--device", default="cpu", help="cuda: the quality grid on a GPU (no CPU latency)")
    parser.add_argument("--latency-rounds", type=int, default=0,
                        help="only re-measure CPU latency of the artifacts in --work, interleaved with dense")
    args = report_cli(parser, "slicing", render)
    if args is None:
        return
    if args.latency_rounds:
        torch.set_num_threads(2)
        path = RESULTS / "slicing.json"
        data = read_results("slicing")
        remeasure_latency(data["rows"], Path(args.work or "."), args.latency_rounds)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(write_report("slicing", render(data)))
        return
    torch.set_num_threads(2)
    global LATENCY_REPEATS, DEVICE
    LATENCY_REPEATS = args.latency_repeats
    DEVICE = args.device
    work = Path(args.work or tempfile.mkdtemp(prefix="slicing-bench-"))
    path = RESULTS / ("slicing.json" if DEVICE == "cpu" else f"slicing_{DEVICE.split(':')[0]}.json")
    protocol = {"eval_windows": "per row (eval_windows; 64 unless the machine was too busy)", "window": 512, "calib_len": 512,
                "calib_samples": "per row (config.calib_samples)", "seed": 0,
                "timing": "wall time and peak RSS of whole `compress prune` processes under the shared benchmark "
                          "lock; latency: median of 5 forwards of one 512-token sequence, 2 threads",
                "flops": "2 x linear weights (incl. head, shortcuts) + causal attention at 512 tokens"}
    key = lambda r: (r["model"], r["method"], json.dumps(r["config"], sort_keys=True))  # noqa: E731
    rows: list[dict] = []
    for model in args.models.split(","):
        pruned = [prune_row(model, m, float(s), work, args.samples, args.reuse)
                  for s in args.sparsities.split(",") for m in args.methods.split(",")]
        q = quality(model, pruned, args.windows)
        rows += [q["base"], *pruned]
        if args.peer:
            peer = peer_row(model, 0.25, args.samples, args.windows, work)
            if peer:
                rows.append(peer)
        for r in rows:
            r.pop("artifact", None)
        fresh = {key(r) for r in rows}
        old = json.loads(path.read_text())["rows"] if args.append and path.exists() else []  # read now: runs overlap
        merged = [r for r in old if key(r) not in fresh] + rows  # written after each model: partial runs count
        where = f"{torch.cuda.get_device_name()} ({machine()})" if DEVICE.startswith("cuda") else machine()
        written = write_results("slicing", merged, protocol, {"machine": where, "device": DEVICE}, path=path)
        if DEVICE == "cpu":
            write_report("slicing", render(json.loads(written.read_text())))
    rows = merged
    print_table(rows, ["model", "method", "sparsity", "params", "ppl", "kl", "wall_s", "peak_rss_mb", "latency_ratio",
                       "flops_ratio"], "slicing")


if __name__ == "__main__":
    main()
