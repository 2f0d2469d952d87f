"""Issue-15 benchmark: Hessian-guided mixed precision against uniform RTN, GPTQ and AWQ+GPTQ.

Every artifact is built by `compress quantize` in a fresh process (wall and CPU seconds, peak RSS,
the load average when it started: these machines are shared): uniform rows at 2/3/4/8 bits (group
size 64, integer zero points, act-order for GPTQ), mixed rows at 2.5/3.0/3.25/3.5/4.0 bits and at
uniform W3 GPTQ's own bits. The first mixed build of a base runs the sensitivity pass (the whole
search: pass, probes, search, build, verification), the later ones reuse its cache (a second
budget). Then every artifact and the fp32 model are evaluated together on the protocol's held-out
wiki windows (benchmarks/common.evaluate), sharing each fp32 forward for KL.

The score check: random mixed assignments (each linear's candidate from the sensitivity pass),
each measured as KL on held-out wiki windows, ranked against the plain Hessian prediction and the
prediction augmented with the probed inter-block dependencies (Spearman).

    python benchmarks/mixed.py                                    # smollm2-135m, everything
    python benchmarks/mixed.py --model gemma3-270m --uniform rtn,gptq --bits 3,4 --targets 3.5 --assignments 0
    python benchmarks/mixed.py --report-only                      # reports/mixed.md and the Pareto plot

Writes benchmarks/results/mixed.json (rows of every model measured so far), reports/mixed.md and
reports/mixed-pareto.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (REPORTS, RESULTS, compress_json, evaluate, fmt, print_table, read_results,  # noqa: E402
                    report_cli, table, write_report, write_results)

NAME = "mixed"
PLOT = REPORTS / "mixed-pareto.png"
TARGETS = (2.5, 3.0, 3.25, 3.5, 4.0)
UNIFORM_BITS = (2, 3, 4, 8)
GROUP = 64
# --device (where builds and evaluations run; the score check runs on the CPU) and --skip-missing
# (rows not built yet are left out, nothing is built): set once by main().
RUN = argparse.Namespace(device="cpu", skip_missing=False)
CALIB = {"calib_samples": 128, "calib_len": 512}
LOAD_NOTE = ("timings taken on a shared 2-core machine under load from other agents (load average per row); "
             "wall_s vs cpu_s shows the contention")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def build(name: str, args: list[str], work: Path, reuse: bool, **extra) -> dict:
    """Run one `compress quantize` (or reuse its recorded run), timed; `extra` joins the record."""
    record = work / f"{name}.run.json"
    if reuse and record.is_file() and (work / name / "manifest.json").is_file():
        return json.loads(record.read_text())
    if RUN.skip_missing:
        print(f"skipping {name}: not built", flush=True)
        return None
    print(f"building {name}", flush=True)
    cpu, load = _children_cpu_s(), _load_average()
    # An interrupted uniform build (this machine's sessions end without warning) is resumed, its wall time then
    # partial; a mixed one starts again (its sensitivity pass resumes from its own cache).
    stale = work / f".{name}.run"
    if "--mixed" in args:
        shutil.rmtree(stale, ignore_errors=True)
    resumed = (stale / "run.json").is_file()
    result = compress_json("quantize", *args, "-o", str(work / name), "--overwrite", "--device", RUN.device,
                           *(["--resume"] if resumed else []))
    extra = {**extra, **({"resumed": True} if resumed else {})}
    run = {"wall_s": round(result["process_wall_s"], 1), "cpu_s": round(_children_cpu_s() - cpu, 1),
           "peak_rss_mb": round(result["peak_rss_mb"]), "load_average": load,
           "bits_per_weight": result.get("bits_per_weight"), "mixed": result.get("mixed"),
           "timings": result.get("timings"), **extra}
    record.write_text(json.dumps(run, indent=1))
    return run


def uniform_builds(model: str, work: Path, methods: list[str], bits: list[int], reuse: bool) -> list[tuple]:
    out = []
    for method in methods:
        for b in bits:
            config = {"bits": b, "group_size": GROUP, "sym": False}
            flags = ["--bits", str(b), "--group-size", str(GROUP), "--asym"]
            if method != "rtn":
                config["act_order"] = True
                flags.append("--act-order")
            name = f"{method}-w{b}"
            out.append((name, {"method": method, "config": config},
                        build(name, [model, "--method", method, *flags], work, reuse)))
    return [row for row in out if row[2] is not None]


def mixed_builds(model: str, work: Path, bases: list[str], targets: list[float], reuse: bool,
                 extra: list[str]) -> list[tuple]:
    out = []
    for base in bases:
        sensitivity = work / f"sensitivity-{base}"
        for target in targets:
            name = f"mixed-{base}-{target:g}"
            cached = (sensitivity / "sensitivity.json").is_file()
            run = build(name, [model, "--method", base, "--mixed", "--target-bits", f"{target:g}", "--asym",
                               "--act-order", "--sensitivity", str(sensitivity), *extra], work, reuse,
                        ran_pass=not cached)
            config = {"target_bits": target, "base_method": base, "act_order": True, "sym": False,
                      **({"flags": " ".join(extra)} if extra else {})}
            out.append((name, {"method": "mixed", "config": config}, run))
    return [row for row in out if row[2] is not None]


def measure(model: str, work: Path, names: list[str], windows: int) -> dict:
    """Perplexity and KL of every named artifact in `work` (and of the base), four at a time with one
    base forward per batch; each result is kept beside its artifact, so artifacts can be measured
    while others are still being built (`--measure-only`)."""
    def cached(name: str) -> Path:
        return work / f"{name}.eval-{windows}.json"

    todo = [n for n in names if not cached(n).is_file()]
    for start in range(0, len(todo), 4):
        chunk = todo[start:start + 4]
        began = time.perf_counter()
        print(f"measuring {', '.join(chunk)} on {windows} windows", flush=True)
        got = evaluate(model, {n: work / n for n in chunk}, windows, per_pass=4, batch_size=2, device=RUN.device)
        for n in chunk:
            cached(n).write_text(json.dumps({**got[n], "base": got["base"], "eval_s": time.perf_counter() - began,
                                             "load_average": _load_average()}))
    out = {n: json.loads(cached(n).read_text()) for n in names}
    return {**out, "base": out[names[0]]["base"]}


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

    def rho(subset: list[dict], key: str):
        return float(spearmanr([r[key] for r in subset], [r["measured_kl"] for r in subset]).statistic) \
            if len(subset) > 2 else None

    near = [r for r in rows if 3.0 <= r["bits_per_weight"] <= 4.5]
    return {"spearman_plain": rho(rows, "plain"), "spearman_augmented": rho(rows, "augmented"),
            "spearman_plain_3_to_4.5_bits": rho(near, "plain"),
            "spearman_augmented_3_to_4.5_bits": rho(near, "augmented"),
            "assignments": rows, "eval_windows": windows}


def merge(args, rows: list[dict]) -> None:
    """Write `rows` into mixed.json: they replace the rows of the same model, method and base method, the
    others stay (the uniform rows, the mixed rows of each base, the score check and the CPU timing can be
    measured in runs of their own).
    Every row names the device that measured it, so rows of a GPU run and of a CPU run can stand together."""
    data = read_results(NAME) if (RESULTS / f"{NAME}.json").is_file() else {"rows": []}
    def key(r: dict) -> tuple:
        return r["model"], r["method"], r.get("config", {}).get("base_method")

    produced = {key(r) for r in rows}
    kept = [{**r, "device": r.get("device", data.get("device"))} for r in data["rows"] if key(r) not in produced]
    fresh = [{**r, "device": r.get("device", "cpu" if r["method"] == "mixed-scores" else args.device)} for r in rows]
    devices = sorted({r["device"] for r in kept + fresh if r.get("device")})
    write_results(NAME, kept + fresh, {"eval_windows": args.windows, "window": 512, **CALIB},
                  {"device": ", ".join(devices), "note": _note(devices, args.windows)})


def scores_row(args, work: Path) -> dict:
    return {"model": args.model, "method": "mixed-scores", "config": {"base_method": args.bases[0]},
            **scores(args, work)}


def timing_rows(args) -> list[dict]:
    """The whole search on this machine's CPU, timed: the first budget runs the sensitivity pass, the
    later ones reuse its cache. Perplexity comes from the builds on --device; these rows hold time."""
    work = Path(args.work) / f"{Path(args.model).name}-cpu-timing"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device, RUN.device = RUN.device, "cpu"
    try:
        built = mixed_builds(args.model, work, args.bases, args.targets, False, args.mixed_flags.split())
    finally:
        RUN.device = device
    return [{"model": args.model, "row": name, **identity, "method": "mixed-timing", "device": "cpu",
             "bits_per_weight": timing["bits_per_weight"], "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"],
             "peak_rss_mb": timing["peak_rss_mb"], "load_average": timing["load_average"],
             "cpus": os.cpu_count(), "search": _search(timing)} for name, identity, timing in built]


def scores(args, work: Path) -> dict:
    """The score check on the first base's sensitivities (kept in `work` for the next run)."""
    kept = work / f"scores-{args.bases[0]}-{args.assignments}x{args.score_windows}.json"
    if not kept.is_file():
        kept.write_text(json.dumps(score_correlation(args.model, work / f"sensitivity-{args.bases[0]}",
                                                     args.assignments, args.score_windows), indent=1))
    return json.loads(kept.read_text())


