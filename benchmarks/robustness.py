"""Robustness figures: kill-and-resume campaign, fuzzed readers, the bad-input matrix.

    python benchmarks/robustness.py                       # all three campaigns (long)
    python benchmarks/robustness.py --only kill --kills 240           # ~10 min on 2 idle cores
    python benchmarks/robustness.py --only fuzz --fuzz-inputs 100000  # ~15-20 min on 2 idle cores
    python benchmarks/robustness.py --only bad-input                  # ~3 min
    python benchmarks/robustness.py --report-only         # reports/robustness.md from the results

`--workers N` (default: one per core) runs N processes at once: kill-campaign workers each take
every command in a directory of their own, fuzzing runs N readers side by side.

Each part replaces its own rows of results/robustness.json and keeps the others, so the parts can
be run (and re-run) one at a time. The campaigns themselves live in faults.py (kills), fuzz.py
(readers) and bad_inputs.py (the matrix); the fast subset of each runs in the default test suite
(tests/test_robustness.py, tests/test_bad_input_matrix.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import RESULTS, fmt, machine, report_cli, table, write_report  # noqa: E402

NAME = "robustness"
KILL_TARGET, FUZZ_TARGET = 200, 100_000


def _load() -> dict:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "protocol": {}}


def _save(data: dict, part: str, rows: list[dict], protocol: dict) -> None:
    data.update(_load())  # another part may have finished meanwhile (parts can run side by side)
    data["rows"] = [r for r in data.get("rows", []) if r["method"].split(":")[0] != part] + rows
    data["rows"].sort(key=lambda r: (["kill", "fuzz", "bad-input"].index(r["method"].split(":")[0]),
                                     r["method"], r.get("stage", "")))
    data.setdefault("protocol", {})[part] = protocol
    data.update({"benchmark": NAME, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                 "device": "cpu", "load_note": _load_note()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=2) + "\n")


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return (f"Measured under shared load (load average {five:.1f} on {os.cpu_count()} cores): "
            "wall times and rates are not those of an idle machine")


def run_kills(work: Path, kills: int, per_trial: int, budget_s: float | None, seed: int, workers: int,
              names: list[str] | None = None) -> tuple[list[dict], dict]:
    import faults

    names = names or list(faults.COMMANDS)
    done = {"kills": 0}

    def each(t):  # called in each worker process: the totals are per worker
        done["kills"] += t.kills
        print(f"[{os.getpid()}] {t.command}: {t.kills} kills, recovered={t.recovered}, lost={t.lost} "
              f"{t.problems or ''} (this worker: {done['kills']}) {time.strftime('%H:%M:%S')}", flush=True)

    # trials round-robin until the kills are in (or the time is up)
    trials = max(len(names), kills // max(per_trial // 2, 1) + len(names))
    result = faults.campaign(work, names, per_trial, trials, seed=seed, budget_s=budget_s, each=each,
                             stop_after_kills=kills, workers=workers)
    rows = [{"method": "kill", "stage": f"{r['stage']}:{r['command']}", "runs": r["runs"], "recovered": r["recovered"],
             "lost": r["lost"], "missed": r["missed"], "trials": r["trials"], "problems": r["problems"][:5],
             "volatile": r["volatile"], "uninterrupted_s": r["uninterrupted_s"], "wall_s": round(r["wall_s"], 1)}
            for r in result["rows"]]
    return rows, {"campaign_wall_s": round(result["wall_s"], 1), "workers": result["workers"]}


def run_fuzz(work: Path, readers: list[str], inputs: int, seconds: float | None, seed: int,
             workers: int = 1) -> tuple[list[dict], dict]:
    """Each reader fuzzed in its own worker process, `workers` readers at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import fuzz

    started = time.perf_counter()
    for name in readers:  # the seed files first, one reader at a time (readers share the files they copy)
        seeds = work / name / "seed"
        seeds.mkdir(parents=True, exist_ok=True)
        fuzz.READERS[name].seed(seeds)
    # the slowest readers first (measured: a compressed-tensors artifact decodes every tensor, a recipe
    # is validated), so that the last ones to run are short
    slow = ["compressed-tensors", "recipe", "compressed-tensors-weights", "manifest", "checkpoint"]
    order = sorted(readers, key=lambda n: slow.index(n) if n in slow else len(slow))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # each thread waits on one reader's worker process
        done = dict(zip(order, pool.map(lambda name: _fuzz_row(fuzz, name, work, inputs, seconds, seed), order)))
    rows = [done[name] for name in readers]
    return rows, {"campaign_wall_s": round(time.perf_counter() - started, 1), "workers": max(1, workers)}


