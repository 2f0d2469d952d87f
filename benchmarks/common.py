"""Shared helpers for benchmark scripts: timed CLI runs, medians, machine info, results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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


def write_results(name: str, rows: list[dict], protocol: dict, extra: dict | None = None,
                  path: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"{name}.json"
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "device": "cpu", "protocol": protocol, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title)
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, row.get("config", {}).get(c, ""))
            cells.append(f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, dict) else str(v))
        table.add_row(*cells)
    Console().print(table)