def _note(devices: list[str], windows: int) -> str:
    where = ["each row names the device that built and measured it"]
    if "cpu" in devices:
        where.append(LOAD_NOTE)
    fewer = f"; perplexity and KL on {windows} windows instead of the protocol's 64" if windows < 64 else ""
    return "; ".join(where) + fewer


def _w3_bits(work: Path) -> float | None:
    """Uniform W3 g64 GPTQ's own bits per weight: the budget of the issue's second target."""
    manifest = work / "gptq-w3" / "manifest.json"
    return round(json.loads(manifest.read_text())["metrics"]["bits_per_weight"], 4) if manifest.is_file() else None


def _search(timing: dict) -> dict:
    mixed, timings = timing["mixed"], timing.get("timings") or {}
    return {"predicted_kl": mixed["predicted_kl"], "verify_kl": mixed["measured"]["kl"],
            "verify_ppl_increase": mixed["measured"]["ppl_increase"], "formats": mixed["formats"],
            "timings": {k: round(v, 1) for k, v in timings.items()}, "ran_pass": timing.get("ran_pass", False),
            "rounds": mixed.get("rounds", [])}


def run(args) -> None:
    work = Path(args.work) / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)
    built = uniform_builds(args.model, work, args.uniform, args.bits, args.reuse)
    w3 = _w3_bits(work) if args.w3_point else None
    targets = sorted(set(args.targets) | ({w3} if w3 else set()))
    built += mixed_builds(args.model, work, args.bases, targets, args.reuse, args.mixed_flags.split())
    if args.build_only:
        return
    measured = measure(args.model, work, [name for name, _, _ in built], args.windows)
    base = measured["base"]
    rows = [{"model": args.model, "method": "fp32", "config": {}, "bits_per_weight": 32.0, "ppl": base["ppl"],
             "kl": 0.0}]
    for name, identity, timing in built:
        m = measured[name]
        rows.append({"model": args.model, "row": name, **identity, "bits_per_weight": timing["bits_per_weight"],
                     "size_bytes": sum(f.stat().st_size for f in (work / name).glob("*.safetensors")),
                     "ppl": m["ppl"], "ppl_increase_pct": 100 * (m["ppl"] / base["ppl"] - 1), "kl": m["kl"],
                     "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "peak_rss_mb": timing["peak_rss_mb"],
                     "load_average": timing["load_average"], "device": args.device,
                     **({"resumed": True} if timing.get("resumed") else {}),
                     **({"search": _search(timing)} if timing.get("mixed") else {})})
    if args.assignments:
        rows.append(scores_row(args, work))
    merge(args, rows)
    print_table([r for r in rows if r["model"] == args.model and r["method"] != "mixed-scores"],
                ["row", "bits_per_weight", "ppl", "kl", "wall_s"], f"mixed precision, {args.model}")


