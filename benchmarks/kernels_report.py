"""reports/kernels.md from benchmarks/results/kernels.json (every figure is read from the JSON).

    python benchmarks/kernels_report.py [--results benchmarks/results/kernels.json] [--out reports/kernels.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HISTORY_NOTES = {  # what differed in each earlier run (by file-name suffix)
    "_run1": "First full run: the kernel before the one-group-ahead scale loads, tile tables before the sweep. "
             "Its copy baseline went through the copy engine (`copy_` in a graph) and read low, so its % of copy "
             "is left out here.",
    "_sweep": "Configuration sweep before the scale prefetch, with Triton's wgmma (warpgroup MMA, weights as its "
              "register operand). It also tried a prefill variant that folds the scales into the weight operand and "
              "runs a plain GEMM through shared memory; that variant was never among the fastest and was removed.",
    "_run2": "Second full run, before the decode GEMV: the Triton GEMM at every M (scales read one group ahead, "
             "tile tables from its sweep). The sweep below is that GEMM's decode configurations.",
    "_run3": "First run with the decode GEMV, whose lanes loaded one 32-bit word at a time: it beat the Triton "
             "GEMM only at M=1 on 14336×4096, so its measured crossover was M=0 and the kernel rows are the Triton "
             "GEMM's. Its end-to-end part stopped (compressed-tensors not installed on the GPU machine).",
    "_sweep_mmav2": "The same decode sweep with wgmma disabled (DISABLE_MMA_V3=1: Triton falls back to mma.sync).",
}
NCU_METRICS = (("Duration", "us"), ("DRAM Throughput", "%"), ("Memory Throughput", "Tbyte/s"),
               ("L2 Cache Throughput", "%"), ("Issued Warp Per Scheduler", ""), ("Active Warps Per Scheduler", "warp"),
               ("Eligible Warps Per Scheduler", "warp"), ("Warp Cycles Per Issued Instruction", "cycle"),
               ("Block Limit Registers", "block"), ("Achieved Occupancy", "%"))
MLP_8B = ("14336x4096", "4096x14336")
SHAPES_8B = ("4096x4096", "14336x4096", "4096x14336")


def carried_mark(r: dict) -> str:
    return " †" if r.get("carried_from") else ""


def label(r: dict) -> str:
    c = r.get("config", {})
    if r["method"] in ("bf16", "w8a8"):
        return r["method"]
    if r["method"] == "fp8":
        return f"fp8 ({c.get('backend')})"
    return f"{r['method']} g{c.get('group_size')}"


def pick(rows, method, shapes, m, group=None, backend=None):
    return [r for r in rows if r["method"] == method and r.get("shape") in shapes and r.get("m") == m
            and "time_us" in r and (group is None or r["config"].get("group_size") == group)
            and (backend is None or r["config"].get("backend") == backend)]


def worst(rows, key="speedup_vs_bf16"):
    return min((r[key] for r in rows), default=None)


def fmt(v, digits=2, suffix="") -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{suffix}"


def targets(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, met) — the issue's targets, each measured as its worst case."""
    out = []

    def add(name, value, goal, digits=2, suffix="x", found=()):
        met = "n/a" if value is None else ("yes" if value >= goal else "no")
        mark = " †" if any(r.get("carried_from") for r in found) else ""
        out.append((name, fmt(value, digits, suffix) + mark, f"≥ {goal:g}{suffix}", met))

    for group, goal in ((64, 3.3), (128, 3.4)):
        found = pick(rows, "w4a16", MLP_8B, 1, group)
        add(f"W4A16 g{group}, M=1, 8B MLP shapes: speed-up vs bf16", worst(found), goal, found=found)
    found = pick(rows, "w4a16", MLP_8B, 1, 64)
    add("W4A16 g64, M=1, 8B MLP shapes: % of copy bandwidth", worst(found, "pct_copy_bw"), 90, 0, "%", found)
    for m, goal in ((16, 3.2), (64, 2.0), (256, 1.0)):
        for group in (64, 128):
            found = pick(rows, "w4a16", MLP_8B, m, group)
            add(f"W4A16 g{group}, M={m}, 8B MLP shapes", worst(found), goal, found=found)
    for bits, goal in ((3, 4.0), (2, 5.5), (8, 1.8)):
        for group in (64, 128):
            found = pick(rows, f"w{bits}a16", MLP_8B, 1, group)
            if found:
                add(f"W{bits}A16 g{group}, M=1, 8B MLP shapes", worst(found), goal, found=found)
    found = pick(rows, "w8a8", SHAPES_8B, 256)
    add("W8A8 int8, M=256, 8B shapes", worst(found), 1.6, found=found)
    for backend in ("scaled_mm", "triton"):
        found = pick(rows, "fp8", SHAPES_8B, 256, backend=backend)
        add(f"FP8 ({backend}), M=256, 8B shapes", worst(found), 1.6, found=found)
    ratios, pairs = [], []
    for r in rows:
        if r["method"] == "w4a16" and "time_us" in r:
            peer = [p for p in rows if p["method"] == "torch-int4pack" and p.get("shape") == r["shape"]
                    and p.get("m") == r["m"] and p["config"].get("group_size") == r["config"]["group_size"]
                    and "time_us" in p]
            ratios += [p["time_us"] / r["time_us"] for p in peer]
            pairs += [r, *peer]
    add("W4A16 vs torch _weight_int4pack_mm, every shape and M (worst)", min(ratios, default=None), 1.0, found=pairs)
    e2e = [r for r in rows if r.get("model") and r["method"] == "w4a16" and r["batch"] == 1]
    add("End to end, 8B-shaped, batch-1 decode, W4A16 g128", worst(e2e), 2.8, found=e2e)
    return out


