"""Issue-11 benchmark: the restructured engine against the one before it, in the same sitting, and
the quantizer added as one file (HQQ-style) against RTN on the reference model.

- Engine overhead: `compress quantize smollm2-135m --method gptq --bits 4 --group-size 64
  --act-order` wall time, and `compress prune` (SliceGPT, MoDeGPT at 25%) peak RSS, each run by
  the current checkout and by a worktree of the engine's previous commit, alternating A B A B so
  both see the same machine load; medians.
- Quality: RTN and HQQ at W4 g64 (symmetric and asymmetric) and W3 g64 on the held-out windows,
  with KL to fp32 (one shared fp32 forward).

Writes benchmarks/results/engine.json and reports/engine.md.

    python benchmarks/engine.py [--before 9de96b1] [--repeats 2] [--skip-timing] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, evaluate, median, print_table, report_cli, write_report, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
TIMED = {
    "gptq-w4": ["quantize", MODEL, "--method", "gptq", "--bits", "4", "--group-size", "64", "--asym", "--act-order"],
    "slicegpt-25": ["prune", MODEL, "--method", "slicegpt", "--sparsity", "0.25"],
    "modegpt-25": ["prune", MODEL, "--method", "modegpt", "--sparsity", "0.25"],
}
QUALITY = {  # row name: (method, config, flags)
    "rtn-w4-sym": ("rtn", {"bits": 4, "group_size": 64, "sym": True}, ["--bits", "4", "--sym"]),
    "hqq-w4-sym": ("hqq", {"bits": 4, "group_size": 64, "sym": True}, ["--bits", "4", "--sym"]),
    "rtn-w4": ("rtn", {"bits": 4, "group_size": 64, "sym": False}, ["--bits", "4", "--asym"]),
    "hqq-w4": ("hqq", {"bits": 4, "group_size": 64, "sym": False}, ["--bits", "4", "--asym"]),
    "rtn-w3": ("rtn", {"bits": 3, "group_size": 64, "sym": False}, ["--bits", "3", "--asym"]),
    "hqq-w3": ("hqq", {"bits": 3, "group_size": 64, "sym": False}, ["--bits", "3", "--asym"]),
}


def checkout(commit: str, work: Path) -> Path:
    path = work / f"engine-{commit}"
    if not (path / "compressor").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(path), commit],
                       check=True, capture_output=True)
    return path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(code: Path, args: list[str], out: Path, threads: int | None = None) -> dict:
    """One command in a fresh process with `code` first on the path; its JSON plus process wall and CPU time.

    CPU seconds are recorded beside wall time because on a machine shared with other work the wall time
    measures the neighbours as much as the engine; with one thread the CPU time is the single-core wall time."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    started, cpu_before = time.perf_counter(), children_cpu_s()
    # A fresh start without --restart, which the engine before had only for quantize: no run directory left.
    shutil.rmtree(out.with_name(f".{out.name}.run"), ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "--json", *args, "-o", str(out), "--overwrite"],
                          capture_output=True, text=True, env=env, cwd=code)
    wall, cpu = time.perf_counter() - started, children_cpu_s() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} with {code} failed: {proc.stderr.strip()[-1500:]}")
    result = json.loads(proc.stdout)
    return {"process_wall_s": wall, "cpu_s": cpu, "peak_rss_mb": result["peak_rss_mb"], "wall_s": result["wall_s"]}


