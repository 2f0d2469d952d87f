"""Every registered architecture adapter passes the same checks on a tiny random model: quantize
(calibrated), slice (or a clear refusal where the architecture cannot be sliced), evaluate, and
reload in transformers with the logits of our own reader. A new adapter must add its tiny model
here, or the coverage check fails."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.models.adapters import ADAPTERS
from conftest import make_gemma3, make_llama, make_qwen3_moe

MAKERS = {"llama": make_llama, "gemma3": make_gemma3, "moe": make_qwen3_moe}
CAL = {"samples": 16, "seq_len": 64}


def test_every_registered_adapter_has_a_tiny_model_here():
    assert set(ADAPTERS.names()) == set(MAKERS)


@pytest.fixture(scope="module", params=sorted(MAKERS))
def tiny(request, tmp_path_factory):
    return request.param, MAKERS[request.param](tmp_path_factory.mktemp(request.param))


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))


def test_quantize_evaluate_and_reload(tiny, text_file, tmp_path):
    name, model = tiny
    out = tmp_path / "q"
    result = api.quantize(str(model), "gptq", out, {"group_size": 16}, calib=str(text_file), **CAL)
    assert result["bits_per_weight"] == pytest.approx(5.0)
    evaluated = api.evaluate(str(out), str(model), data=str(text_file), windows=2, window_len=32)
    assert math.isfinite(evaluated["ppl"]) and evaluated["kl"] >= 0
    ours = api.load(out).model
    with torch.no_grad():
        logits = ours(_ids()).logits
    assert torch.isfinite(logits).all()
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, logits, atol=1e-4, rtol=1e-4)


def test_slice_or_refuse(tiny, text_file, tmp_path):
    name, model = tiny
    out = tmp_path / "s"
    if name == "moe":
        with pytest.raises(CompressorError, match="does not prune mixture-of-experts"):
            api.prune(str(model), "slicegpt", out, 0.25, calib=str(text_file), **CAL)
        assert not out.exists()
        return
    api.prune(str(model), "slicegpt", out, 0.25, {"rotation": "global", "probe": 0}, calib=str(text_file), **CAL)
    assert json.loads((out / "config.json").read_text())["model_type"] != "compressor_sliced"
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, api.load(out).model(_ids()).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- mixtures of experts


def test_experts_are_calibrated_on_their_own_tokens(tiny_moe, text_file, tmp_path, monkeypatch):
    from compressor.methods.quant import gptq

    seen = {}
    original = gptq.too_few_tokens

    def spy(ctx, group, linears, stats):
        seen[f"{ctx.index}.{group.name}"] = int(stats["tokens"])
        return original(ctx, group, linears, stats)

    monkeypatch.setattr(gptq, "too_few_tokens", spy)
    api.quantize(str(tiny_moe), "gptq", tmp_path / "q", {"group_size": 16}, calib=str(text_file), **CAL)
    tokens = CAL["samples"] * CAL["seq_len"]
    for block in range(2):
        experts_in = [seen[f"{block}.expert{e}_in"] for e in range(8)]
        assert seen[f"{block}.attn_in"] == tokens
        assert sum(experts_in) == 2 * tokens  # each token reaches its top-2 experts, and only those
        assert [seen[f"{block}.expert{e}_out"] for e in range(8)] == experts_in


def test_expert_without_tokens_falls_back_to_rtn_and_says_so(tiny_moe, text_file, tmp_path, monkeypatch):
    from compressor.pipeline import context

    collect = context.BlockSession._collect

    def collect_starving(self, groups, kinds, record=None):  # as if the router never chose expert 3
        result = collect(self, groups, kinds, record)
        for group in groups:
            if group.name == "expert3_in":
                result[group.name] = {k: torch.zeros_like(v) for k, v in result[group.name].items()}
        return result

    monkeypatch.setattr(context.BlockSession, "_collect", collect_starving)
    out = tmp_path / "q"
    api.quantize(str(tiny_moe), "gptq", out, {"group_size": 16}, calib=str(text_file), **CAL)
    fallbacks = json.loads((out / "manifest.json").read_text())["metrics"]["fallbacks"]
    assert set(fallbacks) == {f"model.layers.{b}.mlp.experts.3.gate_proj/mlp.experts.3.up_proj" for b in range(2)}
    assert all("round-to-nearest: 0 calibration tokens" in v for v in fallbacks.values())
    with torch.no_grad():
        assert torch.isfinite(api.load(out).model(_ids()).logits).all()


def test_moe_round_trips_the_checkpoint_layout(tiny_moe, tmp_path):
    """Loading unfuses the experts into one linear each, under the checkpoint's own names, with
    the same logits as transformers' fused model."""
    from transformers import AutoModelForCausalLM

    loaded = api.load(str(tiny_moe))
    names = set(loaded.model.state_dict())
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in names
    reference = AutoModelForCausalLM.from_pretrained(tiny_moe).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_ids()).logits, reference(_ids()).logits, atol=1e-5, rtol=1e-5)
