"""Issue-15 benchmark: Hessian-guided mixed precision against uniform RTN, GPTQ and AWQ+GPTQ.

Every artifact is built by `compress quantize` in a fresh process (wall and CPU seconds, peak RSS):
uniform rows at 2/3/4/8 bits (group size 64, integer zero points, act-order for GPTQ), mixed rows
at 2.5/3.0/3.25/3.5/4.0 bits and at uniform W3's own bits, on GPTQ and on AWQ+GPTQ. The first mixed
build of each base runs the sensitivity pass (the whole search's time), the others reuse it (a
second budget's time). Then every artifact and the fp32 model are evaluated together on the
held-out wiki windows and on Austen's novels (out of domain), sharing each fp32 forward for KL.

The score check: at least 30 random mixed assignments, each measured (KL on held-out wiki windows,
from the sensitivity pass's own candidates), ranked against the plain Hessian prediction and the
prediction augmented with the probed inter-block dependencies (Spearman).

    python benchmarks/mixed.py                          # smollm2-135m, everything
    python benchmarks/mixed.py --model gemma3-270m --bases gptq --uniform gptq --targets 3.25,3.5
    python benchmarks/mixed.py --report-only            # reports/mixed.md and the Pareto plot

Writes benchmarks/results/mixed.json (rows of every model measured so far) and reports/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, compress_json, print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "mixed.md"
PLOT = ROOT / "reports" / "mixed-pareto.png"
RESULTS_FILE = RESULTS / "mixed.json"
TARGETS = (2.5, 3.0, 3.25, 3.5, 4.0)
UNIFORM_BITS = (2, 3, 4, 8)
GROUP = 64
CALIB = {"calib_samples": 128, "calib_len": 512}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def build(name: str, args: list[str], work: Path, reuse: bool) -> dict:
    """Run one `compress quantize` (or reuse its recorded run), timed."""
    record = work / f"{name}.run.json"
    if reuse and record.is_file() and (work / name / "manifest.json").is_file():
        return json.loads(record.read_text())
    cpu, load = _cpu(), _load_average()
    result = compress_json("quantize", *args, "-o", str(work / name), "--overwrite")
    run = {"wall_s": round(result["process_wall_s"], 1), "cpu_s": round(_cpu() - cpu, 1),
           "peak_rss_mb": round(result["peak_rss_mb"]), "load_average": load,
           "bits_per_weight": result.get("bits_per_weight"), "mixed": result.get("mixed"),
           "timings": result.get("timings")}
    record.write_text(json.dumps(run, indent=1))
    return run


def uniform_rows(model: str, work: Path, methods: list[str], reuse: bool) -> list[tuple[str, dict, dict]]:
    out = []
    for method in methods:
        for bits in UNIFORM_BITS:
            config = {"bits": bits, "group_size": GROUP, "sym": False}
            flags = ["--bits", str(bits), "--group-size", str(GROUP), "--asym"]
            if method != "rtn":
                config["act_order"] = True
                flags.append("--act-order")
            name = f"{method}-w{bits}"
            print(f"building {name}", flush=True)
            out.append((name, {"method": method, "config": config}, build(name, [model, "--method", method, *flags],
                                                                           work, reuse)))
    return out


def mixed_rows(model: str, work: Path, bases: list[str], targets: list[float], reuse: bool,
               ) -> list[tuple[str, dict, dict]]:
    out = []
    for base in bases:
        sensitivity = work / f"sensitivity-{base}"
        for target in targets:
            name = f"mixed-{base}-{target:g}"
            print(f"building {name}", flush=True)
            run = build(name, [model, "--method", base, "--mixed", "--target-bits", f"{target:g}", "--asym",
                               "--act-order", "--sensitivity", str(sensitivity)], work, reuse)
            out.append((name, {"method": "mixed", "config": {"target_bits": target, "base_method": base,
                                                            "group_size": "mixed", "act_order": True}}, run))
    return out


def evaluate(model: str, work: Path, names: list[str], data: str, windows: int) -> dict:
    """ppl and KL of fp32 and every artifact on `windows` windows of `data`, in groups that fit in memory."""
    from compressor import api
    from compressor.calib.data import evaluation_set
    from compressor.evaluation.perplexity import evaluate_models

    base = api.load(model)
    tokens = evaluation_set(data, base.tokenizer, windows, 512)
    results = {}
    for start in range(0, len(names), 4):
        group = {n: api.load(work / n).model for n in names[start:start + 4]}
        measured = evaluate_models(group, tokens, base.model, batch_size=2)
        results.update({n: measured[n] for n in group})
        results["fp32"] = measured["base"]
        del group
    return results


def score_correlation(model: str, sensitivity: Path, assignments: int, windows: int, seed: int = 0) -> dict:
    """Spearman correlation of the plain and the augmented predictions with measured KL over random
    mixed assignments (each linear's candidate from the pass), on held-out wiki windows."""
    from scipy.stats import spearmanr

    from compressor import api
    from compressor.calib.data import evaluation_set
    from compressor.mixed.driver import predictor_for
    from compressor.mixed.probes import KLProbe
    from compressor.mixed.search import average_bits
    from compressor.mixed.sensitivity import CandidateWeights, SensitivityTable

    table = SensitivityTable.load(sensitivity)
    loaded = api.load(model)
    weights = CandidateWeights(sensitivity, table, keep_blocks=table.blocks)
    for index, block in enumerate(loaded.adapter.blocks(loaded.model)):
        block.load_state_dict(weights.block(index)[0], strict=True)
    tokens = evaluation_set("wiki", loaded.tokenizer, windows, 512)
    probe = KLProbe(loaded.model, loaded.adapter, tokens.input_ids, batch_size=2, cache_inputs=False)
    plain, augmented = predictor_for(table, augmented=False), predictor_for(table)
    rng = random.Random(seed)
    rows = []
    for number in range(assignments):
        # Each assignment draws its own mix of bit widths (a Dirichlet over 2/3/4/8), so the set
        # spans budgets from about 2.5 to 6 bits; every linear then draws its format from that mix.
        mix = [rng.gammavariate(1.0, 1.0) for _ in range(4)]
        plan = {}
        for linear in table.linears:
            by_bits = {}
            for f in linear.scores:
                by_bits.setdefault(16 if f == "fp16" else int(f[3]), []).append(f)
            widths = [b for b in (2, 3, 4, 8) if b in by_bits]
            bits = rng.choices(widths, [mix[(2, 3, 4, 8).index(b)] for b in widths])[0]
            plan[linear.name] = rng.choice(sorted(by_bits[bits]))
        measured = probe.measure({n: weights(n, f) for n, f in plan.items()})
        rows.append({"bits_per_weight": average_bits(table, plan), "measured_kl": measured["kl"],
                     "plain": plain.plain(plan), "augmented": augmented.augmented(plan)})
        print(f"assignment {number + 1}/{assignments}: {rows[-1]['bits_per_weight']:.3f} bits, "
              f"KL {measured['kl']:.4f}", flush=True)
    kl = [r["measured_kl"] for r in rows]
    near = [r for r in rows if 3.0 <= r["bits_per_weight"] <= 4.5]
    return {"assignments": rows, "spearman_plain": spearmanr([r["plain"] for r in rows], kl).statistic,
            "spearman_augmented": spearmanr([r["augmented"] for r in rows], kl).statistic,
            "spearman_plain_3_to_4.5_bits": spearmanr([r["plain"] for r in near], [r["measured_kl"] for r in near]).statistic
            if len(near) > 2 else None,
            "spearman_augmented_3_to_4.5_bits": spearmanr([r["augmented"] for r in near],
                                                          [r["measured_kl"] for r in near]).statistic
            if len(near) > 2 else None,
            "eval_windows": windows, "data": tokens.describe()}


def run(args) -> None:
    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    built = uniform_rows(args.model, work, args.uniform, args.reuse)
    targets = sorted(set(args.targets) | ({_w3_bits(work)} if (work / "gptq-w3").is_dir() else set()))
    built += mixed_rows(args.model, work, args.bases, targets, args.reuse)
    names = [n for n, _, _ in built]
    print("evaluating on wiki", flush=True)
    wiki = evaluate(args.model, work, names, "wiki", args.windows)
    print("evaluating on austen", flush=True)
    austen = evaluate(args.model, work, names, args.austen, args.ood_windows)
    rows = [{"model": args.model, "method": "fp32", "config": {}, "bits_per_weight": 32.0,
             "ppl": wiki["fp32"]["ppl"], "kl": 0.0, "ppl_austen": austen["fp32"]["ppl"], "kl_austen": 0.0}]
    for name, identity, timing in built:
        rows.append({"model": args.model, **identity, "bits_per_weight": timing["bits_per_weight"],
                     "size_bytes": sum(f.stat().st_size for f in (work / name).glob("*.safetensors")),
                     "ppl": wiki[name]["ppl"], "kl": wiki[name]["kl"], "ppl_austen": austen[name]["ppl"],
                     "kl_austen": austen[name]["kl"], "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"],
                     "peak_rss_mb": timing["peak_rss_mb"], "load_average": timing["load_average"],
                     **({"search": _search_summary(timing)} if timing.get("mixed") else {})})
    if args.assignments:
        scores = score_correlation(args.model, work / f"sensitivity-{args.bases[0]}", args.assignments,
                                   args.score_windows)
        rows.append({"model": args.model, "method": "mixed-scores", "config": {"base_method": args.bases[0]},
                     **scores})
    existing = json.loads(RESULTS_FILE.read_text())["rows"] if RESULTS_FILE.is_file() else []
    rows = [r for r in existing if r["model"] != args.model] + rows
    write_results("mixed", rows, {"eval_windows": args.windows, "window": 512, "ood_windows": args.ood_windows,
                                  **CALIB, "eval_data": "wiki:eval", "ood_data": "austen (eval split)"},
                  path=RESULTS_FILE)
    print_table([r for r in rows if r["model"] == args.model and r["method"] != "mixed-scores"],
                ["method", "bits_per_weight", "ppl", "kl", "ppl_austen", "wall_s"], f"mixed precision, {args.model}")
    report()


