"""W8A8 (SmoothQuant) and FP8 variants on the reference model, evaluated side by side.

Each variant is `LABEL=METHOD:JSON_OPTIONS`; the special option `"smoothing": false` measures plain
W8A8 (SmoothQuant with the smoothing step switched off). Every artifact is written with
`api.quantize` (128 × 512 calibration tokens unless --samples), loaded through our reader (which
simulates the input quantization exactly as compressed-tensors does), and all are evaluated in one
pass over the protocol's held-out windows with the fp32 base computed once for KL: the numbers are
those `compress eval ART --base MODEL` prints. An artifact already present under --work with the
same method settings is reused (`--reuse`).

    python benchmarks/w8a8_variants.py 'sq=smoothquant:{"alpha": 0.5}' 'fp8=fp8:{}' --windows 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, evaluate, write_results  # noqa: E402

from compressor import api  # noqa: E402
from compressor.formats.manifest import read_manifest  # noqa: E402
from compressor.methods.quant import smoothquant  # noqa: E402


def parse_variant(text: str) -> tuple[str, str, dict]:
    label, _, rest = text.partition("=")
    method, _, options = rest.partition(":")
    return label, method, json.loads(options or "{}")


def same_settings(recorded: dict, method) -> bool:
    """The recorded method settings are these (settings added since then at their defaults)."""
    now = method.describe()
    defaults = {k: f.default for k, f in type(method.config).model_fields.items()}
    return recorded["name"] == now["name"] and all(
        recorded["config"].get(k, defaults.get(k)) == v for k, v in now["config"].items())


def build(model: str, label: str, method: str, options: dict, work: Path, samples: int, reuse: bool) -> dict:
    out = work / label
    options = dict(options)
    smoothing = options.pop("smoothing", True)
    if reuse and (out / "manifest.json").exists():
        manifest = read_manifest(out)
        if same_settings(manifest["method"], api.make_method(method, options)) and \
                (manifest.get("calibration") or {}).get("samples", samples) == samples:
            return {"path": out, "bits_per_weight": manifest["metrics"]["bits_per_weight"],
                    "wall_s": None, "reused": True}
    fold = smoothquant.fold_smoothing
    smoothquant.fold_smoothing = fold if smoothing else (lambda *a, **k: None)
    try:
        summary = api.quantize(model, method, out, options, samples=samples, overwrite=True)
    finally:
        smoothquant.fold_smoothing = fold
    return {"path": out, "bits_per_weight": summary["bits_per_weight"], "wall_s": round(summary["wall_s"], 1),
            "peak_rss_mb": round(summary["peak_rss_mb"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='LABEL=METHOD:{"option": value}')
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("out/w8a8"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS / "w8a8_variants.json")
    args = parser.parse_args()

    built = {}
    for text in args.variants:
        label, method, options = parse_variant(text)
        built[label] = (method, options, build(args.model, label, method, options, args.work, args.samples,
                                               args.reuse))
        print(label, "built", built[label][2], flush=True)

    started = time.perf_counter()
    results = evaluate(args.model, {label: b[2]["path"] for label, b in built.items()}, args.windows)
    base_ppl = results["base"]["ppl"]
    rows = [{"model": args.model, "method": "fp32", "config": {}, "ppl": base_ppl}]
    for label, (method, options, info) in built.items():
        r = results[label]
        rows.append({"model": args.model, "label": label, "method": method,
                     "config": {"bits": 8, "act_bits": 8, **options},
                     "bits_per_weight": info["bits_per_weight"], "ppl": r["ppl"], "kl": r["kl"],
                     "ppl_increase_pct": round(100 * (r["ppl"] / base_ppl - 1), 3),
                     "wall_s": info.get("wall_s"), "peak_rss_mb": info.get("peak_rss_mb")})
        print(f"{label:20s} ppl {r['ppl']:.4f} (+{rows[-1]['ppl_increase_pct']:.2f}%)  KL {r['kl']:.5f}", flush=True)
    print(f"{'fp32':20s} ppl {base_ppl:.4f}   (eval {time.perf_counter() - started:.0f} s)")
    protocol = {"eval_windows": args.windows, "window": 512, "calib_samples": args.samples, "calib_len": 512}
    write_results("w8a8_variants", rows, protocol, {"note": "shared CPU: wall times are not comparable"},
                  path=args.json)


if __name__ == "__main__":
    main()
