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