def _fuzz_row(fuzz, name: str, work: Path, inputs: int, seconds: float | None, seed: int) -> dict:
    r = fuzz.campaign(name, work / name, inputs, seconds=seconds, seed=seed)
    row = {"method": f"fuzz:{name}", "inputs": r["inputs"], "crashes": r["crashes"], "hangs": r["hangs"],
           "multiline": r["multiline"], "errors": r["errors"], "accepted": r["ok"],
           "worker_deaths": r["worker_deaths"], "retried_stalls": r.get("retried", 0),
           "input_bytes": r.get("input_bytes"),
           "memory_limit_mb": r.get("memory_limit_mb"), "timeout_s": 5.0, "wall_s": round(r["wall_s"], 1),
           "inputs_per_s": round(r["inputs"] / r["wall_s"], 1) if r["wall_s"] else None,
           "memory": r.get("memory"), "examples": [e.get("error", "")[-300:] for e in r["examples"][:3]]}
    print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
    return row


def run_bad_inputs(work: Path) -> list[dict]:
    import bad_inputs

    started = time.perf_counter()
    ws = bad_inputs.Workspace(work)
    failures = {}
    for cell in bad_inputs.CELLS:
        problem = bad_inputs.run_cell(ws, cell)
        if problem:
            failures[cell.id] = problem
    return [{"method": "bad-input", "cells": len(bad_inputs.CELLS), "passed": len(bad_inputs.CELLS) - len(failures),
             "failed": len(failures), "commands": len({c.command for c in bad_inputs.CELLS}),
             "inputs": len({c.bad for c in bad_inputs.CELLS}), "failures": failures,
             "wall_s": round(time.perf_counter() - started, 1)}]


# ---------------------------------------------------------------- the report