def timing_rows(before: str, repeats: int, work: Path, samples: int | None, threads: int | None,
                only: list[str]) -> list[dict]:
    codes = {"before": checkout(before, work), "now": ROOT}
    rows = []
    for name, args in TIMED.items():
        if only and name not in only:
            continue
        args = [*args, "--samples", str(samples)] if samples else args
        runs: dict[str, list[dict]] = {"before": [], "now": []}
        for i in range(repeats):
            for label in ("before", "now") if i % 2 == 0 else ("now", "before"):
                print(f"{name}: {label} run {i + 1}/{repeats}", flush=True)
                runs[label].append(run(codes[label], args, work / f"{name}-{label}", threads))
        row = {"model": MODEL, "method": f"engine:{name}",
               "config": {"command": " ".join(args), "before": before, "threads": threads},
               "load_average_1m": round(os.getloadavg()[0], 1)}
        for label, results in runs.items():
            row[f"{label}_wall_s"] = round(median([r["process_wall_s"] for r in results]), 1)
            row[f"{label}_wall_runs_s"] = [round(r["process_wall_s"], 1) for r in results]
            row[f"{label}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in results))
            row[f"{label}_cpu_s"] = round(median([r["cpu_s"] for r in results]), 1)
        row["wall_ratio"] = round(row["now_wall_s"] / row["before_wall_s"], 3)
        row["cpu_ratio"] = round(row["now_cpu_s"] / row["before_cpu_s"], 3)
        row["peak_rss_ratio"] = round(row["now_peak_rss_mb"] / row["before_peak_rss_mb"], 3)
        rows.append(row)
    return rows


def quality_rows(windows: int, work: Path) -> list[dict]:
    timings = {}
    for name, (method, _, flags) in QUALITY.items():
        print(f"quantizing {name}", flush=True)
        timings[name] = run(ROOT, ["quantize", MODEL, "--method", method, "--group-size", "64", *flags],
                            work / name)
    results = evaluate(MODEL, {name: work / name for name in QUALITY}, windows)
    base_ppl = results["base"]["ppl"]
    rows = [{"model": MODEL, "method": "fp32", "config": {}, "bits_per_weight": 32.0, "ppl": base_ppl, "kl": 0.0}]
    for name, (method, config, _) in QUALITY.items():
        manifest = json.loads((work / name / "manifest.json").read_text())
        rows.append({"model": MODEL, "method": method, "config": config, "row": name,
                     "bits_per_weight": manifest["metrics"]["bits_per_weight"],
                     "size_bytes": sum(f.stat().st_size for f in (work / name).glob("*.safetensors")),
                     "ppl": results[name]["ppl"], "kl": results[name]["kl"],
                     "ppl_increase_pct": 100 * (results[name]["ppl"] / base_ppl - 1),
                     "wall_s": round(timings[name]["process_wall_s"], 1),
                     "peak_rss_mb": round(timings[name]["peak_rss_mb"])})
    return rows


def render(data: dict) -> str:
    lines = ["# Engine restructuring (issue 11): overhead and the one-file quantizer", "",
             f"Generated by `benchmarks/engine.py` from `benchmarks/results/engine.json` ({data['date']}, "
             f"{data['machine']}).", ""]
    timed = [r for r in data["rows"] if r["method"].startswith("engine:")]
    if timed:
        lines += ["## Engine overhead, same sitting", "",
                  f"Each command ran {len(timed[0]['now_wall_runs_s'])}× with the engine before "
                  f"(`{timed[0]['config']['before']}`) and now, alternating; medians of process wall time and "
                  "of the process's CPU time (user + system), the figure that stays meaningful when other work "
                  "shares the machine (load average at the end of each command's runs in the last column).", "",
                  "| command | threads | wall before | wall now | ratio | CPU before | CPU now | ratio | "
                  "peak RSS before | peak RSS now | ratio | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(f"| `{r['config']['command']}` | {r['config'].get('threads') or 'default'} | "
                         f"{r['before_wall_s']} s | {r['now_wall_s']} s | {r['wall_ratio']} | "
                         f"{r.get('before_cpu_s', '')} s | {r.get('now_cpu_s', '')} s | {r.get('cpu_ratio', '')} | "
                         f"{r['before_peak_rss_mb']} MB | {r['now_peak_rss_mb']} MB | {r['peak_rss_ratio']} | "
                         f"{r.get('load_average_1m', '')} |")
        lines.append("")
    quality = [r for r in data["rows"] if not r["method"].startswith("engine:")]
    if quality:
        lines += ["## HQQ-style refinement against RTN (calibration-free)", "",
                  f"{data['protocol']['eval_windows']} held-out windows × 512 tokens of wiki:eval, KL to fp32.", "",
                  "| row | bits/weight | perplexity | increase | KL | quantize wall |", "|---|---|---|---|---|---|"]
        for r in quality:
            increase = f"+{r['ppl_increase_pct']:.1f}%" if "ppl_increase_pct" in r else ""
            lines.append(f"| {r.get('row', r['method'])} | {r['bits_per_weight']} | {r['ppl']:.3f} | {increase} | "
                         f"{r['kl']:.4f} | {r.get('wall_s', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="9de96b1", help="commit of the engine to compare against")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--work", default="out/bench-engine")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--only", nargs="*", default=[], choices=list(TIMED), help="timed commands to run")
    parser.add_argument("--samples", type=int, help="calibration samples for the timed commands (default: protocol's)")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of the timed commands (1: CPU time = wall time)")
    args = report_cli(parser, "engine", render)
    if args is None:
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = [] if args.skip_timing else timing_rows(args.before, args.repeats, work, args.samples, args.threads, args.only)
    rows += [] if args.skip_quality else quality_rows(args.windows, work)
    previous = json.loads((RESULTS / "engine.json").read_text())["rows"] if (RESULTS / "engine.json").is_file() else []
    kept = {r["method"] if r["method"].startswith("engine:") else r.get("row", r["method"]) for r in rows}
    rows += [r for r in previous if (r["method"] if r["method"].startswith("engine:") else
                                     r.get("row", r["method"])) not in kept]
    protocol = {"eval_windows": args.windows, "window": 512, "timing_repeats": args.repeats}
    path = write_results("engine", rows, protocol)
    data = json.loads(path.read_text())
    print_table([r for r in rows if r["method"].startswith("engine:")],
                ["method", "before_wall_s", "now_wall_s", "wall_ratio", "before_cpu_s", "now_cpu_s", "cpu_ratio",
                 "before_peak_rss_mb", "now_peak_rss_mb"],
                "engine overhead")
    print_table([r for r in rows if not r["method"].startswith("engine:")],
                ["row", "bits_per_weight", "ppl", "kl", "ppl_increase_pct"], "HQQ vs RTN")
    print(write_report("engine", render(data)))


if __name__ == "__main__":
    main()
