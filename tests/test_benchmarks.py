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
RENDERERS = {"quantize": "quantize", "slicing": "slicing", "spine": "spine", "lossless": "lossless_report",
             "kernels": "kernels_report", "engine": "engine", "minitron": "minitron", "multigpu": "multigpu",
             "mixed": "mixed", "robustness": "robustness"}


# reports/index.md is `compress publish`'s, held to its results by tests/test_report.py.
@pytest.mark.parametrize("name", sorted(p.stem for p in REPORTS.glob("*.md") if p.stem != "index"))
def test_committed_report_is_rendered_from_committed_results(name):
    assert name in RENDERERS, f"reports/{name}.md has no renderer: add its benchmark module to RENDERERS"
    render = importlib.import_module(RENDERERS[name]).render
    assert render(read_results(name)) == (REPORTS / f"{name}.md").read_text()
