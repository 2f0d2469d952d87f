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


def test_hqq_baseline_refines_its_zero_points_and_the_stronger_hqq_is_the_yardstick(tmp_path):
    """The published-HQQ baseline ends no worse than its min-max start (float16 zero points, codes
    0..15), and the out-of-domain ratio is taken against whichever HQQ did better on Austen."""
    import torch
    from baselines import hqq_float_zero
    from quantize import gpu_rows

    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 1)
    w[0, 3] = 4.0  # an outlier the lp error tolerates
    g = w.reshape(32, 2, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    inverse = (15 / (hi - lo)).half().float()
    zero = (-lo * inverse).half().float()
    minmax = ((torch.round(g * inverse + zero).clamp(0, 15) - zero) / inverse).reshape(32, 128)
    refined = hqq_float_zero(w)
    assert (w - refined).abs().mean() <= (w - minmax).abs().mean()
    assert not torch.equal(refined, minmax)

    def row(name, method, ppl, austen):
        return {"variant": name, "method": method, "config": {"bits": 4}, "bits_per_weight": 4.3, "ppl": ppl,
                "kl": 0.1, "wall_s": 1.0, "base_ppl": 10.0, "austen_ppl": austen, "austen_kl": 0.1,
                "austen_base_ppl": 20.0}

    import json

    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"rows": [row("gptq-w4", "gptq", 11.0, 22.0), row("hqq-w4", "hqq", 14.0, 26.0),
                                         row("hqq-float-w4", "hqq-float", 13.0, 24.0)]}))
    gptq = next(r for r in gpu_rows(path) if r["row"] == "gptq-w4")
    assert gptq["hqq_baseline"] == "hqq-float-w4"
    assert gptq["austen_fraction_of_hqq_increase"] == pytest.approx(2.0 / 4.0)
    assert gptq["fraction_of_hqq_increase"] == pytest.approx(1.0 / 3.0)
