"""The benchmark harness shared by every script under benchmarks/: timed CLI runs, one evaluation
loop, one results writer and one report writer.

A benchmark measures, writes results/<name>.json with `write_results`, and renders its report
from that JSON alone (a `render(data) -> str` of its own); `report_cli` gives every script the
same `--report-only`, which rebuilds the report from the committed results without running a
model. No figure is typed in: a report shows what its results hold, and tests/test_benchmarks.py
checks that every committed report is exactly what its renderer makes of the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"
REPORTS = Path(__file__).resolve().parents[1] / "reports"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()}"


def compress_json(*args: str, env: dict | None = None) -> dict | list:
    """Run `compress --json ...` in a fresh process; its own JSON reports wall time and peak RSS."""
    cmd = [sys.executable, "-m", "compressor.cli", "--json", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout)
    if isinstance(result, dict):
        result["process_wall_s"] = time.perf_counter() - started
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- the evaluation loop

def evaluate(model: str, candidates: dict[str, str | Path], windows: int, *, device: str = "cpu",
             batch_size: int = 4, per_pass: int | None = None,
             each: Callable[[str, object], None] | None = None, before: Callable[[object], None] | None = None,
             text: str = "wiki") -> dict:
    """Perplexity and KL(base ‖ candidate) of every candidate artifact on the protocol's held-out
    text (`windows` × 512 tokens of `text`: 'wiki', or 'austen' out of domain), one base forward per batch shared by the candidates loaded
    together (`per_pass` at a time, all by default). `before(base)` runs once the base is loaded,
    `each(name, model)` while a candidate is loaded. Returns evaluate_models' rows by candidate
    name and "base", plus "tokens" (the TokenSet) and "loaded_base" (the base's LoadedModel)."""
    from compressor import api
    from compressor.calib.data import evaluation_set
    from compressor.evaluation.perplexity import evaluate_models

    base = api.load(model)
    tokens = evaluation_set(text, base.tokenizer, windows, 512)
    if before is not None:
        before(base)
    base.model.to(device)
    names = list(candidates)
    per_pass = per_pass or max(len(names), 1)
    results: dict = {}
    for start in range(0, max(len(names), 1), per_pass):
        chunk = names[start:start + per_pass]
        models = {name: api.load(candidates[name]).model.to(device) for name in chunk}
        results.update(evaluate_models(models, tokens, base.model, batch_size=batch_size, device=device))
        if each is not None:
            for name in chunk:
                each(name, models[name])
        del models
    return {**results, "tokens": tokens, "loaded_base": base}


# ---------------------------------------------------------------- results and reports

def write_results(name: str, rows: list[dict], protocol: dict, extra: dict | None = None,
                  path: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"{name}.json"
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "device": "cpu", "protocol": protocol, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def fmt(value, spec: str | Callable = "{}", missing: str = "") -> str:
    """A cell: the value through `spec` (a format string or a function), or `missing` where there is none."""
    if value is None:
        return missing
    return spec(value) if callable(spec) else spec.format(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def write_report(name: str, text: str) -> Path:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}.md"
    path.write_text(text)
    return path


def report_cli(parser: argparse.ArgumentParser, name: str, render: Callable[[dict], str],
               refresh: Callable[[dict, argparse.Namespace], dict] | None = None) -> argparse.Namespace | None:
    """Parse the script's arguments; with --report-only, rebuild reports/<name>.md from
    results/<name>.json (after `refresh`, which may re-derive rows from other results files)
    and return None, else return the arguments for a measuring run."""
    parser.add_argument("--report-only", action="store_true",
                        help=f"rebuild reports/{name}.md from results/{name}.json without running a model")
    args = parser.parse_args()
    if not args.report_only:
        return args
    data = read_results(name)
    if refresh is not None:
        data = refresh(data, args)
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {write_report(name, render(data))}")
    return None


def print_table(rows: list[dict], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(*columns, title=title)
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, row.get("config", {}).get(c, ""))
            cells.append(f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, dict) else str(v))
        out.add_row(*cells)
    Console().print(out)
