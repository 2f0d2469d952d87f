"""Data-parallel calibration: two gloo processes under torchrun give the artifact one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys


ARGS = ["--bits", "4", "--group-size", "32", "--asym", "--samples", "16", "--seq-len", "64", "--batch-size", "4"]


def _run(prefix: list[str], model, data, out, method: str, extra: list[str]):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [*prefix, "-m", "compressor", "--quiet", "quantize", str(model), "--method", method, "--calib", str(data),
           "-o", str(out), *ARGS, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_give_the_same_artifact(tiny_llama, text_file, tmp_path):
    # AWQ's search samples straddle the two shards; GPTQ's Hessians are summed across them.
    method, extra = "awq+gptq", ["--act-order", "--search-samples", "6"]
    _run([sys.executable], tiny_llama, text_file, tmp_path / "one", method, extra)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run(torchrun, tiny_llama, text_file, tmp_path / "two", method, extra)
    for name in ("model.safetensors", "manifest.json", "config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert json.loads((tmp_path / "two" / "build.json").read_text())["processes"] == 2
    assert not list(tmp_path.glob(".two.run*")), "the run directory is removed after success"
