"""The engine drives lists of methods through their hooks: order, composition (AWQ then GPTQ,
slice then quantize), pruning with per-block checkpoints that resume byte-identically after a
SIGKILL, and one-line errors for lists that cannot run in one pass or options none of them has."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.methods.base import METHODS, Method, MethodConfig
from helpers import api_in_subprocess, artifact_files, assert_cli_error, cli

CAL = {"samples": 16, "seq_len": 64}
HERE = Path(__file__).parent


# ---------------------------------------------------------------- hooks and their order


class _HookLog(Method):
    """Records every hook the engine calls, with what the context offers there."""

    name = "test-hook-log"
    Config = MethodConfig
    needs_calibration = True
    calls: list[tuple] = []

    def on_start(self, ctx):
        _HookLog.calls.append(("on_start", tuple(ctx.hidden.shape), ctx.calibration_tokens))

    def on_block_start(self, ctx):
        _HookLog.calls.append(("on_block_start", ctx.index, ctx.prefix))

    def on_group(self, ctx, group, linears):
        _HookLog.calls.append(("on_group", ctx.index, group.name, tuple(linears)))
        return {}

    def on_block_end(self, ctx):
        _HookLog.calls.append(("on_block_end", ctx.index))

    def on_end(self, ctx):
        _HookLog.calls.append(("on_end",))


@pytest.fixture
def hook_log():
    if _HookLog.name not in METHODS:
        METHODS.register(_HookLog.name)(_HookLog)
    _HookLog.calls = []
    return _HookLog


def test_hooks_run_in_order_for_every_block_and_group(hook_log, tiny_llama, text_file, tmp_path):
    api.quantize(str(tiny_llama), f"{hook_log.name},rtn", tmp_path / "q", {"group_size": 32},
                 calib=str(text_file), **CAL)
    calls = hook_log.calls
    assert calls[0] == ("on_start", (16, 64, 64), 16 * 64) and calls[-1] == ("on_end",)
    groups = ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    expected = []
    for index in range(3):
        expected.append(("on_block_start", index, f"model.layers.{index}."))
        for group, linears in zip(groups, [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                           ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                           ("mlp.down_proj",)]):
            expected.append(("on_group", index, group, linears))
        expected.append(("on_block_end", index))
    assert calls[1:-1] == expected


def test_awq_then_gptq_is_a_list_under_its_name(tiny_llama, text_file, tmp_path):
    options = {"bits": 4, "group_size": 32, "grid": 5, "search_samples": 4}
    named = api.quantize(str(tiny_llama), "awq+gptq", tmp_path / "named", options, calib=str(text_file), **CAL)
    listed = api.quantize(str(tiny_llama), "awq,gptq", tmp_path / "listed", options, calib=str(text_file), **CAL)
    assert [m["name"] for m in named["method"]["methods"]] == ["awq", "gptq"]
    assert (tmp_path / "named" / "model.safetensors").read_bytes() == \
        (tmp_path / "listed" / "model.safetensors").read_bytes()
    assert listed["method"]["config"]["grid"] == 5 and listed["method"]["config"]["act_order"] is False


def test_a_transform_alone_gets_its_default_quantizer(tiny_llama, text_file, tmp_path):
    result = api.quantize(str(tiny_llama), "smoothquant", tmp_path / "q", calib=str(text_file), **CAL)
    assert [m["name"] for m in result["method"]["methods"]] == ["smoothquant", "w8a8"]


def test_slice_then_quantize_in_one_pass(tiny_llama, text_file, tmp_path):
    out = tmp_path / "q"
    result = api.quantize(str(tiny_llama), "slicegpt,gptq", out, {"sparsity": 0.25, "group_size": 16},
                          calib=str(text_file), **CAL)
    config = json.loads((out / "config.json").read_text())
    assert "slicing" in config and config["quantization_config"]["format"] == "pack-quantized"
    # (per-block slicing of a tiny tied model adds shortcut matrices and an untied head: no param check)
    assert result["bits_per_weight"] == pytest.approx(4 + 16 / 16)
    loaded = api.load(out)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized = loaded.model(ids).logits
    sliced = api.prune(str(tiny_llama), "slicegpt", tmp_path / "s", 0.25, calib=str(text_file), **CAL)
    with torch.no_grad():
        reference = api.load(sliced["output"]).model(ids).logits
    assert torch.isfinite(quantized).all()
    # The quantized sliced model stays close to the sliced one (same structure, 4-bit weights).
    assert (quantized - reference).pow(2).mean() < 0.25 * reference.pow(2).mean()


@pytest.mark.parametrize("spec, phrase", [
    ("gptq,awq", "cannot run in one pass"),
    ("rtn,slicegpt", "cannot run in one pass"),
    ("rtn,gptq", "more than one quantizer"),
    ("slicegpt,modegpt", "more than one pruner"),
    ("gptq,nonsense", "unknown method 'nonsense'"),
    ("awq,,gptq", "empty method name"),
])
def test_lists_that_cannot_run_in_one_pass_are_refused_before_any_work(spec, phrase, tiny_llama, tmp_path):
    assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "q", "--method", spec), phrase)
    assert list(tmp_path.iterdir()) == []


def test_options_no_method_in_the_list_has_are_refused_with_the_valid_ones(tiny_llama, tmp_path):
    message = assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "q", "--method", "rtn",
                                   "--opt", "nonsense=1"), "option nonsense does not apply to rtn")
    assert "valid options: bits, group_size, scale_dtype, sym" in message
    assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "q", "--method", "rtn", "--act-order"),
                     "option act_order does not apply to rtn")


def test_opt_pairs_reach_the_method(tiny_llama, tmp_path):
    result = cli("--json", "quantize", tiny_llama, "-o", tmp_path / "q", "--opt", "group_size=32", "--opt",
                 "sym=false")
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)["method"]["config"]
    assert config["group_size"] == 32 and config["sym"] is False


# ---------------------------------------------------------------- pruning resumes byte-identically


def _prune_process(model, method, options, data, out, resume, kill_after=None):
    return api_in_subprocess("prune", model, method, out, 0.25, options, calib=data, resume=resume,
                             kill_after=kill_after, **CAL)


# The global-rotation and slicegpt,gptq variants resume through the same per-block checkpoints:
# `-m slow` (and the kill campaign, benchmarks/faults.py) keep them covered, the default run stays short.
@pytest.mark.parametrize("method, options", [
    ("slicegpt", {}), pytest.param("slicegpt", {"rotation": "global"}, marks=pytest.mark.slow),
    ("modegpt", {}), pytest.param("slicegpt,gptq", {"group_size": 16}, marks=pytest.mark.slow)])
def test_sigkilled_pruning_resumes_to_identical_artifact(method, options, tiny_llama, text_file, tmp_path):
    clean = tmp_path / "clean"
    assert _prune_process(tiny_llama, method, options, text_file, clean, False).returncode == 0
    out = tmp_path / "killed"
    killed = _prune_process(tiny_llama, method, options, text_file, out, False, kill_after=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and api.run_directory_for(out).exists()
    resumed = _prune_process(tiny_llama, method, options, text_file, out, True)
    assert resumed.returncode == 0, resumed.stderr
    assert artifact_files(out) == artifact_files(clean)