def _w3_bits(work: Path) -> float:
    """Uniform W3 g64 GPTQ's own bits per weight: the budget of the issue's second target."""
    return round(json.loads((work / "gptq-w3" / "manifest.json").read_text())["metrics"]["bits_per_weight"], 4)


def _search_summary(timing: dict) -> dict:
    mixed, timings = timing["mixed"], timing.get("timings") or {}
    return {"predicted_kl": mixed["predicted_kl"], "verify_kl": mixed["measured"]["kl"],
            "verify_ppl_increase": mixed["measured"]["ppl_increase"], "formats": mixed["formats"],
            "timings": timings}


# ---------------------------------------------------------------- the report

def report() -> None:
    data = json.loads(RESULTS_FILE.read_text())
    lines = ["# Mixed precision (issue 15)", "",
             f"Written by `benchmarks/mixed.py` from `benchmarks/results/mixed.json` ({data['date']}, "
             f"{data['machine']}). Group size 64 and integer zero points for uniform rows; mixed rows choose "
             "int2/3/4/8 at group 32/64/128 or 16 bits per linear; bits per weight count scales and zero points. "
             f"Perplexity and KL on {data['protocol']['eval_windows']} held-out wiki windows and "
             f"{data['protocol']['ood_windows']} windows of Austen (out of domain).", "",
             f"![Pareto]({PLOT.name})", ""]
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["model"] == model]
        lines += [f"## {model}", "", "| method | base | bits/weight | ppl | KL | ppl Austen | KL Austen | wall s | CPU s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["method"] == "mixed-scores":
                continue
            label = r["method"] + (f" {r['config']['target_bits']:g}" if r["method"] == "mixed" else
                                   f" W{r['config']['bits']}" if "bits" in r["config"] else "")
            lines.append(f"| {label} | {r['config'].get('base_method', '')} | {r['bits_per_weight']:.3f} | "
                         f"{r['ppl']:.2f} | {r['kl']:.3f} | {r['ppl_austen']:.2f} | {r['kl_austen']:.3f} | "
                         f"{r.get('wall_s', '')} | {r.get('cpu_s', '')} |")
        scores = next((r for r in rows if r["method"] == "mixed-scores"), None)
        if scores:
            lines += ["", f"Rank correlation with measured KL over {len(scores['assignments'])} random mixed "
                          f"assignments ({scores['eval_windows']} held-out wiki windows): plain Hessian "
                          f"{scores['spearman_plain']:.3f}, augmented {scores['spearman_augmented']:.3f}; "
                          f"between 3 and 4.5 bits: {_fmt(scores['spearman_plain_3_to_4.5_bits'])} and "
                          f"{_fmt(scores['spearman_augmented_3_to_4.5_bits'])}."]
        lines.append("")
    REPORT.write_text("\n".join(lines))
    PLOT.write_bytes(pareto(data["rows"]))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pareto(rows: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False, dpi=100)
    styles = {"rtn": ("#9aa5b1", "s"), "gptq": ("#1f77b4", "o"), "awq+gptq": ("#2ca02c", "^"),
              "mixed:gptq": ("#d62728", "*"), "mixed:awq+gptq": ("#9467bd", "P")}
    for (ax_ppl, ax_kl), model in zip(axes, models):
        points = [r for r in rows if r["model"] == model and r["method"] not in ("fp32", "mixed-scores")]
        fp32 = next(r for r in rows if r["model"] == model and r["method"] == "fp32")
        for key, (color, marker) in styles.items():
            series = sorted((r for r in points if (r["method"] if r["method"] != "mixed" else
                                                   f"mixed:{r['config']['base_method']}") == key),
                            key=lambda r: r["bits_per_weight"])
            if not series:
                continue
            for ax, metric in ((ax_ppl, "ppl"), (ax_kl, "kl")):
                ax.plot([r["bits_per_weight"] for r in series], [r[metric] for r in series], marker=marker,
                        color=color, label=key.replace("mixed:", "mixed on "), linewidth=1, markersize=7)
        ax_ppl.axhline(fp32["ppl"], color="#444", linestyle=":", linewidth=1, label="fp32")
        for ax, label in ((ax_ppl, "perplexity (wiki held out)"), (ax_kl, "KL to fp32 (wiki held out)")):
            ax.set_yscale("log")
            ax.set_xlabel("bits per weight (scales and zero points included)")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=10)
            ax.grid(True, alpha=0.3)
        ax_ppl.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-mixed"))
    parser.add_argument("--uniform", default="rtn,gptq,awq+gptq", type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--bases", default="gptq,awq+gptq", type=lambda s: s.split(","))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), type=lambda s: [float(t) for t in s.split(",")])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--ood-windows", type=int, default=32)
    parser.add_argument("--austen", default="austen", help="the out-of-domain text (a reference name or a file)")
    parser.add_argument("--assignments", type=int, default=32)
    parser.add_argument("--score-windows", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="keep artifacts already built in --work")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        report()
        return
    started = time.perf_counter()
    run(args)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
