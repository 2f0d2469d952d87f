"""Quality of weight-only quantization variants on the reference model, one process, any device.

Used to explore settings quickly (on a GPU where one is lent); the figures we publish come from
`benchmarks/quantize.py` on the CPU protocol. Writes results/quantize_variants_<device>.json.

    python benchmarks/quantize_variants.py --device cuda --variants gptq-w4,awq+gptq-w4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BASELINES  # noqa: E402
from common import RESULTS, evaluate, write_results  # noqa: E402

W4 = {"bits": 4, "group_size": 64, "sym": False}
W3 = {"bits": 3, "group_size": 64, "sym": False}
VARIANTS = {  # GPTQ defaults: static groups, Hessian-weighted MSE clipping
    "rtn-w4": ("rtn", W4),
    "gptq-w4-minmax": ("gptq", {**W4, "act_order": True, "mse_clip": False}),
    "gptq-w4": ("gptq", {**W4, "act_order": True}),
    "gptq-w4-fp": ("gptq", {**W4, "act_order": True, "fp_target": True}),
    "gptq-w4-natural": ("gptq", {**W4, "static_groups": False}),
    "awq-w4": ("awq", W4),
    "awq+gptq-w4": ("awq+gptq", {**W4, "act_order": True}),
    "awq+gptq-w4-fp": ("awq+gptq", {**W4, "act_order": True, "fp_target": True}),
    "smoothquant+-w4": ("smoothquant+", W4),
    "rtn-w3": ("rtn", W3),
    "gptq-w3": ("gptq", {**W3, "act_order": True}),
    "gptq-w3-fp": ("gptq", {**W3, "act_order": True, "fp_target": True}),
    "awq+gptq-w3": ("awq+gptq", {**W3, "act_order": True}),
    "awq+gptq-w3-fp": ("awq+gptq", {**W3, "act_order": True, "fp_target": True}),
    "hqq-w4": ("hqq", W4),
    "gptq-w4-sym": ("gptq", {**W4, "sym": True, "act_order": True}),
    "awq+gptq-w4-sym": ("awq+gptq", {**W4, "sym": True, "act_order": True}),
    "gptq-w4-damp0.1": ("gptq", {**W4, "act_order": True, "damp": 0.1}),
    "awq+gptq-w4-damp0.1": ("awq+gptq", {**W4, "act_order": True, "damp": 0.1}),
    "gptq-w4-damp0.03": ("gptq", {**W4, "act_order": True, "damp": 0.03}),
    "gptq-w4-damp0.3": ("gptq", {**W4, "act_order": True, "damp": 0.3}),
    "awq+gptq-w4-damp0.3": ("awq+gptq", {**W4, "act_order": True, "damp": 0.3}),
    "awq+gptq-w4-s128": ("awq+gptq", {**W4, "act_order": True, "search_samples": 128}),
    "awq+gptq-w4-grid40": ("awq+gptq", {**W4, "act_order": True, "grid": 40}),
    "gptq-w3-r8": ("gptq", {**W3, "act_order": True, "lowrank": 8}),
    "gptq-w3-r16": ("gptq", {**W3, "act_order": True, "lowrank": 16}),
    "gptq-w3-r32": ("gptq", {**W3, "act_order": True, "lowrank": 32}),
    "gptq-w3-g32": ("gptq", {**W3, "group_size": 32, "act_order": True}),
    "rtn-w4-keep-bf16": ("rtn", W4, {"keep_dtype": "bfloat16"}),
    "fp8": ("fp8", {}),
    "fp8-gptq": ("fp8", {"gptq": True}),
    "smoothquant+fp8": ("smoothquant,fp8", {"alpha": 0.5}),
    "smoothquant+fp8-gptq": ("smoothquant,fp8", {"alpha": 0.5, "gptq": True}),
}


def main() -> None:
    from compressor import api
    from compressor.models.loading import parse_dtype

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join([*VARIANTS, *BASELINES])}")
    parser.add_argument("--work", default="out/variants")
    parser.add_argument("--results", default=None)
    parser.add_argument("--reuse", action="store_true", help="keep artifacts built by an earlier (or parallel) run")
    parser.add_argument("--no-eval", action="store_true", help="only build the artifacts (evaluate later with --reuse)")
    parser.add_argument("--texts", default="wiki", help="held-out texts, comma-separated (wiki, austen)")
    args = parser.parse_args()
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS and n not in BASELINES]
    if unknown:
        parser.error(f"unknown variant {unknown[0]}: use one of {', '.join([*VARIANTS, *BASELINES])}")
    path = Path(args.results or RESULTS / f"quantize_variants_{args.device.split(':')[0]}.json")
    built = {}
    for name in args.variants.split(","):
        if name in BASELINES:
            info = Path(args.work) / f"{name}.json"
            if not (args.reuse and info.is_file()):
                started = time.perf_counter()
                record = BASELINES[name][2](args.model, Path(args.work) / name, **BASELINES[name][1], device=args.device)
                info.write_text(json.dumps({**record, "wall_s": round(time.perf_counter() - started, 1)}))
            built[name] = json.loads(info.read_text())
            continue
        method, options, *settings = VARIANTS[name]
        settings = {k: parse_dtype(v) if k == "keep_dtype" else v for k, v in (settings[0] if settings else {}).items()}
        info = Path(args.work) / f"{name}.json"
        if args.reuse and info.is_file():
            built[name] = json.loads(info.read_text())
            continue
        started = time.perf_counter()
        q = api.quantize(args.model, method, Path(args.work) / name, options, device=args.device, overwrite=True,
                         restart=True, progress=None, samples=args.samples, **settings)
        built[name] = {"bits_per_weight": q["bits_per_weight"], "wall_s": round(time.perf_counter() - started, 1),
                       "size_bytes": sum(f.stat().st_size for f in (Path(args.work) / name).glob("*.safetensors"))}
        info.write_text(json.dumps(built[name]))
        print(json.dumps({name: built[name]}), flush=True)
    if args.no_eval:  # sizes only
        rows = [{"variant": name, "method": spec(name)[0], "config": spec(name)[1], **info,
                 **(spec(name)[2] if len(spec(name)) > 2 else {})} for name, info in built.items()]
        print(f"wrote {write_results('quantize_variants', rows, {'calib_samples': args.samples}, path=path)}")
        return
    texts = args.texts.split(",")
    results = {text: evaluate(args.model, {name: Path(args.work) / name for name in built}, args.windows,
                              device=args.device, text=text) for text in texts}
    wiki = results[texts[0]]
    rows = [{"variant": name, "method": spec(name)[0], "config": spec(name)[1], "ppl": wiki[name]["ppl"],
             "kl": wiki[name]["kl"], "base_ppl": wiki["base"]["ppl"], **info,
             **{key: value for text in texts[1:] for key, value in (
                 (f"{text}_ppl", results[text][name]["ppl"]), (f"{text}_kl", results[text][name]["kl"]),
                 (f"{text}_base_ppl", results[text]["base"]["ppl"]))}}
            for name, info in built.items()]
    protocol = {"eval_windows": args.windows, "window": 512, "calib_samples": args.samples, "calib_len": 512}
    rows += earlier_rows(path, {row["variant"] for row in rows}, protocol)
    print(f"wrote {write_results('quantize_variants', rows, protocol, {'device': args.device}, path=path)}")


def spec(name: str) -> tuple:
    """(method, options[, settings]) of a variant or a baseline."""
    return VARIANTS[name] if name in VARIANTS else BASELINES[name][:2]


def earlier_rows(path: Path, measured: set[str], protocol: dict) -> list[dict]:
    """The rows of the results file this run replaces whose variants it did not measure (same protocol only)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("protocol") != protocol:
        return []
    when = data.get("date", "an earlier run")
    return [{**row, "measured": row.get("measured", when)} for row in data["rows"] if row["variant"] not in measured]


if __name__ == "__main__":
    main()
