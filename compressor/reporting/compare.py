"""The comparison report of `compress report`: evaluated candidates as a Page."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compressor.evaluation.suite import Candidate, SuiteSettings
from compressor.reporting.document import Metric, Page, Row, Section

TEXT_LABELS = {"wiki": "held-out Wikipedia", "austen": "Austen"}
# lm-eval metrics and which way is better
TASK_METRICS = {"acc": "higher", "acc_norm": "higher", "word_perplexity": "lower", "byte_perplexity": "lower",
                "bits_per_byte": "lower", "exact_match": "higher", "f1": "higher"}


def _short(value, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def provenance(c: Candidate) -> dict[str, str]:
    info, out = c.info, {}
    out["kind"] = info.get("kind", "?")
    out["path"] = c.identity.get("path", c.ref)
    out["artifact sha256"] = c.identity.get("sha256", "")[:16]
    if info.get("tool_version"):
        out["tool"] = f"compressor {info['tool_version']}"
    source = info.get("source") or {}
    if source:
        ref = source.get("ref") or source.get("path") or ""
        digest = source.get("sha256") or source.get("hash") or ""
        out["source"] = f"{ref} ({digest[:12]})" if ref else digest[:12]
    method = info.get("method") or {}
    if method:
        out["method"] = f"{method.get('name')} {_short(method.get('config', {}))}"
    calib = info.get("calibration") or {}
    if calib:
        out["calibration"] = (f"{calib.get('source')} {calib.get('samples')}×{calib.get('seq_len')} "
                              f"seed {calib.get('seed')} ({str(calib.get('sha256', ''))[:12]})")
    command = (info.get("build") or {}).get("command")
    if command:
        out["command"] = _short(command, 300)
    if c.result:
        out["evaluated"] = f"{c.result.get('evaluated', '?')}" + (" (cached)" if c.cached else "")
    return out


def _varies(values: dict[str, list]) -> bool:
    """A per-layer map worth drawing: its values differ by more than 1% (a uniform map, e.g. the
    bits of a uniformly quantized model, says nothing the tables do not)."""
    flat = [v for per in values.values() for v in per if isinstance(v, (int, float))]
    return bool(flat) and max(flat) - min(flat) > 0.01 * max(abs(max(flat)), abs(min(flat)), 1e-12)


def _row(c: Candidate, is_base: bool) -> Row:
    row = Row(c.ref if not is_base else c.ref, is_base=is_base, flags=list(c.flags), error=c.error)
    if c.error:
        return row
    info, result = c.info, c.result or {}
    if info.get("size_bytes") is not None:
        row.metrics["size_mb"] = info["size_bytes"] / 1e6
    if info.get("bits_per_weight") is not None:
        row.metrics["bits_per_weight"] = info["bits_per_weight"]
    for text, r in result.get("texts", {}).items():
        row.metrics[f"ppl:{text}"] = r["ppl"]
        row.metrics[f"kl:{text}"] = r["kl"]
    for task, metrics in (result.get("lm_eval") or {}).get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric in TASK_METRICS and isinstance(value, (int, float)):
                row.metrics[f"{task}:{metric}"] = value
                stderr = metrics.get(f"{metric}_stderr")
                if isinstance(stderr, (int, float)):
                    row.stderr[f"{task}:{metric}"] = stderr
    row.layers = {title: values for title, values in result.get("layers", {}).items() if _varies(values)}
    row.provenance = provenance(c)
    return row


def _bench_key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def add_bench(rows: list[Row], refs: list[str], benches: list[dict]) -> list[Metric]:
    """Speed from `compress bench --json` outputs, matched to rows by the artifact path they name
    (compared as text, never opened): speed-up over the dense base measured in the same run, and
    decode tokens/s, per batch size."""
    by_path = {_bench_key(ref): row for ref, row in zip(refs, rows)}
    metrics: dict[str, Metric] = {}
    for bench in benches:
        run = bench.get("artifact")
        ref = run.get("ref") if isinstance(run, dict) else run
        row = by_path.get(_bench_key(str(ref or "")))
        if row is None or row.error:
            continue
        device = str(bench.get("device", "?"))
        for item in bench.get("speedup") or []:
            for name, label in (("decode_x", "decode speed-up"), ("prefill_x", "prefill speed-up")):
                if isinstance(item, dict) and isinstance(item.get(name), (int, float)):
                    key = f"bench:{name}:{item.get('batch')}"
                    row.metrics[key] = float(item[name])
                    metrics[key] = Metric(key, f"{label} vs dense, batch {item.get('batch')} ({device})",
                                          "higher", 2, "×", kind="other")
        row.provenance["speed"] = f"compress bench on {device}"
    return list(metrics.values())


def _names(rows: list[Row]) -> None:
    """Short unique display names: the last path component, more where two collide."""
    parts = {id(r): Path(r.name).parts or (r.name,) for r in rows}
    depth = {id(r): 1 for r in rows}
    for _ in range(8):
        names = {}
        for r in rows:
            names.setdefault("/".join(parts[id(r)][-depth[id(r)]:]), []).append(r)
        clashes = [rs for rs in names.values() if len(rs) > 1]
        if not clashes:
            break
        for rs in clashes:
            for r in rs:
                depth[id(r)] += 1
    for r in rows:
        r.name = "/".join(parts[id(r)][-depth[id(r)]:])


def build_page(base: Candidate, candidates: list[Candidate], settings: SuiteSettings, title: str | None = None,
               benches: list[dict] = ()) -> Page:
    included = [base] + [c for c in candidates if c.ref != base.ref]
    rows = [_row(c, c is base) for c in included]
    speed = add_bench(rows, [c.identity.get("path", c.ref) for c in included], list(benches))
    _names(rows)
    metrics = []
    for text in settings.texts:
        label = TEXT_LABELS.get(text, text)
        metrics.append(Metric(f"ppl:{text}", f"Perplexity, {label}", "lower", 3))
        metrics.append(Metric(f"kl:{text}", f"KL to base, {label}", "lower", 4))
    tasks = sorted({k.rsplit(":", 1)[0] for r in rows for k in r.metrics if k.count(":") == 1
                    and k.rsplit(":", 1)[1] in TASK_METRICS and not k.startswith(("ppl:", "kl:"))})
    for task in tasks:
        for metric, better in TASK_METRICS.items():
            metrics.append(Metric(f"{task}:{metric}", f"{task} {metric} (lm-eval)", better, 4))
    metrics += [Metric("bits_per_weight", "Bits per weight (whole checkpoint)", "lower", 3, kind="size"),
                Metric("size_mb", "Size on disk", "lower", 1, "MB", kind="size"), *speed]
    pareto = [("size_mb", f"ppl:{settings.texts[0]}")] if settings.texts else []
    pareto += [("size_mb", f"kl:{settings.texts[0]}")] if settings.texts else []
    intro = [f"Perplexity over the first {settings.windows} non-overlapping windows of {settings.window_len} tokens "
             f"of each held-out text (no BOS inserted; the base's tokenizer), and per-token KL(base ‖ model) on the "
             f"same tokens, on `{settings.device}`. Deltas are against the base, **{rows[0].name}**."]
    if tasks:
        intro.append("lm-eval accuracies carry lm-eval's standard error (±).")
    section = Section("Comparison", rows, metrics, pareto=pareto)
    errors = [(c.ref, c.error) for c in candidates if c.error]
    return Page(title or f"Compression report: {len(rows) - 1} candidates against {rows[0].name}",
                [section], intro=intro, errors=errors)
