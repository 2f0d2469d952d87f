"""SmoothQuant W8A8 migration strength sweep on the reference model (how the default α was chosen).

Quantizes the model once per α (and once with smoothing switched off: plain W8A8 with per-channel
int8 weights and dynamic per-token int8 inputs), loads every artifact through our reader (which
simulates the input quantization exactly as compressed-tensors does), and evaluates them all with
one pass of the fp32 base for KL, on the protocol's held-out windows.

    python benchmarks/smoothquant_alpha.py --alphas 0.3 0.5 0.65 0.8 --windows 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compressor import api
from compressor.calib.data import evaluation_set
from compressor.evaluation.perplexity import evaluate_models
from compressor.methods.quant import smoothquant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.65, 0.8])
    parser.add_argument("--no-smoothing", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure W8A8 without smoothing")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("out/sq-alpha"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/smoothquant_alpha.json"))
    args = parser.parse_args()

    runs: dict[str, dict] = {}
    for alpha in args.alphas:
        runs[f"alpha={alpha}"] = {"alpha": alpha, "smoothing": True}
    if args.no_smoothing:
        runs["no smoothing"] = {"alpha": 0.5, "smoothing": False}
    fold = smoothquant.fold_smoothing
    for label, run in runs.items():
        out = args.work / label.replace("=", "").replace(" ", "-")
        smoothquant.fold_smoothing = fold if run["smoothing"] else (lambda *a, **k: None)
        try:
            summary = api.quantize(args.model, "smoothquant", out, {"alpha": run["alpha"]}, overwrite=True)
        finally:
            smoothquant.fold_smoothing = fold
        run.update(path=str(out), bits_per_weight=summary["bits_per_weight"], wall_s=round(summary["wall_s"], 1))
        print(label, "quantized in", run["wall_s"], "s", flush=True)

    base = api.load(args.model)
    tokens = evaluation_set("wiki", base.tokenizer, args.windows, 512)
    models = {label: api.load(run["path"]).model for label, run in runs.items()}
    started = time.perf_counter()
    results = evaluate_models(models, tokens, base.model, 4, "cpu", None)
    rows = [{"model": args.model, "method": "fp32", "config": {}, "ppl": results["base"]["ppl"]}]
    for label, run in runs.items():
        r = results[label]
        method = "smoothquant" if run["smoothing"] else "w8a8-no-smoothing"
        rows.append({"model": args.model, "method": method,
                     "config": {"bits": 8, "act_bits": 8, "alpha": run["alpha"] if run["smoothing"] else None},
                     "bits_per_weight": run["bits_per_weight"], "ppl": r["ppl"], "kl": r["kl"],
                     "ppl_increase_pct": round(100 * (r["ppl"] / results["base"]["ppl"] - 1), 3),
                     "wall_s": run["wall_s"]})
        print(f"{label:14s} ppl {r['ppl']:.4f}  (+{rows[-1]['ppl_increase_pct']:.2f}%)  KL {r['kl']:.5f}")
    print(f"fp32           ppl {results['base']['ppl']:.4f}  (eval {time.perf_counter() - started:.0f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "smoothquant_alpha", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": "shared 2-core CPU", "device": "cpu",
        "protocol": {"eval_windows": args.windows, "window": 512, "calib_samples": 128, "calib_len": 512},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
