"""The `compress` command line on the tiny model: quantize → inspect → verify → eval → report."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from compressor import __version__
from compressor.safetensors_file import read_header
from helpers import cli, compress_command




def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def ok_json(*args):
    """Run with --json; stdout must be exactly one JSON document."""
    return json.loads(ok("--json", *args).stdout)


# Bits per quantized weight of int4, group 32, float16 scales: 4 + 16/32, plus 4/32 for the zero points.
EXPECTED_BPW = {"sym": 4.5, "asym": 4.625}


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for mode in ("sym", "asym"):
        out[mode] = root / f"q-{mode}"
        result = ok("quantize", tiny_llama, "-o", out[mode], "--method", "rtn", "--bits", "4",
                    "--group-size", "32", f"--{mode}")
        assert str(out[mode]) in result.stdout  # the summary table names the artifact
    return out


@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_quantize_writes_artifact(mode, artifacts):
    out = artifacts[mode]
    for name in ("config.json", "model.safetensors", "manifest.json", "tokenizer.json", "build.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".run")] == []
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    weights = weights["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 32, "group")
    assert weights["symmetric"] is (mode == "sym")
    entries, _ = read_header(out / "model.safetensors")
    packed = entries["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == "I32" and packed.shape == (64, 128 * 4 // 32)
    assert entries["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 128 // 32)
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in entries) is (mode == "asym")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "quantized" and manifest["method"]["name"] == "rtn"


def test_quantize_json_summary(tiny_llama, tmp_path):
    summary = ok_json("quantize", tiny_llama, "-o", tmp_path / "q", "--bits", "4", "--group-size", "32")
    assert summary["output"] == str(tmp_path / "q")
    config = {"bits": 4, "group_size": 32, "sym": True, "scale_dtype": "float16"}
    assert summary["method"] == {"name": "rtn", "config": config, "methods": [{"name": "rtn", "config": config}]}
    assert summary["bits_per_weight"] == EXPECTED_BPW["sym"]
    assert 0 < summary["quantized_params"] < summary["params"]


def test_quiet_quantize_prints_no_progress(tiny_llama, tmp_path):
    result = ok("--quiet", "quantize", tiny_llama, "-o", tmp_path / "q", "--group-size", "32")
    assert result.stderr == ""


@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_inspect_json(mode, artifacts, tiny_llama):
    base = ok_json("inspect", tiny_llama)
    info = ok_json("inspect", artifacts[mode])
    assert base["kind"] == "checkpoint" and info["kind"] == "quantized"
    assert info["model_type"] == "llama" and info["adapter"] == "LlamaAdapter"
    assert info["layers"] == 3 and info["hidden_size"] == 64
    # Packed weights are counted by their logical shape: the same parameters as the float model.
    assert info["params"] == base["params"] > 100_000
    assert base["bits_per_weight_file"] == pytest.approx(32.0) and base["bits_per_weight_linears"] is None
    # The linears' bits come from the file's own tensors and agree with what the manifest recorded.
    assert info["bits_per_weight_linears"] == pytest.approx(EXPECTED_BPW[mode])
    manifest = json.loads((artifacts[mode] / "manifest.json").read_text())
    assert info["bits_per_weight_linears"] == pytest.approx(manifest["metrics"]["bits_per_weight"])
    assert info["quantized_params"] == manifest["metrics"]["quantized_params"]
    # Over all tensors (float32 embedding and norms included) it lies between the two.
    assert info["bits_per_weight_linears"] < info["bits_per_weight_file"] < base["bits_per_weight_file"]
    assert info["size_bytes"] < base["size_bytes"] / 3
    assert info["quantization"]["num_bits"] == 4 and info["quantization"]["group_size"] == 32
    assert info["source"]["ref"] == str(tiny_llama)


def test_inspect_table(artifacts):
    result = ok("inspect", artifacts["sym"])
    assert "bits_per_weight_linears" in result.stdout and "LlamaAdapter" in result.stdout


@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_verify(mode, artifacts):
    result = ok("verify", artifacts[mode])
    assert result.stdout.startswith("ok ")
    assert "intact" in result.stdout
    report = ok_json("verify", artifacts[mode])
    assert report["ok"] is True and report["tensors"] > 0 and report["files"] > 0


def _eval(model, base, data, *extra):
    return ok_json("eval", model, "--base", base, "--data", data, "--windows", "4", "--window-len", "64", *extra)


@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_eval_quantized_against_base(mode, artifacts, tiny_llama, text_file):
    result = _eval(artifacts[mode], tiny_llama, text_file)
    assert result["windows"] == 4 and result["window_len"] == 64
    assert result["tokens"] == 4 * 63  # no BOS inserted: every position but the first is predicted
    for key in ("ppl", "base_ppl", "nll"):
        assert math.isfinite(result[key]), key
    assert result["ppl"] > 1 and result["base_ppl"] > 1
    assert math.isfinite(result["kl"]) and result["kl"] > 0  # quantized: its distribution differs from the base's
    assert result["ppl"] != result["base_ppl"]
    assert result["size_bytes"] == (artifacts[mode] / "model.safetensors").stat().st_size
    assert result["data"]["samples"] == 4 and len(result["data"]["sha256"]) == 64


def test_eval_base_against_itself(tiny_llama, text_file):
    result = _eval(tiny_llama, tiny_llama, text_file)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=1e-6)


def test_eval_without_base_has_no_kl(artifacts, text_file):
    result = ok_json("eval", artifacts["sym"], "--data", text_file, "--windows", "2", "--window-len", "32")
    assert "kl" not in result and math.isfinite(result["ppl"])


def test_eval_report(artifacts, tiny_llama, text_file, tmp_path):
    report = tmp_path / "reports" / "eval.md"
    result = _eval(artifacts["asym"], tiny_llama, text_file, "--report", report)
    assert result["report"] == str(report)
    text = report.read_text()
    assert text.startswith("# Evaluation of")
    assert "| model | method | bits/weight | size | perplexity | KL to base |" in text
    assert "rtn" in text and "group_size=32" in text
    assert f"{result['ppl']:.3f}" in text and f"{result['kl']:.4f}" in text


def test_version():
    result = ok("--version")
    assert result.stdout.strip() == __version__


def test_assets_list_json_without_network(monkeypatch):
    from compressor.models import assets

    def no_network(*args, **kwargs):
        raise AssertionError("assets list must not fetch anything")

    monkeypatch.setattr(assets, "locate", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    rows = ok_json("assets", "list")
    names = {r["name"]: r for r in rows}
    assert {"smollm2-135m", "gemma3-270m", "wiki"} <= set(names)
    assert names["wiki"]["kind"] == "text" and names["smollm2-135m"]["kind"] == "model"
    assert not any(r["fetched"] for r in rows)  # the test cache is empty
    table = ok("assets", "list")
    assert "smollm2-135m" in table.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_errors_are_a_json_object_on_stdout(where, tmp_path):
    args = ["inspect", tmp_path / "nosuch"]
    result = cli(*(["--json", *args] if where == "before" else [*args, "--json"]))
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "does not exist" in error["message"] and error["hint"] and error["exit_code"] == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_usage_errors_under_json_are_json_too(tiny_llama, tmp_path):
    result = subprocess.run([*compress_command(), "quantize", str(tiny_llama), "-o", str(tmp_path / "q"),
                             "--no-such-flag", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--no-such-flag" in json.loads(result.stdout)["error"]["message"]


def test_console_script_json_on_stdout_only(tiny_llama, tmp_path):
    """The real `compress` process: --json puts one JSON document on stdout and nothing else there."""
    out = tmp_path / "q"
    result = subprocess.run([*compress_command(), "--json", "quantize", str(tiny_llama), "-o", str(out),
                             "--group-size", "32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["bits_per_weight"] == EXPECTED_BPW["sym"]
    assert "{" not in result.stderr  # the JSON went to stdout only

    result = subprocess.run([*compress_command(), "--json", "inspect", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kind"] == "quantized"
    result = subprocess.run([*compress_command(), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == __version__