def kernel_table(rows: list[dict], shape: str) -> list[str]:
    lines = [f"### {shape} (out × in)", "", "| M | kernel | µs | × bf16 | GB/s | % copy | TFLOP/s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r.get("shape") == shape and "time_us" in r and not is_sweep(r)),
                    key=lambda r: (r["m"], r["method"] != "bf16", label(r))):
        lines.append(f"| {r['m']} | {label(r)}{carried_mark(r)} | {r['time_us']:.1f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['gbps']:.0f} | "
                     f"{r['pct_copy_bw']:.0f} | {r['tflops']:.1f} |")
    errors = [r for r in rows if r.get("shape") == shape and "error" in r]
    lines += [f"- {label(r)} failed: {r['error']}" for r in errors]
    return lines + [""]


def ncu_metrics(path: Path) -> dict[str, str]:
    """The decode kernel's headline counters from a saved Nsight Compute report: name → value."""
    found: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            for name, unit in NCU_METRICS:
                words = line.split()
                if line.strip().startswith(name + " ") and name not in found and len(words) >= 2 and \
                        (unit == "" or words[-2] == unit):
                    found[name] = f"{words[-1]} {unit}".strip()
    return found


def gemv_analysis(rows: list[dict], history_rows: list[dict], protocol: dict) -> list[str]:
    """What the decode GEMV reached at M=1 and what limits it (figures from this run and run3)."""
    if not any(r["method"] == "gemv-decode" for r in rows):
        return []
    lines = ["", "## Decode GEMV (CUDA): what it reached and what limits it", "",
             "Since the Triton GEMM stayed latency-bound (next section), decode sizes now run a dedicated GEMV "
             "in CUDA C (`compressor/kernels/wq_gemv.py`, compiled by NVRTC through CuPy) on the same repacked "
             "layout, so weights are not stored twice. No shared-memory staging and no pipeline barriers: each "
             "lane loads the plane words that form its own mma.m16n8k16 A fragment straight into registers, "
             "`(word >> shift) & mask | magic` gives two 16-bit floats 2^MANT + u per instruction pair, the "
             "tensor cores multiply by the (few) activation rows and accumulate in fp32, and one extra mma by "
             "ones gives the activation sums that remove the magic and code offsets and the zero point per group. "
             "Warps of a block split K and reduce in shared memory; blocks split K further where there are too "
             "few rows, the last block summing in split order. M=1 figures of this run:", "",
             "| format | shape | µs | × bf16 | GB/s | % copy |", "|---|---|---:|---:|---:|---:|"]
    for method in ("w4a16", "w2a16", "w3a16", "w8a16"):
        for group in (128, 64):
            for r in pick(rows, method, MLP_8B, 1, group):
                if not r.get("carried_from"):
                    lines.append(f"| {label(r)} | {r['shape']} | {r['time_us']:.1f} | {r['speedup_vs_bf16']:.2f} | "
                                 f"{r['gbps']:.0f} | {r['pct_copy_bw']:.0f} |")
    first = {r["shape"]: r for r in history_rows if r["method"] == "gemv-decode" and r.get("m") == 1}
    now = {r["shape"]: r for r in rows if r["method"] == "gemv-decode" and r.get("m") == 1}
    steps = "; ".join(f"{shape}: {first[shape]['time_us']:.1f} → {now[shape]['time_us']:.1f} µs"
                      for shape in now if shape in first)
    m_rows = {(r["shape"], r["m"]): r for r in rows if r["method"] == "gemv-decode"}
    w4 = [r for r in pick(rows, "w4a16", MLP_8B, 1, 128) if not r.get("carried_from")]
    bf = [r for r in pick(rows, "bf16", MLP_8B, 1) if not r.get("carried_from")]

    def pct(found, key, unit="%"):
        values = sorted(r[key] for r in found)
        return "n/a" if not values else "–".join(f"{v:.0f}" if unit == "%" else f"{v:.1f}"
                                                  for v in dict.fromkeys((values[0], values[-1]))) + unit
    flat = "; ".join(f"{shape}: {m_rows[(shape, 1)]['time_us']:.1f} µs at M=1, {m_rows[(shape, 8)]['time_us']:.1f} at "
                     f"M=8, {m_rows[(shape, 16)]['time_us']:.1f} at M=16"
                     for shape in dict.fromkeys(k[0] for k in m_rows) if (shape, 16) in m_rows and (shape, 8) in m_rows)
    lines += [
        "",
        "What was measured about the limits (no profile of this kernel was taken: the device time went to the "
        "two runs):",
        "",
        f"- Load width. The first build (`kernels_2026-11-29_run3.json`) gave every lane one 32-bit word per "
        f"load, so each warp load touched 8 rows for 16 bytes each; reading 128-column tiles of one plane width "
        f"(4-bit, 2-bit and 8-bit at g128 or per channel) as one 16-byte vector per lane and row, with the "
        f"activations permuted to match, took 4-bit g128 M=1 from {steps or 'n/a'}. Group sizes 64 and 32 and "
        "3-bit ([2, 1] planes of unequal width) still take the 32-bit path, which is why W4A16 g64 and W3A16 "
        "stay near the Triton GEMM.",
        f"- Activation rows. {flat or 'n/a'} (4-bit g128): up to 8 rows fill one mma n-tile and cost almost "
        "nothing; 9–16 rows need a second n-tile, twice the activation registers and half the tiles in flight, "
        f"so QuantLinear runs the GEMV up to M = {protocol.get('gemv', {}).get('max_m')} and the Triton GEMM above.",
        f"- Bandwidth. At M=1 the 4-bit g128 GEMV moves its bytes at {pct(w4, 'pct_copy_bw')} of the copy "
        f"bandwidth in {pct(w4, 'time_us', ' µs')}, bf16 `linear` at {pct(bf, 'pct_copy_bw')} in "
        f"{pct(bf, 'time_us', ' µs')} (the two MLP shapes). What remains is most likely latency rather than "
        "arithmetic (per "
        "32-bit word a few shifts and lop3s; the multiply-adds run on the tensor cores), untested by a profile: "
        "each warp issues its loads for "
        "UN tiles, waits, then dequantizes and runs its mmas with none of its own loads in flight, and a launch "
        "this short also carries fixed costs (the launch inside the graph, the split-K partial pass, the tail "
        "wave) that bf16's longer launch hides. The crossover and launch settings were measured on 4-bit g128; "
        "the other formats use them as they are.",
        "- Next steps: registers double-buffered across tiles (issue tile i+1's vectors before tile i's mmas); a "
        "load-time order that gives g64/g32 and 3-bit the same 16-byte per-lane loads; then Nsight Compute on the "
        "GEMV to see whether DRAM or issue stalls remain.",
    ]
    return lines


