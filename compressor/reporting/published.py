"""The published comparison (reports/index.md, reports/index.html) from the committed results in
benchmarks/results/*.json: every method on each model, one section per model and device, every
delta against the base row measured in the same results file (same run, same protocol)."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import CompressorError
from compressor.reporting.document import Metric, Page, Row, Section

BASE_METHODS = ("fp32", "bf16")
METRICS = [
    Metric("ppl", "Perplexity, held-out Wikipedia", "lower", 3),
    Metric("kl", "KL to base", "lower", 4),
    Metric("bits_per_weight", "Bits per quantized weight", "lower", 3, kind="size"),
    Metric("size_mb", "Size on disk", "lower", 1, "MB", kind="size"),
    Metric("params_m", "Parameters", "lower", 1, "M", kind="size"),
    Metric("ratio", "Lossless size ratio (bf16 = 1)", "lower", 4, kind="size"),
    Metric("wall_s", "Wall time of the command", "lower", 1, "s", kind="other"),
]


def _settings(config) -> str:
    if not isinstance(config, dict):
        return str(config or "")
    return ", ".join(f"{k}={v}" for k, v in config.items()
                     if not isinstance(v, (dict, list)) and len(str(v)) <= 24)


def _model(row: dict, data: dict) -> str:
    return row.get("model") or data.get("model") or "smollm2-135m"


def rows_of(path: Path) -> tuple[dict, list[dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompressorError(f"cannot read {path} ({exc})", "restore the results file") from None
    return data, [r for r in data.get("rows", []) if isinstance(r, dict)]


def _metrics(row: dict) -> dict[str, float]:
    out = {}
    for key in ("ppl", "kl", "bits_per_weight", "ratio", "wall_s"):
        if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
            out[key] = float(row[key])
    if isinstance(row.get("size_bytes"), (int, float)) and row["size_bytes"] > 0:
        out["size_mb"] = row["size_bytes"] / 1e6
    if isinstance(row.get("params"), (int, float)):
        out["params_m"] = row["params"] / 1e6
    if out.get("wall_s") == 0:
        out.pop("wall_s")
    return out


def build_index(results_dir: Path) -> Page:
    """Sections keyed by (model, device): rows with a quality or size measurement."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        raise CompressorError(f"no results in {results_dir}", "run the benchmarks first (benchmarks/*.py)")
    sections: dict[tuple[str, str], Section] = {}
    seen: set[tuple] = set()
    for path in files:
        data, rows = rows_of(path)
        for raw in rows:
            where = str(raw.get("device") or data.get("device") or "cpu")
            device = "cuda" if ("cuda" in where.lower() or "nvidia" in where.lower()) else "cpu"
            metrics = _metrics(raw)
            if not ({"ppl", "ratio"} & metrics.keys()):
                continue  # kernel timings and checks: not a method comparison row
            model = _model(raw, data)
            method = str(raw.get("method") or raw.get("variant") or "?")
            settings = _settings(raw.get("config"))
            label = raw.get("variant") or raw.get("row")
            name = f"{method} ({settings})" if settings else method
            if label and str(label) not in name:
                name += f" [{label}]"
            identity = (model, device, method, settings, round(metrics.get("ppl", 0), 4),
                        round(metrics.get("ratio", 0), 4))
            if identity in seen:
                continue  # the same measurement reported by two benchmarks
            seen.add(identity)
            key = (model, device)
            section = sections.setdefault(key, Section(f"{model} on {device}", [], METRICS,
                                                       pareto=[("bits_per_weight", "ppl"), ("size_mb", "ppl")]))
            row = Row(name, metrics=metrics, provenance={"results": f"benchmarks/results/{path.name}",
                                                         "benchmark": str(data.get("benchmark") or path.stem),
                                                         "machine": str(data.get("machine") or "?"),
                                                         "date": str(data.get("date") or "?")})
            if raw.get("note"):
                row.provenance["note"] = str(raw["note"])
            is_base = method in BASE_METHODS and "ppl" in metrics
            if is_base and section.base is None:
                row.is_base = True
                section.rows.insert(0, row)
            elif not is_base:
                section.rows.append(row)
            elif abs(section.base.metrics.get("ppl", 0) - metrics["ppl"]) > 1e-3:
                row.flags.append("a second base measurement that differs from the first")
                section.rows.append(row)
            base_ppl = raw.get("base_ppl")
            if isinstance(base_ppl, (int, float)) and section.base is None:
                section.rows.insert(0, Row(f"{model} fp32", metrics={"ppl": float(base_ppl), "kl": 0.0},
                                           provenance={"results": f"benchmarks/results/{path.name}"}, is_base=True))
    ordered = sorted(sections.values(), key=lambda s: (not s.title.startswith("smollm2"), s.title))
    for s in ordered:
        s.intro.append("Deltas are against the base row of the same section. Each row names the results file it "
                       "comes from; every number there was written by the benchmark script that measured it.")
    intro = [f"Every method measured on the reference models, from the {len(files)} results files in "
             "`benchmarks/results/` (protocol: `shared/BENCHMARKS.md`: perplexity over 64 × 512 held-out "
             "Wikipedia tokens, KL to the fp32 model on the same tokens). Regenerate with "
             "`compress publish benchmarks/results -o reports`."]
    return Page("compressor: published results", ordered, intro=intro)
