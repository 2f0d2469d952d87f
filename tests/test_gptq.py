"""GPTQ on single layers and through the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize, split_rows
from compressor.safetensors_file import read_header
from compressor.methods.quant.quantizer import dequantize_record, quantize_weight


def _layer(seed=0, rows=64, cols=128, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (0.3 * torch.randn(cols, cols, generator=g))
    x += 2 * torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), x


def _output_error(x, w, record):
    return (x @ (w - dequantize_record(record, torch.float32)).T).pow(2).mean().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_output_error_well_below_rtn(act_order, sym, bits):
    w, x = _layer()
    config = GPTQConfig(bits=bits, group_size=32, sym=sym, act_order=act_order, scale_dtype="float32")
    record, _ = gptq_quantize(w, x.T @ x / x.shape[0], config)
    assert record["qweight"].min() >= config.scheme().qmin and record["qweight"].max() <= config.scheme().qmax
    rtn = quantize_weight(w, config.scheme())
    assert _output_error(x, w, record) < 0.7 * _output_error(x, w, rtn)


def test_singular_hessian_gets_more_dampening_not_nan():
    w, x = _layer(tokens=16)  # rank 16 of 128: singular
    h = x.T @ x / x.shape[0]
    h[5, :] = h[:, 5] = 0  # a dead input channel
    record, damp = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=32, damp=1e-8))
    assert damp > 1e-8
    assert torch.isfinite(dequantize_record(record, torch.float32)).all()


def test_nan_activations_are_a_clear_error():
    w, x = _layer()
    h = x.T @ x
    h[0, 0] = float("nan")
    with pytest.raises(CompressorError, match="q_proj has NaN"):
        gptq_quantize(w, h, GPTQConfig(), "q_proj")


def test_gptq_through_the_pipeline_beats_rtn(tiny_llama, text_file, tmp_path):
    cal = dict(calib=str(text_file), samples=16, seq_len=64)
    opts = {"bits": 3, "group_size": 32, "sym": False}
    api.quantize(str(tiny_llama), "gptq", tmp_path / "gptq", {**opts, "act_order": True}, **cal)
    api.quantize(str(tiny_llama), "gptq", tmp_path / "swept", {**opts, "static_groups": False}, **cal)
    api.quantize(str(tiny_llama), "rtn", tmp_path / "rtn", opts)
    results = {m: api.evaluate(str(tmp_path / m), base=str(tiny_llama), data=str(text_file), windows=8,
                               window_len=64)["kl"] for m in ("gptq", "rtn")}
    assert results["gptq"] < results["rtn"]
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    config = json.loads((tmp_path / "swept" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] is None
    header, _ = read_header(tmp_path / "swept" / "model.safetensors")
    assert not any(k.endswith("g_idx") for k in header)


def test_groups_fitted_during_the_sweep_differ_from_static_ones():
    w, x = _layer()
    h = x.T @ x / x.shape[0]
    static, _ = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=32))
    swept, _ = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=32, static_groups=False))
    assert "g_idx" not in static and "g_idx" not in swept
    assert not torch.equal(static["scale"], swept["scale"])
    assert _output_error(x, w, swept) < _output_error(x, w, quantize_weight(w, GPTQConfig().scheme()))


def test_act_order_without_static_groups_is_refused(tiny_llama, tmp_path):
    with pytest.raises(CompressorError, match="act-order needs static groups"):
        api.quantize(str(tiny_llama), "gptq", tmp_path / "x", {"act_order": True, "static_groups": False})


def test_stacked_group_equals_per_linear():
    """Linears sharing a Hessian are quantized as one stacked matrix; rows are independent."""
    w, x = _layer(rows=96)
    h = x.T @ x / x.shape[0]
    config = GPTQConfig(bits=4, group_size=32, act_order=True, sym=False)
    whole, _ = gptq_quantize(w, h, config)
    parts = split_rows(whole, [64, 32])
    first, _ = gptq_quantize(w[:64], h, config)
    for key in first:
        assert torch.equal(parts[0][key], first[key]), key


def test_float_target_fits_the_float_model_through_input_errors():
    """With quantized-path inputs X̃ = X + noise, GPTQ with the float target gets closer to the
    float model's outputs X Wᵀ than plain GPTQ, which fits X̃ Wᵀ."""
    w, x = _layer(tokens=4096)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * x.std(0)
    h, cross = noisy.T @ noisy / x.shape[0], noisy.T @ x / x.shape[0]
    config = GPTQConfig(bits=4, group_size=32)
    plain, _ = gptq_quantize(w, h, config)
    target, _ = gptq_quantize(w, h, config, cross=cross)

    def error(record):
        return (noisy @ dequantize_record(record, torch.float32).T - x @ w.T).pow(2).mean().item()
    assert error(target) < 0.9 * error(plain)


def test_float_target_through_the_pipeline_resumes_identically(tiny_llama, text_file, tmp_path, monkeypatch):
    from compressor.pipeline.sequential import SequentialPipeline
    cal = dict(calib=str(text_file), samples=8, seq_len=64)
    opts = {"bits": 4, "group_size": 32, "act_order": True, "fp_target": True}
    api.quantize(str(tiny_llama), "gptq", tmp_path / "clean", opts, **cal)
    original = SequentialPipeline._process_block
    calls = {"n": 0}

    def crash_on_third_block(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(SequentialPipeline, "_process_block", crash_on_third_block)
    with pytest.raises(RuntimeError):
        api.quantize(str(tiny_llama), "gptq", tmp_path / "resumed", opts, **cal)
    monkeypatch.setattr(SequentialPipeline, "_process_block", original)
    api.quantize(str(tiny_llama), "gptq", tmp_path / "resumed", opts, **cal, resume=True)
    assert (tmp_path / "clean" / "model.safetensors").read_bytes() == \
        (tmp_path / "resumed" / "model.safetensors").read_bytes()
    plain = tmp_path / "plain"
    api.quantize(str(tiny_llama), "gptq", plain, {**opts, "fp_target": False}, **cal)
    assert (plain / "model.safetensors").read_bytes() != (tmp_path / "clean" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("sym", [False, True])
def test_refitting_scales_lowers_the_output_error(sym):
    w, x = _layer(rows=48)
    h = x.T @ x / x.shape[0]
    base = GPTQConfig(bits=3, group_size=32, sym=sym, act_order=True, scale_dtype="float32")
    plain, _ = gptq_quantize(w, h, base.model_copy(update={"refit_scales": False}))
    refit, _ = gptq_quantize(w, h, base)
    assert torch.equal(plain["qweight"], refit["qweight"])  # same codes, better scales
    assert _output_error(x, w, refit) < 0.97 * _output_error(x, w, plain)