def analysis(rows: list[dict], history_rows: list[dict]) -> list[str]:
    """Where the Triton GEMM's decode time goes, from the profile saved beside the results, and what was tried."""
    w4 = [r for r in rows if r["method"] == "triton-decode" and r["shape"] == "14336x4096" and r["m"] == 1] or \
        pick(rows, "w4a16", ("14336x4096",), 1, 128)
    gbps = fmt(w4[0]["gbps"], 0, " GB/s") if w4 else "n/a"
    triton = [r for r in history_rows if r["method"] in ("w4a16", "w4a16-tuning", "weight_only-sweep", "triton-decode")]
    triton += [r for r in rows if r["method"] == "triton-decode"]  # this run's w4a16 rows at M=1 are the GEMV
    best = max((r["speedup_vs_bf16"] for r in triton if r.get("m") == 1 and "time_us" in r
                and r["config"].get("bits") == 4 and not r.get("carried_from")), default=None)
    ncu = ncu_metrics(next(iter(sorted(RESULTS.glob("kernels_*_ncu_decode.txt"))), RESULTS / "missing"))
    lines = ["", "## The Triton GEMM at decode sizes: where the time goes, and what was tried", "",
             f"The Triton GEMM (still used above the GEMV's M) runs W4A16 g128 at M=1 on 14336×4096 at {gbps} in "
             "this run. Nsight Compute on the same launch (an earlier build of the kernel, "
             "`kernels_*_ncu_decode.txt`):", ""]
    lines += [f"- {name}: {value}" for name, value in ncu.items()]
    lines += [
        "",
        f"So the kernel is latency-bound, not bandwidth- or issue-bound: of "
        f"{ncu.get('Active Warps Per Scheduler', 'n/a')} active per scheduler, "
        f"{ncu.get('Eligible Warps Per Scheduler', 'n/a')} is ready to issue, and DRAM sits mostly idle. The "
        "per-element work is small (each int32 word: one shift, one lop3 and one packed fma per pair of weights, "
        "the tensor cores doing the multiply-add), but each program's loop is a chain of cp.async wait → barrier "
        "→ ldmatrix → dequantize → a wgmma per 16 columns on a register operand → wait → scale, and with "
        f"{ncu.get('Block Limit Registers', 'n/a').split()[0]} 4-warp programs per multiprocessor at most (registers) "
        "too little of it overlaps.",
        "",
        "Tried, in order (each measured on the H200, see the sweeps below): tile rows per program and warps per "
        "program; pipeline depth; programs per multiprocessor (split-K depth); inline PTX for the lop3 and the "
        "packed fma against plain Triton; mma.sync instead of wgmma; reading scales one group ahead (the "
        "profile's largest stall was waiting on a global load, which was the in-loop scale load); for prefill, "
        "folding the scales into the weight operand and running a plain GEMM through shared memory. The best "
        f"W4A16 M=1 figure of the Triton GEMM over all of these runs is {fmt(best)}× bf16. The next steps the "
        "profile points to: a "
        "persistent kernel with a warp-specialized producer (TMA or cp.async) and consumers, written in CUDA C++ "
        "or Gluon rather than through Triton's single-loop pipeliner, so that loads for several tiles stay in "
        "flight while wgmma runs; and for prefill, dequantizing into shared memory ahead of a large-tile GEMM.",
    ]
    return lines


