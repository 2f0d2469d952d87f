"""RTN: codes, scales and error behave as the scheme says."""

from __future__ import annotations

import pytest
import torch

from compressor.methods.quant.quantizer import dequantize_record, quantize_weight
from compressor.schemes import WeightScheme


def _error(w, scheme):
    return (dequantize_record(quantize_weight(w, scheme), torch.float32) - w).pow(2).mean().item()


@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_and_error_falls_with_bits(sym):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(2, 9):
        scheme = WeightScheme(bits, 32, sym, "float32")
        record = quantize_weight(w, scheme)
        assert record["qweight"].dtype == torch.int8
        assert int(record["qweight"].min()) >= scheme.qmin and int(record["qweight"].max()) <= scheme.qmax
        assert record["scale"].shape == (64, 4)
        assert ("zero_point" in record) == (not sym)
        errors.append(_error(w, scheme))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_smaller_groups_and_zero_points_reduce_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) + 0.3
    per_channel = _error(w, WeightScheme(4, -1, False, "float32"))
    g128 = _error(w, WeightScheme(4, 128, False, "float32"))
    g32 = _error(w, WeightScheme(4, 32, False, "float32"))
    assert per_channel > g128 > g32
    assert _error(w, WeightScheme(3, 32, True, "float32")) > _error(w, WeightScheme(3, 32, False, "float32"))


def test_exactly_representable_weights_survive():
    scheme = WeightScheme(4, 16, False, "float32")
    codes = torch.randint(-8, 8, (8, 32), generator=torch.Generator().manual_seed(2)).float()
    codes[:, ::16] = -8  # each group spans the full range so min-max finds the same grid
    codes[:, 1::16] = 7
    w = codes * 0.125
    assert _error(w, scheme) == 0.0


def test_zero_rows_do_not_produce_nan():
    w = torch.zeros(4, 64)
    for sym in (True, False):
        out = dequantize_record(quantize_weight(w, WeightScheme(4, 32, sym)), torch.float32)
        assert torch.equal(out, w)


def test_keep_dtype_stores_unquantized_tensors_in_16_bits(tiny_llama, tmp_path):
    """--keep-dtype bfloat16: embeddings and norms in bfloat16, quantized tensors unchanged, a
    smaller artifact that our loader and transformers load alike."""
    from transformers import AutoModelForCausalLM

    from compressor import api
    from compressor.errors import CompressorError
    from compressor.safetensors_file import read_header

    opts = {"group_size": 32}
    api.quantize(str(tiny_llama), "rtn", tmp_path / "source", opts)
    api.quantize(str(tiny_llama), "rtn", tmp_path / "bf16", opts, keep_dtype=torch.bfloat16)
    source, _ = read_header(tmp_path / "source" / "model.safetensors")
    kept, _ = read_header(tmp_path / "bf16" / "model.safetensors")
    assert source["model.embed_tokens.weight"].dtype == "F32" and kept["model.embed_tokens.weight"].dtype == "BF16"
    assert kept["model.norm.weight"].dtype == "BF16"
    assert {k: v.dtype for k, v in kept.items() if "weight_" in k} == {k: v.dtype for k, v in source.items()
                                                                      if "weight_" in k}
    sizes = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("source", "bf16")}
    assert sizes["bf16"] < sizes["source"]
    ours = api.load(tmp_path / "bf16").model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(CompressorError, match="--keep-dtype"):
        api.quantize(str(tiny_llama), "rtn", tmp_path / "bad", opts, keep_dtype=torch.int8)
