"""Issue-3 benchmark: post-training quantization of the reference model, against fp32 and RTN.

For each row, `compress quantize` runs in a fresh process (wall time and peak RSS of the whole
command; CPU seconds too, since these machines are shared); then every artifact and the fp32
model are evaluated together on the protocol's held-out windows, sharing one fp32 forward for
KL. Writes benchmarks/results/quantize.json and reports/quantize.md, merging (as their own sets)
the rows of quantize_variants.py run on a GPU or on the CPU at a reduced protocol (wiki and
Austen side by side) and of peer_gptq_cpu.py (CPU wall time against llm-compressor).

    python benchmarks/quantize.py                      # all rows
    python benchmarks/quantize.py --rows gptq-w4 --timing-repeats 3
    python benchmarks/quantize.py --report-only        # the report from the committed results
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (RESULTS, compress_json, evaluate, fmt, median, print_table, report_cli, table,  # noqa: E402
                    write_report, write_results)

MODEL = "smollm2-135m"
W4 = {"bits": 4, "group_size": 64, "sym": False}
W3 = {"bits": 3, "group_size": 64, "sym": False}
# name: (method, config for the results row, CLI flags)
ROWS = {
    "rtn-w4": ("rtn", W4, ["--bits", "4", "--group-size", "64", "--asym"]),
    "gptq-w4": ("gptq", {**W4, "act_order": True}, ["--bits", "4", "--group-size", "64", "--asym", "--act-order"]),
    "awq+gptq-w4": ("awq+gptq", {**W4, "act_order": True},
                    ["--bits", "4", "--group-size", "64", "--asym", "--act-order"]),
    "awq+rtn-w4": ("awq", W4, ["--bits", "4", "--group-size", "64", "--asym"]),
    "smoothquant+-w4": ("smoothquant+", W4, ["--bits", "4", "--group-size", "64", "--asym"]),
    "rtn-w3": ("rtn", W3, ["--bits", "3", "--group-size", "64", "--asym"]),
    "gptq-w3": ("gptq", {**W3, "act_order": True}, ["--bits", "3", "--group-size", "64", "--asym", "--act-order"]),
    "awq+gptq-w3": ("awq+gptq", {**W3, "act_order": True},
                    ["--bits", "3", "--group-size", "64", "--asym", "--act-order"]),
    "smoothquant": ("smoothquant", {"bits": 8, "act_bits": 8, "alpha": 0.75}, ["--alpha", "0.75"]),
    "fp8": ("fp8", {"bits": 8, "act_bits": 8}, []),
}
RESULT_NAMES = {"awq+rtn-w4": "awq+rtn"}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quantize(name: str, work: Path, repeats: int, reuse: bool) -> dict:
    method, _, flags = ROWS[name]
    timing_file = work / f"{name}.timing.json"
    if reuse and timing_file.is_file() and (work / name / "manifest.json").is_file():
        return json.loads(timing_file.read_text())
    runs = []
    for _ in range(repeats):
        cpu0 = _children_cpu_s()
        result = compress_json("quantize", MODEL, "--method", method, *flags, "-o", str(work / name),
                               "--overwrite", "--restart")
        runs.append((result["process_wall_s"], result["peak_rss_mb"], _children_cpu_s() - cpu0, result))
    walls = [r[0] for r in runs]
    timing = {"wall_s": round(median(walls), 1), "wall_runs_s": [round(w, 1) for w in walls],
              "cpu_s": round(median([r[2] for r in runs]), 1), "peak_rss_mb": round(max(r[1] for r in runs)),
              "bits_per_weight": runs[-1][3].get("bits_per_weight")}
    timing_file.write_text(json.dumps(timing))
    return timing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--timing-repeats", type=int, default=1, help="runs per quantize command (median)")
    parser.add_argument("--work", default="out/bench-quantize")
    parser.add_argument("--reuse", action="store_true", help="keep artifacts (and timings) of an earlier run")
    parser.add_argument("--gpu-rows", default=str(RESULTS / "quantize_variants_cuda.json"),
                        help="quality rows measured on a GPU by quantize_variants.py, merged into the results")
    parser.add_argument("--reduced-rows", default=str(RESULTS / "quantize_variants_cpu_reduced.json"),
                        help="rows of quantize_variants.py on the CPU at a reduced protocol, merged as their own set")
    parser.add_argument("--layer-rows", default=str(RESULTS / "quantize_layers.json"),
                        help="rows of quantize_layers.py (layer-level output error), merged as their own set")
    parser.add_argument("--size-rows", default=str(RESULTS / "quantize_sizes.json"),
                        help="artifact sizes of quantize_variants.py --no-eval (e.g. --keep-dtype), merged as their own set")
    parser.add_argument("--timing-rows", default=str(RESULTS / "quantize_peer_cpu.json"),
                        help="rows of peer_gptq_cpu.py (CPU wall time against llm-compressor), merged as their own set")
    args = report_cli(parser, "quantize", render, refresh=lambda data, args: {
        **data, "rows": [r for r in data["rows"] if r.get("device") != "cuda" and "set" not in r] + merged_rows(args)})
    if args is None:
        return
    work = Path(args.work)
    names = args.rows.split(",")
    timings = {}
    for name in names:
        print(f"quantizing {name} ...", flush=True)
        timings[name] = quantize(name, work, args.timing_repeats, args.reuse)
        print(json.dumps({name: timings[name]}), flush=True)
    started = time.perf_counter()
    results = evaluate(MODEL, {name: work / name for name in names}, args.windows)
    eval_s = time.perf_counter() - started
    base_ppl = results["base"]["ppl"]
    rows = [{"model": MODEL, "method": "fp32", "config": {}, "bits_per_weight": 32.0, "ppl": base_ppl, "kl": 0.0}]
    for name in names:
        method, config, _ = ROWS[name]
        r = results[name]
        size = sum(f.stat().st_size for f in (work / name).glob("*.safetensors"))
        rows.append({"model": MODEL, "method": RESULT_NAMES.get(name, method), "config": config, "row": name,
                     "size_bytes": size, "ppl": r["ppl"], "kl": r["kl"],
                     "ppl_increase_pct": 100 * (r["ppl"] / base_ppl - 1), **timings[name]})
    by_row = {r.get("row"): r for r in rows}
    for bits in (4, 3):
        rtn = by_row.get(f"rtn-w{bits}")
        for r in rows:
            if rtn and r.get("config", {}).get("bits") == bits and r is not rtn:
                r["fraction_of_rtn_increase"] = (r["ppl"] - base_ppl) / (rtn["ppl"] - base_ppl)
    rows += merged_rows(args)
    protocol = {"eval_windows": args.windows, "window": 512, "calib_samples": 128, "calib_len": 512}
    path = write_results("quantize", rows, protocol, {"eval_s": round(eval_s, 1),
                                                      "note": "shared 2-core CPU: wall_s vs cpu_s shows contention"})
    columns = ["row", "method", "bits_per_weight", "size_bytes", "ppl", "ppl_increase_pct",
               "fraction_of_rtn_increase", "kl", "wall_s", "cpu_s", "peak_rss_mb"]
    print_table(rows, columns, f"quantize: {MODEL}, {args.windows} × 512 held-out tokens")
    print(f"wrote {write_report('quantize', render(json.loads(path.read_text())))}")


def merged_rows(args: argparse.Namespace) -> list[dict]:
    """Rows measured by the other quantization scripts, each marked with where it comes from."""
    return (gpu_rows(Path(args.gpu_rows)) + gpu_rows(Path(args.reduced_rows), device="cpu", set_name="reduced")
            + set_rows(Path(args.timing_rows), "timing") + set_rows(Path(args.layer_rows), "layers")
            + set_rows(Path(args.size_rows), "sizes"))


def gpu_rows(path: Path, device: str = "cuda", set_name: str | None = None) -> list[dict]:
    """Rows of quantize_variants.py (its own protocol and fp32 row), marked with the device (cuda)
    or, for a CPU run at a reduced protocol, with `set` and that protocol. Out-of-domain columns
    (austen_ppl) get their increase and the fraction of HQQ's at the same bits."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    mark = {"device": device, **({"set": set_name, "protocol": data["protocol"]} if set_name else {})}
    out = [{"model": MODEL, "method": "fp32", "config": {}, "row": "fp32", **mark,
            "bits_per_weight": 32.0, "ppl": next(iter(rows.values()))["base_ppl"], "kl": 0.0}] if rows else []
    for name, r in rows.items():
        base = r["base_ppl"]
        row = {"model": MODEL, "method": r["method"], "config": r["config"], "row": name, **mark,
               "bits_per_weight": r["bits_per_weight"], "ppl": r["ppl"], "kl": r["kl"],
               "ppl_increase_pct": 100 * (r["ppl"] / base - 1), "wall_s": r["wall_s"]}
        bits = r["config"].get("bits")
        rtn = rows.get(f"rtn-w{bits}")
        if rtn and rtn is not r:
            row["fraction_of_rtn_increase"] = (r["ppl"] - base) / (rtn["ppl"] - base)
        if "austen_ppl" in r:
            ood = r["austen_base_ppl"]
            row.update(austen_ppl=r["austen_ppl"], austen_kl=r["austen_kl"],
                       austen_increase_pct=100 * (r["austen_ppl"] / ood - 1))
            if rtn and rtn is not r and "austen_ppl" in rtn:
                row["austen_fraction_of_rtn_increase"] = (r["austen_ppl"] - ood) / (rtn["austen_ppl"] - ood)
            # The stronger calibration-free baseline at these bits: our integer-zero HQQ or the
            # published float-zero algorithm (benchmarks/baselines.py, more bits).
            hqqs = [h for h in (rows.get(f"hqq-w{bits}"), rows.get(f"hqq-float-w{bits}"))
                    if h and h is not r and "austen_ppl" in h]
            if hqqs:
                hqq = min(hqqs, key=lambda h: h["austen_ppl"])
                row["austen_fraction_of_hqq_increase"] = (r["austen_ppl"] - ood) / (hqq["austen_ppl"] - ood)
                row["fraction_of_hqq_increase"] = (r["ppl"] - base) / (hqq["ppl"] - base)
                row["hqq_baseline"] = hqq["variant"]
        out.append(row)
    return out