def is_sweep(r: dict) -> bool:
    return r["method"].endswith(("-sweep", "-tuning", "-decode"))


def gemv_tables(rows: list[dict], protocol: dict) -> list[str]:
    """The decode GEMV's launch settings (M=1) and its crossover against the Triton GEMM, same run."""
    sweep = [r for r in rows if r["method"] == "gemv-sweep"]
    if not sweep:
        return []
    gemv = protocol.get("gemv", {})
    lines = ["", "## Decode GEMV: launch settings and crossover (same run)", "",
             "4-bit g128 weights, M=1: row tiles of 16 per warp (RT), warps per block (NW), K tiles per warp "
             "iteration (UN), resident warps wanted per multiprocessor (split-K follows). The fastest per output "
             f"width became `wq_gemv.LAUNCH`: {json.dumps(gemv.get('launch'))}.", "",
             "| shape | RT | NW | UN | warps/SM | split-K | µs | × bf16 | GB/s | % copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(sweep, key=lambda r: (r["shape"], r["time_us"])):
        c = r["config"]
        lines.append(f"| {r['shape']} | {c['rt']} | {c['nw']} | {c['un']} | {c['warps_per_sm']} | {c['split_k']} | "
                     f"{r['time_us']:.1f} | {r['speedup_vs_bf16']:.2f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.0f} |")
    lines += ["", f"GEMV against the Triton GEMM on the same weights (4-bit g128); QuantLinear runs the GEMV up to "
                  f"M = {gemv.get('max_m')}, the largest M at which it was never slower on either shape.", "",
              "| shape | M | GEMV µs | Triton µs | bf16 µs | GEMV × bf16 | GEMV % copy |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["method"] == "gemv-decode"), key=lambda r: (r["shape"], r["m"])):
        t = next((p for p in rows if p["method"] == "triton-decode" and p["shape"] == r["shape"] and p["m"] == r["m"]),
                 None)
        lines.append(f"| {r['shape']} | {r['m']} | {r['time_us']:.1f} | {fmt(t and t['time_us'], 1)} | "
                     f"{r['bf16_time_us']:.1f} | {r['speedup_vs_bf16']:.2f} | {r['pct_copy_bw']:.0f} |")
    return lines


def sweep_table(rows: list[dict], title: str) -> list[str]:
    rows = [r for r in rows if r["method"] != "gemv-sweep" and not r["method"].endswith("-decode")]
    if not rows:
        return []
    lines = ["", f"## {title}", "",
             "| kernel | shape | M | BM | BN | warps | stages | programs/SM | split-K | µs | × bf16 | % copy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["shape"], r["m"], -r["speedup_vs_bf16"])):
        c = r["config"]
        per_sm = c.get("per_sm", c.get("programs_per_sm"))
        lines.append(f"| {r['method'].removesuffix('-sweep')} w{c['bits']} | {r['shape']} | {r['m']} | "
                     f"{c.get('BM', 16)} | {c['BN']} | {c.get('num_warps', '')} | {c['num_stages']} | {per_sm} | "
                     f"{c['split_k']} | {r['time_us']:.1f} | {r['speedup_vs_bf16']:.2f} | {r['pct_copy_bw']:.0f} |")
    return lines


def render(data: dict, history: list[Path] | None = None) -> str:
    history = earlier_runs() if history is None else history
    rows, p = data["rows"], data["protocol"]
    lines = [
        "# Kernels: weight-only int-N, W8A8 and FP8 GEMMs on the GPU",
        "",
        f"Generated by `benchmarks/kernels_report.py` from `benchmarks/results/kernels.json` "
        f"({data['date']}, {data['device']}, torch {p['torch']}, Triton {p['triton']}). "
        "Rerun: `python benchmarks/kernels.py --out DIR` on the GPU machine, copy `DIR/kernels.json` to "
        "`benchmarks/results/`, then this script.",
        "",
        f"Protocol: each operator inside a CUDA graph, one call per weight copy, copies together "
        f"{p['rotation_bytes'] / 2**20:.0f} MiB (L2 is {p['l2_bytes'] / 2**20:.0f} MiB), median of replays. "
        f"Baselines measured in the same run: device-to-device copy {p['copy_gbps']:.0f} GB/s (read + write), "
        f"bf16 8192³ matmul {p['bf16_matmul_tflops']:.0f} TFLOP/s, torch bf16 `linear`, and "
        "`torch._weight_int4pack_mm`. GB/s counts the bytes an operator must move (weights with scales, "
        "activations, output). Weights are synthetic; speed does not depend on their values.",
        "",
        "## Targets (issue 12)",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(rows)]
    carried = sorted({r["carried_from"] for r in rows if r.get("carried_from")})
    if carried:
        lines += ["", f"† from rows this run did not re-measure, kept from the run of {', '.join(carried)} "
                      f"(`{p.get('carried_from')}`, marked † in the tables too): this run re-measured the "
                      "weight-only formats at decode sizes on the 8B shapes and the end-to-end rows listed below "
                      "without †."]
    e2e = [r for r in rows if r.get("model")]
    if e2e:
        lines += ["", "## End to end: synthetic Llama-3-8B shape, decode through our loader", "",
                  f"Prompt {e2e[0]['prompt_len']} tokens, then {e2e[0]['gen_len']} greedy decode steps; one decode "
                  "step (forward, argmax) per CUDA graph replay; static KV cache.", "",
                  "| format | batch | decode tok/s | × bf16 | prefill tok/s | weights GB | CUDA graph |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in e2e:
            lines.append(f"| {r['method']}{carried_mark(r)} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_bf16']:.2f} | "
                         f"{r['prefill_tokens_per_s']:.0f} | {fmt(r['weights_gb'], 1)} | "
                         f"{'yes' if r['cuda_graph'] else 'no: ' + str(r.get('cuda_graph_note'))} |")
    lines += gemv_tables(rows, p)
    lines += sweep_table([r for r in rows if is_sweep(r)], "Decode configurations (sweep in the same run)")
    history_rows = [r for path in history for r in json.loads(Path(path).read_text())["rows"]]
    lines += gemv_analysis(rows, history_rows, p)
    lines += analysis(rows, history_rows)
    for path in history:
        old = json.loads(Path(path).read_text())
        note = next((v for k, v in sorted(HISTORY_NOTES.items(), key=lambda kv: -len(kv[0]))
                     if Path(path).stem.endswith(k)), "")
        lines += ["", f"## Earlier run: {Path(path).name} ({old['date']})", "", note, "",
                  "| target | measured | goal | met |", "|---|---:|---:|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(old["rows"])
                  if b != "n/a" and not b.endswith("%")]
        lines += sweep_table([r for r in old["rows"] if is_sweep(r)], f"Configuration sweep of {Path(path).name}")
    lines += ["", "## Every kernel row", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("shape") and not is_sweep(r)):
        lines += kernel_table(rows, shape)
    return "\n".join(lines).rstrip() + "\n"


def earlier_runs() -> list[Path]:
    return sorted(RESULTS.glob("kernels_*.json"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.json")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "kernels.md")
    ap.add_argument("--history", type=Path, nargs="*", default=earlier_runs(), help="earlier runs to summarize")
    args = ap.parse_args()
    args.out.write_text(render(json.loads(args.results.read_text()), args.history))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
