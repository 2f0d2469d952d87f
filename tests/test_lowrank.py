"""Low-rank compensation (GPTQ's `lowrank`, EoRA-style): the correction fitted in the eigenspace of
the inputs lowers the output error more than a plain SVD of the error, its bits are counted, the
artifact stores it as two bfloat16 factors that our loaders apply, and transformers loads the rest."""

from __future__ import annotations

import pytest
import torch

from compressor import api
from compressor.formats import artifact as artifacts
from compressor.formats import quant_runtime
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize
from compressor.methods.quant.lowrank import compensate, eigen_lowrank, lowrank_bits, lowrank_weight
from compressor.methods.quant.quantizer import dequantize_record
from compressor.safetensors_file import read_header


def _layer(seed=0, rows=96, cols=128, tokens=4096):
    g = torch.Generator().manual_seed(seed)
    # Inputs with a few strong directions, as real activations have.
    x = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols))
    return torch.randn(rows, cols, generator=g), x


def _output_error(x, error):
    return (x @ error.T).pow(2).mean().item()


def test_eigenspace_correction_beats_plain_svd_and_shrinks_with_rank():
    w, x = _layer()
    h = x.T @ x / x.shape[0]
    record, _ = gptq_quantize(w, h, GPTQConfig(bits=3, group_size=32, sym=False))
    error = w - dequantize_record(record, torch.float32)
    before = _output_error(x, error)
    errors = []
    for rank in (2, 8, 32):
        b, a = eigen_lowrank(error, h, rank)
        assert b.dtype == a.dtype == torch.bfloat16 and b.shape == (96, rank) and a.shape == (rank, 128)
        errors.append(_output_error(x, error - lowrank_weight(b, a)))
        u, s, vh = torch.linalg.svd(error)
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert errors[-1] < _output_error(x, error - plain)
    assert before > errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * before


def test_compensate_records_the_factors_and_returns_the_effective_weight():
    w, x = _layer(seed=1)
    h = x.T @ x / x.shape[0]
    record, _ = gptq_quantize(w, h, GPTQConfig(bits=2, group_size=32, sym=False))
    quantized = dequantize_record(record, torch.float32)
    weight = compensate(record, w, quantized, h, 4)
    torch.testing.assert_close(weight, quantized + record["lowrank_b"].float() @ record["lowrank_a"].float())
    assert _output_error(x, w - weight) < _output_error(x, w - quantized)


def test_lowrank_bits():
    assert lowrank_bits(8, 576, 576) == pytest.approx(16 * 8 * 1152 / 576 ** 2)


def test_artifact_stores_the_factors_and_our_loaders_apply_them(tiny_llama, text_file, tmp_path):
    cal = dict(calib=str(text_file), samples=16, seq_len=64)
    opts = {"bits": 3, "group_size": 32, "sym": False, "act_order": True}
    plain = api.quantize(str(tiny_llama), "gptq", tmp_path / "plain", opts, **cal)
    ranked = api.quantize(str(tiny_llama), "gptq", tmp_path / "ranked", {**opts, "lowrank": 4}, **cal)
    header, _ = read_header(tmp_path / "ranked" / "model.safetensors")
    factors = [k for k in header if k.endswith(("weight_lowrank_a", "weight_lowrank_b"))]
    assert factors and all(header[k].dtype == "BF16" for k in factors)
    # Every quantized linear has both factors, and their bits are counted.
    assert len(factors) == 2 * sum(k.endswith("weight_packed") for k in header)
    assert ranked["bits_per_weight"] > plain["bits_per_weight"] + 0.5
    kl = {m: api.evaluate(str(tmp_path / m), base=str(tiny_llama), data=str(text_file), windows=8,
                          window_len=64)["kl"] for m in ("plain", "ranked")}
    assert kl["ranked"] < kl["plain"]
    # The QuantLinear loader (reference path on CPU) computes what the float loader computes.
    expected = api.load(tmp_path / "ranked").model
    config = artifacts.read_config(tmp_path / "ranked")
    qconfig = config.pop("quantization_config")
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = quant_runtime.build_quantized_model(hf_config, artifacts.load_tensors(tmp_path / "ranked"), qconfig,
                                                torch.float32, torch.device("cpu"), print)
    assert any(isinstance(m, quant_runtime.LowRankCorrected) for m in model.modules())
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-4)


def test_transformers_loads_a_compensated_artifact_without_the_correction(tiny_llama, text_file, tmp_path):
    """Plain transformers (symmetric artifact, the layout it loads) ignores the factors: it computes Q alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cal = dict(calib=str(text_file), samples=16, seq_len=64)
    api.quantize(str(tiny_llama), "gptq", tmp_path / "q", {"bits": 4, "group_size": 32, "lowrank": 2}, **cal)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    config = artifacts.read_config(tmp_path / "q")
    qconfig = config.pop("quantization_config")
    tensors = {k: v for k, v in artifacts.load_tensors(tmp_path / "q").items() if "lowrank" not in k}
    uncorrected = quant_runtime.build_quantized_model(AutoConfig.for_model(config.pop("model_type"), **config),
                                                      tensors, qconfig, torch.float32, torch.device("cpu"), print)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, uncorrected(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(theirs(ids).logits, api.load(tmp_path / "q").model(ids).logits)


def test_damaged_factors_are_named(tiny_llama, text_file, tmp_path):
    cal = dict(calib=str(text_file), samples=16, seq_len=64)
    api.quantize(str(tiny_llama), "gptq", tmp_path / "q", {"bits": 4, "group_size": 32, "lowrank": 2}, **cal)
    tensors = artifacts.load_tensors(tmp_path / "q")
    name = next(k for k in tensors if k.endswith("weight_lowrank_a"))
    tensors[name] = tensors[name][:, :-1]
    qconfig = artifacts.read_config(tmp_path / "q")["quantization_config"]
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="low-rank factors"):
        quant_runtime.quantized_linears(tensors, qconfig, torch.float32, torch.device("cpu"), print)


def test_passes_on_the_residual_lower_the_error_further():
    """GPTQ on W − BA, then B A refitted, beats correcting GPTQ's error once (the lowrank_passes)."""
    from compressor.methods.quant.gptq import GPTQ

    w, x = _layer(seed=2)
    h = x.T @ x / x.shape[0]
    linear = torch.nn.Linear(128, 96, bias=False)
    errors = {}
    for passes in (0, 2):
        method = GPTQ(GPTQConfig(bits=3, group_size=32, sym=False, lowrank=4, lowrank_passes=passes))
        record, _ = gptq_quantize(w, h, method.config)
        linear.weight.data = w.clone()
        records = method._compensated(w, {"l": record}, h, ["l"], {"l": linear}, None)
        effective = dequantize_record(records["l"], torch.float32) + lowrank_weight(records["l"]["lowrank_b"],
                                                                                   records["l"]["lowrank_a"])
        torch.testing.assert_close(linear.weight.data, effective)
        errors[passes] = _output_error(x, w - effective)
    assert errors[2] < errors[0]
