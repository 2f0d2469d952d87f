"""HQQ-style quantization: calibration-free, lower lp error than RTN's min-max grid, the same
stored layout (loads in transformers), deterministic."""

from __future__ import annotations

import pytest
import torch

from compressor import api
from compressor.methods.quant.hqq import HQQConfig, hqq_qparams
from compressor.methods.quant.quantizer import compute_qparams, dequantize_record, make_record


def _heavy_tailed(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    outliers = torch.rand(rows, cols, generator=g) < 0.01
    return torch.where(outliers, w * 12, w)


def _lp_error(w: torch.Tensor, record: dict, p: float) -> float:
    return (w - dequantize_record(record, torch.float32)).abs().pow(p).sum().item()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_lower_lp_error_than_rtn(sym, bits):
    config = HQQConfig(bits=bits, group_size=64, sym=sym)
    scheme = config.scheme()
    for seed in range(3):
        w = _heavy_tailed(seed=seed)
        rtn = make_record(w, *compute_qparams(w, scheme), scheme)
        hqq = make_record(w, *hqq_qparams(w, scheme, config), scheme)
        assert _lp_error(w, hqq, config.lp) < 0.97 * _lp_error(w, rtn, config.lp)
        # the codes stay on the format's grid, scales in their storage dtype
        assert hqq["qweight"].min() >= scheme.qmin and hqq["qweight"].max() <= scheme.qmax
        assert hqq["scale"].dtype == torch.float16
        if not sym:
            assert hqq["zero_point"].dtype == torch.int8


def test_one_iteration_never_does_worse_than_rtn():
    config = HQQConfig(bits=4, group_size=64, iters=1)
    w = _heavy_tailed(seed=5)
    scheme = config.scheme()
    rtn = make_record(w, *compute_qparams(w, scheme), scheme)
    hqq = make_record(w, *hqq_qparams(w, scheme, config), scheme)
    assert _lp_error(w, hqq, config.lp) <= _lp_error(w, rtn, config.lp)


def test_artifact_loads_in_transformers_and_is_deterministic(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    a = api.quantize(str(tiny_llama), "hqq", tmp_path / "a", {"group_size": 32})
    api.quantize(str(tiny_llama), "hqq", tmp_path / "b", {"group_size": 32})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["bits_per_weight"] == pytest.approx(4.5)
    ours = api.load(tmp_path / "a").model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_hqq_needs_no_calibration(tiny_llama, tmp_path):
    result = api.quantize(str(tiny_llama), "hqq", tmp_path / "q", {"group_size": 32}, calib="/nonexistent")
    assert result["method"]["name"] == "hqq"
