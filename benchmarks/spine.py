"""Spine benchmark: fp32 vs RTN quality on the reference model, wall time and peak RSS of
`compress quantize` and `compress eval`, and pipeline peak RSS against the number of layers.

    python benchmarks/spine.py [--repeats 3] [--windows 64]

Writes benchmarks/results/spine.json and reports/spine.md (`--report-only`: the report alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (compress_json, evaluate, median, print_table, report_cli, table,  # noqa: E402
                    write_report, write_results)

MODEL = "smollm2-135m"
SCHEMES = [  # (bits, group_size, sym)
    (4, 64, False), (4, 64, True), (4, 32, False), (4, 32, True), (3, 64, False), (8, -1, True),
]


def quantize_rows(work: Path, repeats: int) -> list[dict]:
    rows = []
    for bits, group, sym in SCHEMES:
        out = work / f"rtn-w{bits}g{group}{'s' if sym else 'a'}"
        runs = []
        for _ in range(repeats):
            runs.append(compress_json("quantize", MODEL, "--method", "rtn", "--bits", str(bits), "--group-size",
                                      str(group), "--sym" if sym else "--asym", "-o", str(out), "--overwrite"))
        rows.append({
            "model": MODEL, "method": "rtn", "config": {"bits": bits, "group_size": group, "sym": sym},
            "artifact": str(out), "bits_per_weight": runs[-1]["bits_per_weight"],
            "size_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "wall_s": median([r["wall_s"] for r in runs]), "wall_s_runs": [r["wall_s"] for r in runs],
            "process_wall_s": median([r["process_wall_s"] for r in runs]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        })
    return rows


def quality(rows: list[dict], windows: int) -> dict:
    """Perplexity and KL of every artifact, sharing one base forward per batch."""
    results = evaluate(MODEL, {row["artifact"]: row["artifact"] for row in rows}, windows)
    for row in rows:
        row.update(ppl=results[row["artifact"]]["ppl"], kl=results[row["artifact"]]["kl"])
    base = results["loaded_base"]
    return {"ppl": results["base"]["ppl"], "tokens": results["base"]["tokens"], "data_sha256": results["tokens"].sha256,
            "size_bytes": sum(f.stat().st_size for f in base.path.glob("*.safetensors")),
            "params": sum(p.numel() for p in base.model.parameters())}


def eval_timing(artifact: str, repeats: int, windows: int) -> dict:
    runs = [compress_json("eval", artifact, "--base", MODEL, "--windows", str(windows)) for _ in range(repeats)]
    return {"wall_s": median([r["wall_s"] for r in runs]), "wall_s_runs": [r["wall_s"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "ppl": runs[-1]["ppl"], "kl": runs[-1]["kl"]}


def truncated_model(work: Path, layers: int) -> Path:
    """The reference model cut to its first `layers` blocks, as an HF directory."""
    from safetensors.torch import load_file, save_file

    from compressor.models.loading import resolve_model_path

    source = resolve_model_path(MODEL)
    target = work / f"{MODEL}-{layers}L"
    if target.exists():
        return target
    target.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, target / f.name)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(source / "model.safetensors")
    keep = {k: v for k, v in state.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def memory_rows(work: Path, repeats: int) -> list[dict]:
    """Peak RSS of quantize vs depth, for RTN and for the calibrated engine (hidden states, Hessians)."""
    rows = []
    tests_dir = str(Path(__file__).resolve().parent.parent / "tests")
    for layers in (8, 16, 30):
        model = truncated_model(work, layers)
        weights_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        for engine in ("rtn", "calibrated"):
            runs = []
            for _ in range(repeats):
                out = work / f"mem-{layers}-{engine}"
                if engine == "rtn":
                    runs.append(compress_json("quantize", str(model), "--method", "rtn", "--bits", "4",
                                              "--group-size", "64", "-o", str(out), "--overwrite"))
                else:
                    runs.append(_calibrated_run(tests_dir, model, out))
            peak = median([r["peak_rss_mb"] for r in runs])
            rows.append({"model": f"{MODEL}[:{layers}]", "method": "rtn",
                         "config": {"bits": 4, "group_size": 64, "layers": layers, "engine": engine,
                                    "calib_samples": 128, "calib_len": 512} if engine == "calibrated" else
                         {"bits": 4, "group_size": 64, "layers": layers, "engine": engine},
                         "weights_mb": round(weights_mb, 1), "peak_rss_mb": peak,
                         "overhead_mb": round(peak - weights_mb, 1), "wall_s": median([r["wall_s"] for r in runs])})
    return rows


def _calibrated_run(tests_dir: str, model: Path, out: Path) -> dict:
    """The calibrated engine needs a method that asks for statistics; the test suite's
    statistics-recording RTN is that method (Hessian, abs-max and mean of every input)."""
    import subprocess

    code = (f"import sys, json; sys.path.insert(0, {tests_dir!r}); import recording_method; "
            "recording_method.register(); recording_method.StatsRTN.seen = None\n"
            "from compressor import api\n"
            f"r = api.quantize({str(model)!r}, recording_method.NAME, {str(out)!r}, "
            "{'bits': 4, 'group_size': 64}, overwrite=True)\n"
            "print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = report_cli(parser, "spine", render)
    if args is None:
        return
    torch.set_num_threads(torch.get_num_threads())
    work = args.work or Path(tempfile.mkdtemp(prefix="spine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    compress_json("assets", "fetch", MODEL, "wiki")

    rows = quantize_rows(work, args.repeats)
    base = quality(rows, args.windows)
    fp32 = {"model": MODEL, "method": "fp32", "config": {}, "bits_per_weight": 32.0, "size_bytes": base["size_bytes"],
            "ppl": base["ppl"], "kl": 0.0, "wall_s": 0.0, "peak_rss_mb": 0.0}
    for row in rows:
        row["ppl_increase_pct"] = round(100 * (row["ppl"] / base["ppl"] - 1), 2)
    timing = eval_timing(rows[0]["artifact"], args.repeats, args.windows)
    memory = memory_rows(work, 1)
    for row in rows:
        row.pop("artifact")
    all_rows = [fp32, *rows, *memory]
    protocol = {"eval_windows": args.windows, "window": 512, "eval_tokens": base["tokens"],
                "eval_data_sha256": base["data_sha256"], "repeats": args.repeats,
                "timing": "median wall time of whole `compress` processes; peak RSS of the process"}
    path = write_results("spine", all_rows, protocol, {
        "eval_command": {"model": "rtn w4 g64 asym", **timing},
        "notes": "RTN needs no calibration. Memory rows: peak RSS of `compress quantize` on the reference model "
                 "truncated to 8/16/30 layers; overhead_mb = peak RSS - weights on disk.",
    })
    print_table([fp32, *rows], ["method", "bits", "group_size", "sym", "bits_per_weight", "size_bytes", "ppl",
                                "ppl_increase_pct", "kl", "wall_s", "peak_rss_mb"], "quality and quantize cost")
    print_table(memory, ["model", "engine", "layers", "weights_mb", "peak_rss_mb", "overhead_mb", "wall_s"],
                "peak RSS vs depth")
    print(f"eval command (64 windows, with base for KL): median {timing['wall_s']:.1f} s, peak RSS "
          f"{timing['peak_rss_mb']:.0f} MB")
    report = write_report("spine", render(json.loads(path.read_text())))
    print(f"wrote {path} and {report}")


def render(data: dict) -> str:
    """reports/spine.md from the results JSON."""
    rows = [r for r in data["rows"] if "layers" not in r["config"]]
    memory = [r for r in data["rows"] if "layers" in r["config"]]
    lines = [
        "# Spine benchmark: RTN on smollm2-135m",
        "",
        f"Generated by `python benchmarks/spine.py` on {data['date']} ({data['machine']}). "
        f"Perplexity protocol: {data['protocol']['eval_windows']} windows × {data['protocol']['window']} held-out "
        f"wiki tokens, no BOS; KL(base ‖ model) per token on the same tokens. Timings are medians of "
        f"{data['protocol']['repeats']} whole `compress quantize` processes.",
        "",
    ]
    lines += table(["method", "bits", "group", "sym", "bits/weight", "size (MB)", "ppl", "Δppl %", "KL", "quantize s",
                    "peak RSS MB"], [[
                        r["method"], str(r["config"].get("bits", 32)), str(r["config"].get("group_size", "-")),
                        str(r["config"].get("sym", "-")), f"{r['bits_per_weight']:.3f}", f"{r['size_bytes'] / 1e6:.1f}",
                        f"{r['ppl']:.3f}", f"{r.get('ppl_increase_pct', 0):.1f}", f"{r['kl']:.4f}",
                        f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}"] for r in rows])
    e = data["eval_command"]
    layers = sorted({r["config"]["layers"] for r in memory})
    calibrated = next((r["config"] for r in memory if r["config"]["engine"] == "calibrated"), {})
    lines += [
        "",
        f"`compress eval` (RTN W4 g64 artifact with `--base`, both models forward on every window): median "
        f"{e['wall_s']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB.",
        "",
        "## Peak memory against depth",
        "",
        f"The reference model cut to its first {', '.join(map(str, layers[:-1]))} and {layers[-1]} blocks. `rtn` "
        "needs no calibration; `calibrated` runs the engine with a statistics-collecting method (Hessian, abs-max "
        f"and mean of every linear input; {calibrated.get('calib_samples')} × {calibrated.get('calib_len')} "
        "calibration tokens, hidden states propagated block to block).",
        "",
    ]
    lines += table(["layers", "engine", "weights MB", "peak RSS MB", "peak − weights MB", "wall s"], [[
        str(r["config"]["layers"]), r["config"]["engine"], f"{r['weights_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
        f"{r['overhead_mb']:.0f}", f"{r['wall_s']:.1f}"] for r in memory])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
