"""Activation-aware scale search (AWQ, SmoothQuant+): folding is exact, and the search helps
where activations have outlier channels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor import api
from compressor.methods.quant.scale_search import fold, scalable
from helpers import api_in_subprocess, artifact_files

CAL = dict(samples=16, seq_len=64)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma3"])
def test_folding_scales_keeps_the_float_model_exact(arch, request):
    loaded = api.load(request.getfixturevalue(arch))
    model, adapter = loaded.model, loaded.adapter
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        g = torch.Generator().manual_seed(1)
        for block in adapter.blocks(model):
            linears = adapter.block_linears(block)
            for group in filter(scalable, adapter.groups):
                features = linears[group.linears[0]].in_features
                s = torch.exp(torch.randn(features, generator=g))
                fold(block, group, {n: linears[n] for n in group.linears}, s, adapter.norm_weight_offset)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with a few input channels of every norm amplified ×30: activation outliers
    like those of real LLMs, which is what activation-aware scaling is for."""
    out = tmp_path_factory.mktemp("outlier-llama")
    for f in tiny_llama.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    state = load_file(out / "model.safetensors")
    for name, value in state.items():
        if name.endswith("layernorm.weight"):
            value[:4] *= 30
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _kl(model, base, data):
    return api.evaluate(str(model), base=str(base), data=str(data), windows=8, window_len=64)["kl"]


@pytest.mark.parametrize("method,opts", [("awq", {}), ("smoothquant+", {}), ("awq+gptq", {"act_order": True})])
def test_scale_search_beats_plain_quantization_on_outliers(method, opts, outlier_llama, text_file, tmp_path):
    scheme = {"bits": 3, "group_size": 32, "sym": False}
    plain = "gptq" if method == "awq+gptq" else "rtn"
    api.quantize(str(outlier_llama), method, tmp_path / "searched", {**scheme, **opts}, calib=str(text_file), **CAL)
    api.quantize(str(outlier_llama), plain, tmp_path / "plain", {**scheme, **opts}, calib=str(text_file), **CAL)
    assert _kl(tmp_path / "searched", outlier_llama, text_file) < _kl(tmp_path / "plain", outlier_llama, text_file)
    # The folded norms travel with the artifact: the searched one's norms changed, the plain one's did not.
    source = load_file(outlier_llama / "model.safetensors")
    norms = [k for k in source if k.endswith("layernorm.weight")]
    searched, unsearched = (load_file(tmp_path / d / "model.safetensors") for d in ("searched", "plain"))
    assert all(torch.equal(unsearched[k], source[k]) for k in norms)
    assert sum(not torch.equal(searched[k], source[k]) for k in norms) == len(norms)


def test_awq_is_deterministic_and_resumes_after_sigkill_to_identical_bytes(tiny_llama, text_file, tmp_path):
    opts = {"bits": 4, "group_size": 32}
    api.quantize(str(tiny_llama), "awq", tmp_path / "a", opts, calib=str(text_file), **CAL)
    api.quantize(str(tiny_llama), "awq", tmp_path / "b", opts, calib=str(text_file), **CAL)
    assert artifact_files(tmp_path / "a") == artifact_files(tmp_path / "b")
    out = tmp_path / "killed"
    killed = api_in_subprocess("quantize", tiny_llama, "awq", out, opts, calib=text_file, kill_after=0, **CAL)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and (api.run_directory_for(out) / "block-0000.safetensors").exists()
    resumed = api_in_subprocess("quantize", tiny_llama, "awq", out, opts, calib=text_file, resume=True, **CAL)
    assert resumed.returncode == 0, resumed.stderr
    assert artifact_files(out) == artifact_files(tmp_path / "a")


def test_unknown_search_option_is_an_error(tiny_llama, tmp_path):
    from compressor.errors import CompressorError
    with pytest.raises(CompressorError, match="grid"):
        api.quantize(str(tiny_llama), "awq", tmp_path / "x", {"grid": 1})