# ---------------------------------------------------------------- the report

def _label(r: dict) -> str:
    return r.get("row", r["method"])


def _row(rows: list[dict], method: str, **config) -> dict | None:
    return next((r for r in rows if r["method"] == method and all(r["config"].get(k) == v for k, v in config.items())),
                None)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the rows of one model."""
    fp32 = _row(rows, "fp32")
    gptq4, rtn4, gptq3 = _row(rows, "gptq", bits=4), _row(rows, "rtn", bits=4), _row(rows, "gptq", bits=3)
    mixed = sorted((r for r in rows if r["method"] == "mixed"), key=lambda r: r["config"]["target_bits"])
    out = []
    for r in (m for m in mixed if m["config"]["target_bits"] == 3.5):
        base = r["config"]["base_method"]
        if gptq4:
            ratio = r["ppl"] / gptq4["ppl"]
            out.append(f"- 3.5 bits ({base}): {r['bits_per_weight']:.3f} bits, ppl {r['ppl']:.3f} = "
                       f"{100 * (ratio - 1):+.1f}% vs uniform W4 g64 GPTQ ({gptq4['bits_per_weight']:.3f} bits, ppl "
                       f"{gptq4['ppl']:.3f}): target within +5%: **{'met' if ratio <= 1.05 else 'missed'}**")
        if rtn4:
            out.append(f"- 3.5 bits ({base}) vs uniform W4 g64 RTN (ppl {rtn4['ppl']:.3f}): "
                       f"**{'better' if r['ppl'] < rtn4['ppl'] else 'not better'}**")
    if gptq3 and fp32:
        for r in (m for m in mixed if abs(m["config"]["target_bits"] - gptq3["bits_per_weight"]) < 1e-3):
            share = (r["ppl"] - fp32["ppl"]) / (gptq3["ppl"] - fp32["ppl"])
            out.append(f"- {r['config']['target_bits']:g} bits ({r['config']['base_method']}, uniform W3 GPTQ's "
                       f"bits): perplexity increase {r['ppl'] - fp32['ppl']:.3f} = {100 * share:.0f}% of uniform W3 "
                       f"GPTQ's {gptq3['ppl'] - fp32['ppl']:.3f}: target at most 70%: "
                       f"**{'met' if share <= 0.70 else 'missed'}**")
    uniform = [r for r in rows if r["method"] in ("rtn", "gptq", "awq+gptq")]
    if mixed and uniform:
        # Pareto: a mixed point is dominated when a uniform row has no more bits and no higher perplexity.
        dominated = [(m, u) for m in mixed for u in uniform
                     if u["bits_per_weight"] <= m["bits_per_weight"] + 1e-3 and u["ppl"] <= m["ppl"]]
        out.append("- mixed points dominated by a uniform row (no more bits, no higher perplexity): "
                   + (", ".join(f"{_label(m)} by {_label(u)}" for m, u in dominated) or "none")
                   + f": the mixed points dominate: **{'missed' if dominated else 'met'}**")
    scores = _row(rows, "mixed-scores")
    if scores:
        better = scores["spearman_augmented"] > scores["spearman_plain"]
        out.append(f"- Spearman with measured KL over {len(scores['assignments'])} random assignments: plain Hessian "
                   f"{scores['spearman_plain']:.3f}, augmented {scores['spearman_augmented']:.3f} (3 to 4.5 bits: "
                   f"{fmt(scores['spearman_plain_3_to_4.5_bits'], '{:.3f}', 'n/a')} and "
                   f"{fmt(scores['spearman_augmented_3_to_4.5_bits'], '{:.3f}', 'n/a')}): augmented better: "
                   f"**{'met' if better else 'missed'}**")
    # The whole-search time target is for the 2-core CPU machines: the CPU timing rows where there are some.
    timed = [r for r in rows if r["method"] == "mixed-timing"] or mixed
    for base in dict.fromkeys(r["config"]["base_method"] for r in timed):
        runs = [r for r in timed if r["config"]["base_method"] == base]
        full = [r for r in runs if r["search"]["ran_pass"]]
        if not full:
            continue
        first = full[0]
        later = [r["wall_s"] for r in runs if r is not first]
        out.append(f"- whole search on {base} (sensitivity pass, probes, search, build, verification) on "
                   f"{first.get('device', RUN.device)}: {first['wall_s']:.0f} s wall ({first['cpu_s']:.0f} s CPU, load average "
                   f"{first['load_average']:.1f}): under 10 min: **{'met' if first['wall_s'] <= 600 else 'missed'}**"
                   + (f"; a second budget on the cached sensitivities: median {sorted(later)[len(later) // 2]:.0f} s, "
                      f"max {max(later):.0f} s: under 3 min: **{'met' if max(later) <= 180 else 'missed'}**"
                      if later else ""))
    return out


def render(data: dict) -> str:
    protocol = data["protocol"]
    lines = ["# Mixed precision (issue 15)", "",
             f"Generated by `python benchmarks/mixed.py` (mixed.json, {data['date']}, {data['machine']}); "
             f"perplexity over {protocol['eval_windows']} × {protocol['window']} held-out wiki tokens, KL(fp32 ‖ "
             f"model) per token, calibration {protocol['calib_samples']} × {protocol['calib_len']} tokens. Uniform "
             f"rows: group size {GROUP}, integer zero points, act-order for GPTQ. Mixed rows: each linear in int2/3/4/8 "
             "at group 32/64/128 (those that divide it) or kept in 16 bits, chosen under the budget. Bits per weight "
             "count scales and zero points as stored. Note: " + data.get("note", "") + ".", "",
             f"![Pareto: bits per weight vs perplexity and KL]({PLOT.name})", ""]
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["model"] == model]
        lines += [f"## {model}", ""]
        lines += table(["row", "method", "device", "bits/weight", "size", "ppl", "increase", "KL", "wall", "CPU",
                        "load", "peak RSS"], [[
                            _label(r), r["method"] + (f" on {r['config']['base_method']}" if r["method"] == "mixed"
                                                      else ""),
                            fmt(r.get("device")),
                            f"{r['bits_per_weight']:.3f}", fmt(r.get("size_bytes"), lambda v: f"{v / 1e6:.1f} MB"),
                            f"{r['ppl']:.3f}", fmt(r.get("ppl_increase_pct"), "{:+.1f}%"), f"{r['kl']:.4f}",
                            fmt(r.get("wall_s"), "{:.0f} s") + (" (resumed)" if r.get("resumed") else ""),
                            fmt(r.get("cpu_s"), "{:.0f} s"),
                            fmt(r.get("load_average"), "{:.1f}"),
                            fmt(r.get("peak_rss_mb"), lambda v: f"{v / 1000:.2f} GB")]
                            for r in rows if r["method"] not in ("mixed-scores", "mixed-timing")])
        timed = [r for r in rows if r["method"] == "mixed-timing"]
        if timed:
            lines += ["", "The whole search timed on the CPU (the first budget runs the sensitivity pass, the "
                          "others reuse its cache):", ""]
            lines += table(["row", "bits/weight", "wall", "CPU", "load", "peak RSS", "phases"], [[
                _label(r), f"{r['bits_per_weight']:.3f}", f"{r['wall_s']:.0f} s", f"{r['cpu_s']:.0f} s",
                f"{r['load_average']:.1f} ({r.get('cpus', '?')} cores)", f"{r['peak_rss_mb'] / 1000:.2f} GB",
                ", ".join(f"{k} {v:.0f} s" for k, v in r["search"]["timings"].items())] for r in timed])
        mixed = [r for r in rows if r["method"] == "mixed"]
        if mixed:
            lines += ["", "Formats chosen (linears per format), predicted KL and the KL/perplexity the search "
                          "measured on held-out calibration text:", ""]
            lines += table(["row", "formats", "predicted KL", "verify KL", "verify ppl"], [[
                _label(r), ", ".join(f"{f} {n}" for f, n in r["search"]["formats"].items()),
                f"{r['search']['predicted_kl']:.4f}", f"{r['search']['verify_kl']:.4f}",
                f"{r['search']['verify_ppl_increase']:+.1f}%"] for r in mixed])
        searched = [(r, x) for r in mixed for x in r["search"].get("rounds", [])]
        if searched:
            lines += ["", "Plans the search measured on held-out calibration text (round 0: the uniform format that "
                          "spends the most bits within the budget; later rounds re-solve with the bit widths below "
                          "it rescaled by the measurement; the plan of least measured KL is built):", ""]
            lines += table(["row", "round", "plan", "bits/weight", "predicted KL", "verify KL", "verify ppl",
                            "score scale"], [[
                                _label(r), str(x["round"]), x.get("uniform") or "mixed", f"{x['bits_per_weight']:.3f}",
                                f"{x['predicted_kl']:.4f}", f"{x['measured_kl']:.4f}",
                                f"{x['measured_ppl_increase']:+.1f}%",
                                ", ".join(f"int{b} ×{v:.3g}" for b, v in x.get("scale_by_bits", {}).items())]
                                for r, x in searched])
        checked = targets(rows)
        if checked:
            lines += ["", "Targets:", "", *checked]
        lines.append("")
    return "\n".join(lines)


def pareto(rows: list[dict]) -> bytes:
    """Bits per weight against perplexity and KL, uniform methods and mixed points, one row per model."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False, dpi=72)
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
    parser.add_argument("--work", default="out/bench-mixed")
    parser.add_argument("--uniform", default="rtn,gptq,awq+gptq", type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--bits", default="2,3,4,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--bases", default="gptq", type=lambda s: [b for b in s.split(",") if b])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)),
                        type=lambda s: [float(t) for t in s.split(",") if t])
    parser.add_argument("--no-w3-point", dest="w3_point", action="store_false",
                        help="skip the mixed point at uniform W3 GPTQ's bits")
    parser.add_argument("--mixed-flags", default="", help="more flags for the mixed builds (quoted)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--assignments", type=int, default=32)
    parser.add_argument("--score-windows", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="keep artifacts (and timings) built in --work")
    parser.add_argument("--device", default="cpu", help="where builds and evaluations run (cpu, cuda)")
    parser.add_argument("--skip-missing", action="store_true", help="with --reuse: leave out rows not built yet")
    parser.add_argument("--build-only", action="store_true", help="build what is missing in --work, measure nothing")
    parser.add_argument("--scores-only", action="store_true",
                        help="run the score check on the sensitivities in --work (kept for the next run), nothing else")
    parser.add_argument("--cpu-timing", action="store_true",
                        help="time the whole search at --targets on this machine's CPU (first budget runs the "
                             "sensitivity pass, the others reuse it) and add the rows to the results, nothing else")
    parser.add_argument("--measure-only", action="store_true",
                        help="measure the artifacts already built in --work (kept for the next run), nothing else")
    args = report_cli(parser, NAME, render)
    if args is not None:
        RUN.device, RUN.skip_missing = args.device, args.skip_missing
    if args is not None and (args.measure_only or args.scores_only or args.cpu_timing):
        work = Path(args.work) / Path(args.model).name
        if args.measure_only:
            measure(args.model, work, sorted(p.parent.name for p in work.glob("*/manifest.json")), args.windows)
        if args.cpu_timing:
            merge(args, timing_rows(args))
        if args.scores_only:
            merge(args, [scores_row(args, work)])
        if args.cpu_timing or args.scores_only:
            write_report(NAME, render(read_results(NAME)))
        return
    if args is not None:
        started = time.perf_counter()
        run(args)
        if args.build_only:
            return
        write_report(NAME, render(read_results(NAME)))
        print(f"done in {time.perf_counter() - started:.0f} s")
    PLOT.write_bytes(pareto(read_results(NAME)["rows"]))


if __name__ == "__main__":
    main()
