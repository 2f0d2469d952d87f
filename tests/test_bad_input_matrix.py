"""Every command × every bad input (benchmarks/bad_inputs.py's table): exit code 2, one line
naming the problem and the fix, and no file changed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bad_inputs import CELLS, Workspace, run_cell  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, monkeypatch_module) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.id}-{i}" for i, c in enumerate(CELLS)])
def test_bad_input_cell(cell, workspace, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(workspace.root / "cache"))
    problem = run_cell(workspace, cell)
    assert problem is None, problem
