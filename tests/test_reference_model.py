"""End to end on the real reference assets (minutes; run with `pytest -m slow`)."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.models import assets

pytestmark = pytest.mark.slow


def test_reference_assets_are_converted_and_split():
    model_dir = api.fetch_assets(["smollm2-135m", "wiki"])[0]["path"]
    info = api.inspect("smollm2-135m")
    assert info["layers"] == 30 and info["hidden_size"] == 576 and info["params"] == 134_515_008
    meta = json.loads((assets.text_dir("wiki") / "meta.json").read_text())
    assert meta["splits"]["eval"]["documents"] * 9 < meta["splits"]["calib"]["documents"] < \
        meta["splits"]["eval"]["documents"] * 10
    calib = {json.loads(line)["title"] for line in (assets.text_dir("wiki") / "calib.jsonl").open()}
    held_out = {json.loads(line)["title"] for line in (assets.text_dir("wiki") / "eval.jsonl").open()}
    assert not calib & held_out
    assert api.fetch_assets(["smollm2-135m"])[0]["path"] == model_dir  # idempotent


def test_rtn_w4_g64_on_the_reference_model(tmp_path):
    """RTN 4-bit g64 with integer zero points raises perplexity by roughly a third."""
    out = tmp_path / "rtn"
    summary = api.quantize("smollm2-135m", "rtn", out, {"bits": 4, "group_size": 64, "sym": False})
    assert summary["bits_per_weight"] == pytest.approx(4.3125)
    assert api.verify(out)["ok"]
    result = api.evaluate(str(out), base="smollm2-135m", windows=8)
    assert 1.1 * result["base_ppl"] < result["ppl"] < 1.6 * result["base_ppl"]
    assert 0.1 < result["kl"] < 1.0
    assert 10 < result["base_ppl"] < 25


def test_transformers_loads_the_reference_artifact(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rtn-sym"
    api.quantize("smollm2-135m", "rtn", out, {"bits": 4, "group_size": 64, "sym": True})
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        ours = api.load(out).model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_gemma3_reference_model(tmp_path):
    api.fetch_assets(["gemma3-270m"])
    out = tmp_path / "gemma"
    api.quantize("gemma3-270m", "rtn", out, {"bits": 4, "group_size": 64, "sym": False})
    result = api.evaluate(str(out), base="gemma3-270m", windows=4)
    assert result["base_ppl"] < result["ppl"] < 2 * result["base_ppl"]
    assert result["kl"] > 0
