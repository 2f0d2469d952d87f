"""Reports are generated, never edited: every committed report is exactly what its benchmark's
renderer makes of the committed results (`python benchmarks/<name>.py --report-only`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from benchmarks.common import REPORTS, read_results  # noqa: E402

# report name (results/<name>.json → reports/<name>.md): the module whose render() makes it
RENDERERS = {"quantize": "quantize", "scale": "scale", "slicing": "slicing", "spine": "spine",
             "lossless": "lossless_report", "kernels": "kernels_report", "engine": "engine", "minitron": "minitron",
             "multigpu": "multigpu", "mixed": "mixed", "robustness": "robustness", "fp8_split": "fp8_split"}


# reports/index.md is `compress publish`'s, held to its results by tests/test_report.py.
@pytest.mark.parametrize("name", sorted(p.stem for p in REPORTS.glob("*.md") if p.stem != "index"))
def test_committed_report_is_rendered_from_committed_results(name):
    assert name in RENDERERS, f"reports/{name}.md has no renderer: add its benchmark module to RENDERERS"
    render = importlib.import_module(RENDERERS[name]).render
    assert render(read_results(name)) == (REPORTS / f"{name}.md").read_text()


def test_minitron_merge_replaces_a_rerun_part_and_rows_of_the_same_identity(tmp_path, monkeypatch):
    """Merging new parts into the committed results keeps the other rows; a part run again (a new
    throughput sweep) replaces all its old rows, a row measured again (same method, config, device)
    replaces the old one, and the MoDeGPT target is judged on its best row within 20M tokens."""
    import json

    import minitron

    common = sys.modules[minitron.write_results.__module__]
    for module in (common, minitron):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "REPORTS", tmp_path)
    gpu = "cuda (NVIDIA H200)"

    def part(name, rows):
        path = tmp_path / f"minitron_{name}.json"
        path.write_text(json.dumps({"part": name, "device": gpu, "rows": rows}))
        return str(path)

    def step(method, rate, **config):
        return {"method": method, "device": gpu, "config": {"batch": 64, **config}, "tokens_per_s": rate, "mfu": 0.1}

    base = {"method": "fp32", "config": {}, "device": gpu, "ppl": 10.0}
    pruned = {"method": "modegpt", "config": {"sparsity": 0.25}, "device": gpu, "ppl": 30.0}
    kd = lambda tokens, ppl: {"method": "modegpt+kd", "config": {"sparsity": 0.25, "tokens": tokens}, "device": gpu,  # noqa: E731
                              "tokens": tokens, "ppl": ppl}
    minitron.merge([part("throughput_cuda", [step("kd-step:plain", 1.0), step("kd-step:compress-distill", 2.0)]),
                    part("quality_d", [base, pruned, kd(5_000_000, 18.0)])], fresh=True)
    minitron.merge([part("throughput_cuda", [step("kd-step:plain", 1.5), step("kd-step:compress-distill+compile", 4.0,
                                                                              kl_chunk=8192)]),
                    part("quality_modegpt", [{**pruned, "ppl": 31.0}, kd(20_000_000, 10.5), kd(40_000_000, 9.0)])])
    data = json.loads((tmp_path / "minitron.json").read_text())
    rows = {(r["part"], r["method"], r["config"].get("tokens")): r for r in data["rows"]}
    assert sorted(rows) == sorted([
        ("throughput_cuda", "kd-step:plain", None), ("throughput_cuda", "kd-step:compress-distill+compile", None),
        ("quality_d", "fp32", None), ("quality_d", "modegpt+kd", 5_000_000),
        ("quality_modegpt", "modegpt", None), ("quality_modegpt", "modegpt+kd", 20_000_000),
        ("quality_modegpt", "modegpt+kd", 40_000_000)])
    assert rows[("throughput_cuda", "kd-step:plain", None)]["tokens_per_s"] == 1.5
    assert set(data["parts"]) == {"throughput_cuda", "quality_d", "quality_modegpt"}
    assert "MoDeGPT 25% + distillation (20.0M tokens): ppl 10.50 vs base 10.00, 5% above (target within 10%): met" \
        in (tmp_path / "minitron.md").read_text()