def render(data: dict) -> str:
    rows = data["rows"]
    kills = [r for r in rows if r["method"] == "kill"]
    fuzzed = [r for r in rows if r["method"].startswith("fuzz:")]
    matrix = [r for r in rows if r["method"] == "bad-input"]
    out = ["# Robustness: kills, fuzzed readers, bad input", "",
           f"{data['machine']}, {data['date']}. {data.get('load_note', '')}.", "",
           "Regenerate: `PYTHONPATH=$PWD python benchmarks/robustness.py` (parts: `--only kill|fuzz|bad-input`); "
           "this page: `--report-only`.", ""]
    total_runs = sum(r["runs"] for r in kills)
    total_lost = sum(r["lost"] for r in kills)
    total_recovered = sum(r["recovered"] for r in kills)
    protocol = data.get("protocol", {}).get("kill", {})
    out += ["## Kill and resume", "",
            "Each run is a real `compress` process SIGKILLed after a random delay drawn over the length of an "
            "uninterrupted run (measured in the same sitting, with the same number of runs side by side, and "
            "updated by every run that finishes), on a tiny random model, over a previous artifact at the output "
            "name where the command replaces one. After every kill the output name must hold the previous artifact "
            "or the complete new one (byte for byte; a sensitivity pass, whose directory is its own checkpoint, "
            "must hold only files with their final bytes); the run is then continued (`--resume` where the command "
            "keeps checkpoints) until it finishes, and the result must be byte-identical to an uninterrupted run's "
            "(files that differ between two uninterrupted runs aside, listed as volatile) with no temporary left. "
            "`gptq-sharded` reads a checkpoint of several safetensors shards lazily, block by block (the scale "
            "work's path; the other quantize rows without a pruner take it too, from one file); `mixed` runs its "
            "own sensitivity pass, search and build; `distill` trains the `minitron` row's student. Missed: runs "
            "that finished before their kill came.", ""]
    out += table(["command", "kills", "recovered", "lost", "missed", "trials", "uninterrupted s", "volatile files",
                  "trial s"],
                 [[f"`{r['stage']}`", str(r["runs"]), str(r["recovered"]), str(r["lost"]),
                   fmt(r.get("missed"), "{}", "-"), str(r["trials"]), fmt(r["uninterrupted_s"], "{:.1f}"),
                   _files(r["volatile"]), fmt(r["wall_s"], "{:.0f}")]
                  for r in kills] or [["(not run yet)", *[""] * 8]])
    campaign = (f" in {protocol['campaign_wall_s']:.0f} s of wall time with {protocol['workers']} worker processes"
                if "campaign_wall_s" in protocol else "")
    met = _met(total_runs >= KILL_TARGET and total_lost == 0)
    out += ["", f"**Total: {total_runs} kills, {total_recovered} recovered byte-identical, {total_lost} lost**"
            f"{campaign} (target ≥ {KILL_TARGET} kills, 0 lost: {met}).", ""]
    problems = [p for r in kills for p in r.get("problems", [])]
    if problems:
        out += ["Problems found:", "", *[f"- {p}" for p in problems], ""]
    out += ["## Fuzzed readers", "",
            "Mutations of real small files written by compressor itself (byte edits: bit flips, interesting "
            "integers over lengths and counts, truncation, insertion, splicing; structure-aware edits of JSON and "
            "YAML), read in-process in a worker with an address-space limit (the worker's size at start plus the "
            "limit shown) and a per-input timeout of 5 s. A crash is any failure other than our one-line error "
            "(MemoryError included); an input past the timeout is read once more with 60 s (the machine is shared "
            "and loaded: a stall is not a hang) and is a hang if it times out again (rows with `-` under stalls "
            "retried were measured without that second try: there every stall counts as a hang); a worker death "
            "is an interpreter crash. Each input's memory is measured too: the worker's peak resident size is "
            "reset before the input and read after it, and the growth compared with the bytes of the files the "
            "reader was given (the mutated file and those beside it); over bound counts inputs that grew the "
            "worker by more than the bound shown (rows with `-` were measured before memory was).", ""]
    out += table(["reader", "inputs", "inputs/s", "one-line errors", "read fine", "crashes", "hangs",
                  "stalls retried", "worker deaths", "seed bytes", "memory limit", "peak growth",
                  "at input of", "peak / its input", "over bound", "wall s"],
                 [[f"`{r['method'][5:]}`", str(r["inputs"]), fmt(r["inputs_per_s"], "{:.0f}"), str(r["errors"]),
                   str(r["accepted"]), str(r["crashes"]), str(r["hangs"]), fmt(r.get("retried_stalls"), "{}", "-"),
                   str(r["worker_deaths"]), str(r["input_bytes"]), f"+{r['memory_limit_mb']} MiB",
                   *_memory(r.get("memory")), fmt(r["wall_s"], "{:.0f}")]
                  for r in fuzzed] or [["(not run yet)", *[""] * 15]])
    bounds = {r["memory"]["bound"] for r in fuzzed if r.get("memory")}
    if bounds:
        over = sum(r["memory"]["over_bound"] for r in fuzzed if r.get("memory"))
        out += ["", f"Memory bound per input: {', '.join(sorted(bounds))}; inputs over it: {over} "
                f"({_met(over == 0)})."]
    if fuzzed:
        least = min(r["inputs"] for r in fuzzed)
        clean = all(r["crashes"] == r["hangs"] == r["multiline"] == 0 for r in fuzzed)
        out += ["", f"**{sum(r['inputs'] for r in fuzzed)} inputs, fewest per reader {least}; crashes and hangs: "
                f"{'none' if clean else 'see the table'}** (target ≥ {FUZZ_TARGET} per reader, 0 crashes or hangs: "
                f"{_met(least >= FUZZ_TARGET and clean)}).", ""]
    for r in matrix:
        out += ["## Bad-input matrix", "",
                f"{r['cells']} cells ({r['commands']} commands; {r['inputs']} kinds of bad input, each paired with "
                "the commands it can reach): each must exit with code 2, print one `error:` line naming the problem and the fix, "
                "and change no file of the workspace.", "",
                f"**{r['passed']} of {r['cells']} cells pass** ({_met(r['failed'] == 0)}); wall "
                f"{r['wall_s']:.0f} s.", ""]
        for cell, problem in sorted(r.get("failures", {}).items()):
            out.append(f"- `{cell}`: {problem}")
        if r.get("failures"):
            out.append("")
    out += ["## Also in the default test suite", "",
            "`tests/test_robustness.py`: a damaged checkpoint in the run directory (a tensor's bytes, the next "
            "block's inputs, `run.json`, a missing block) is found by the sha256 each file carries and the run "
            "recomputed from its first block, byte-identical; a disk that fills up or is remounted read-only in the "
            "middle of a run (a small tmpfs; skipped where mounting is not allowed) ends in one line with the "
            "previous artifact intact, and `--resume` finishes once there is room; a second process writing the "
            "same output is refused while the first holds its lock; hypothesis-made safetensors and GGUF headers "
            "and a fast subset of every campaign above.", ""]
    return "\n".join(out).rstrip() + "\n"