def set_rows(path: Path, set_name: str) -> list[dict]:
    """Rows of another script's results (peer_gptq_cpu.py: "timing"; quantize_layers.py: "layers"),
    each marked with the set and that script's protocol."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [{**r, "set": set_name, "protocol": data["protocol"]} for r in data["rows"]]


def _pct(value: float) -> str:
    return f"+{value:.1f}%"


def render(data: dict) -> str:
    rows, protocol = data["rows"], data["protocol"]
    groups = ", ".join(str(g) for g in sorted({r["config"]["group_size"] for r in rows if "group_size" in r["config"]}))
    lines = ["# Post-training quantization of smollm2-135m", "",
             f"Generated by `python benchmarks/quantize.py` (quantize.json); perplexity over "
             f"{protocol['eval_windows']} × {protocol['window']} held-out wiki tokens, KL(fp32 ‖ model) per token, "
             f"calibration {protocol['calib_samples']} × {protocol['calib_len']} tokens. Group size {groups}, integer "
             "zero points. `of RTN` = the row's perplexity increase as a fraction of RTN's at the same bits.", ""]
    cpu = [r for r in rows if r.get("device") != "cuda" and "set" not in r]
    gpu = [r for r in rows if r.get("device") == "cuda"]
    reduced = [r for r in rows if r.get("set") == "reduced"]
    timing = [r for r in rows if r.get("set") == "timing"]
    layers = [r for r in rows if r.get("set") == "layers"]
    sizes = [r for r in rows if r.get("set") == "sizes"]
    lines += table(["row", "method", "bits/weight", "size", "ppl", "increase", "of RTN", "KL", "wall", "CPU",
                    "peak RSS"], [[
                        r.get("row", "fp32"), r["method"], str(r.get("bits_per_weight", "")),
                        fmt(r.get("size_bytes"), lambda v: f"{v / 1e6:.1f} MB"), f"{r['ppl']:.3f}",
                        fmt(r.get("ppl_increase_pct"), _pct),
                        fmt(r.get("fraction_of_rtn_increase"), lambda v: f"{100 * v:.0f}%"), f"{r['kl']:.4f}",
                        fmt(r.get("wall_s"), "{:.0f} s"), fmt(r.get("cpu_s"), "{:.0f} s"),
                        fmt(r.get("peak_rss_mb"), lambda v: f"{v / 1000:.2f} GB")] for r in cpu])
    if gpu:
        lines += ["", "## The same protocol on a GPU (quality only)", "",
                  f"The CPU rows above were measured on a shared machine ({data['machine']}) under heavy load; the "
                  "device lent for this session measured the rest of the grid (`python benchmarks/quantize_variants.py "
                  "--device cuda`, same model, data, windows and calibration; its own fp32 row). Wall times here are "
                  "GPU runs, not the CPU target.", ""]
        if any("austen_ppl" in r for r in gpu):
            lines += ["Out of domain beside it: Austen's held-out novel (`--texts wiki,austen`); `of HQQ` and `of "
                      "RTN` = the row's perplexity increase as a fraction of calibration-free HQQ's or RTN's at the "
                      "same bit width on that text; the HQQ is the stronger on Austen of ours (`hqq-w4`: integer zero "
                      "points, as our format stores them) and the published algorithm (`hqq-float-w4`: float16 zero "
                      "points, 4.5 bits, built dense by `benchmarks/baselines.py`) where both were measured. Rows "
                      "without Austen figures come from an earlier run of the script.", ""]
        lines += table(["row", "method", "bits/weight", "ppl", "increase", "of RTN", "KL", "Austen ppl", "increase",
                        "of RTN", "of HQQ", "wall (GPU)"], [[
            r["row"], r["method"], str(r["bits_per_weight"]), f"{r['ppl']:.3f}", fmt(r.get("ppl_increase_pct"), _pct),
            fmt(r.get("fraction_of_rtn_increase"), lambda v: f"{100 * v:.1f}%"), f"{r['kl']:.4f}",
            fmt(r.get("austen_ppl"), "{:.3f}"), fmt(r.get("austen_increase_pct"), _pct),
            fmt(r.get("austen_fraction_of_rtn_increase"), lambda v: f"{100 * v:.1f}%"),
            fmt(r.get("austen_fraction_of_hqq_increase"), lambda v: f"{100 * v:.1f}%"),
            fmt(r.get("wall_s"), "{:.0f} s")] for r in gpu])
    if reduced:
        p = reduced[0]["protocol"]
        lines += ["", "## Reduced protocol on the shared CPU: in domain and out of domain", "",
                  f"`python benchmarks/quantize_variants.py --samples {p['calib_samples']} --windows "
                  f"{p['eval_windows']} --texts {'wiki,austen' if any('austen_ppl' in r for r in reduced) else 'wiki'}` "
                  "on the shared 2-core CPU (heavily loaded by other jobs, "
                  f"so wall times are not comparable): calibration {p['calib_samples']} × {p['calib_len']} wiki tokens, "
                  f"{p['eval_windows']} × {p['window']} held-out tokens of wiki and of Austen (out of domain), its "
                  "own fp32 row. `of HQQ` = the row's perplexity increase as a fraction of calibration-free HQQ's at "
                  "the same bits; rows with `lowrank` count the bfloat16 factors in bits/weight.", ""]
        lines += table(["row", "method", "bits/weight", "wiki ppl", "increase", "of RTN", "of HQQ", "Austen ppl",
                        "increase", "of HQQ", "KL (wiki)"], [[
                            r["row"], r["method"], str(r["bits_per_weight"]), f"{r['ppl']:.3f}",
                            fmt(r.get("ppl_increase_pct"), _pct),
                            fmt(r.get("fraction_of_rtn_increase"), lambda v: f"{100 * v:.1f}%"),
                            fmt(r.get("fraction_of_hqq_increase"), lambda v: f"{100 * v:.1f}%"),
                            fmt(r.get("austen_ppl"), "{:.3f}"), fmt(r.get("austen_increase_pct"), _pct),
                            fmt(r.get("austen_fraction_of_hqq_increase"), lambda v: f"{100 * v:.1f}%"),
                            f"{r['kl']:.4f}"] for r in reduced])
    if timing:
        p = timing[0]["protocol"]
        lines += ["", "## CPU wall time against llm-compressor (same sitting)", "",
                  f"`python benchmarks/peer_gptq_cpu.py`: GPTQ W4 g64 asymmetric act-order, load to artifact, fresh "
                  f"processes ({p['order']}), {p['calib_samples']} × {p['calib_len']} calibration tokens, the same "
                  "windows for both; the machine is shared, so each run's 1-minute load average is shown.", ""]
        lines += table(["tool", "wall (median)", "CPU", "peak RSS", "ours / peer", "runs (wall @ load)"], [[
            r["method"], f"{r['wall_s']:.0f} s", f"{r['cpu_s']:.0f} s", f"{r['peak_rss_mb'] / 1000:.2f} GB",
            fmt(r.get("wall_vs_peer"), "{:.2f}×"),
            ", ".join(f"{x['wall_s']:.0f} s @ {x['load_before']:.0f}–{x['load_after']:.0f}" for x in r["runs"])]
            for r in timing])
    if layers:
        p = layers[0]["protocol"]
        rtn = {r["config"]["bits"]: r for r in layers if r["method"] == "rtn"}
        lines += ["", "## Layer-level output error, in domain and out of domain", "",
                  f"`python benchmarks/quantize_layers.py`: {len(p['linears'])} linears of the reference model "
                  f"({', '.join(p['linears'])}), quantized from the input second moment of {p['calib_samples']} × "
                  f"{p['calib_len']} calibration tokens; relative output error tr(E H Eᵀ)/tr(W H Wᵀ) (mean over the "
                  f"linears) under H of the calibration tokens, of {p['eval_windows']} × {p['window']} held-out wiki "
                  "tokens and of as many Austen tokens. A proxy, not perplexity; `of RTN` is the ratio to RTN's error "
                  "at the same integer bits on that text.", ""]

        def of_rtn(r, text):
            base = rtn.get(r["config"]["bits"])
            return None if base is None or base is r else r[f"rel_err_{text}"] / base[f"rel_err_{text}"]

        lines += table(["row", "bits/weight", "calib", "wiki", "of RTN", "Austen", "of RTN"], [[
            r["row"], str(r["bits_per_weight"]), f"{r['rel_err_calib']:.5f}", f"{r['rel_err_wiki']:.5f}",
            fmt(of_rtn(r, "wiki"), lambda v: f"{100 * v:.1f}%"), f"{r['rel_err_austen']:.5f}",
            fmt(of_rtn(r, "austen"), lambda v: f"{100 * v:.1f}%")] for r in layers])
    if sizes:
        lines += ["", "## Artifact size: unquantized tensors in the checkpoint's dtype or in bfloat16", "",
                  "`python benchmarks/quantize_variants.py --no-eval --variants rtn-w4,rtn-w4-keep-bf16`: the "
                  "same quantized linears; `--keep-dtype bfloat16` stores the embedding (tied head) and norms of "
                  "the fp32 reference model in bfloat16.", ""]
        lines += table(["row", "keep dtype", "bits/weight (linears)", "size"], [[
            r["variant"], r.get("keep_dtype", "source"), str(r["bits_per_weight"]),
            f"{r['size_bytes'] / 1e6:.1f} MB"] for r in sizes])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