def _memory(m: dict | None) -> list[str]:
    if not m:
        return ["-"] * 4
    return [f"{m['peak_growth_bytes'] / 2 ** 20:.1f} MiB", f"{m['input_bytes_at_peak'] / 1024:.0f} KiB",
            f"{m['growth_per_input_byte_at_peak']:.2f}", str(m["over_bound"])]


def _files(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} files ({', '.join(sorted({Path(n).name.split('.')[-1] for n in names}))})"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="kill,fuzz,bad-input", help="comma-separated parts to run")
    parser.add_argument("--kills", type=int, default=KILL_TARGET, help="kills to inject in all")
    parser.add_argument("--kills-per-trial", type=int, default=4)
    parser.add_argument("--kill-seconds", type=float, default=None, help="stop the kill campaign after this long")
    parser.add_argument("--commands", default=None, help="comma-separated kill-campaign commands (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes at once (kill campaign: commands shared out; fuzzing: readers)")
    parser.add_argument("--fuzz-inputs", type=int, default=FUZZ_TARGET, help="inputs per reader")
    parser.add_argument("--fuzz-seconds", type=float, default=None, help="time per reader")
    parser.add_argument("--readers", default=None, help="comma-separated readers (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a fresh one; "
                        "fuzzing is fastest on a tmpfs such as /dev/shm)")
    args = report_cli(parser, NAME, render)
    if args is None:
        return
    import fuzz

    parts = args.only.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="robustness-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                               else None))
    data = _load()
    if "kill" in parts:
        rows, totals = run_kills(work / "kill", args.kills, args.kills_per_trial, args.kill_seconds, args.seed,
                                 args.workers, args.commands.split(",") if args.commands else None)
        _save(data, "kill", rows, {"kills": args.kills, "kills_per_trial": args.kills_per_trial, "seed": args.seed,
                                   "model": "random llama, 3 blocks, hidden 64", **totals})
    if "fuzz" in parts:
        readers = args.readers.split(",") if args.readers else list(fuzz.READERS)
        rows, totals = run_fuzz(work / "fuzz", readers, args.fuzz_inputs, args.fuzz_seconds, args.seed, args.workers)
        if args.readers:  # keep the other readers' rows
            rows += [r for r in data.get("rows", []) if r["method"].startswith("fuzz:")
                     and r["method"][5:] not in readers]
        _save(data, "fuzz", rows, {"inputs_per_reader": args.fuzz_inputs, "seconds_per_reader": args.fuzz_seconds,
                                   "seed": args.seed, **totals})
    if "bad-input" in parts:
        _save(data, "bad-input", run_bad_inputs(work / "bad-input"), {})
    print(f"wrote {write_report(NAME, render(data))}")


if __name__ == "__main__":
    main()
