"""SmoothQuant W8A8 and FP8: smoothing invariance, determinism, compressed-tensors int-quantized and
float-quantized artifacts that transformers loads with the same logits as our simulation, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.formats import activations
from compressor.formats.artifact import load_tensors
from compressor.formats.manifest import verify
from compressor.methods.quant.smoothquant import fold_smoothing, smoothing_scales
from helpers import cli
from test_bad_input import assert_cli_error

pytest.importorskip("compressed_tensors")

CASES = [("smoothquant", {"alpha": 0.5}), ("fp8", {}), ("fp8", {"act_static": True})]
CALIB = {"samples": 8, "seq_len": 64}


@pytest.fixture(scope="module")
def artifacts(tiny_llama, text_file, tmp_path_factory):
    """One artifact per case, built once for the module."""
    root = tmp_path_factory.mktemp("w8a8")
    out = {}
    for method, options in CASES:
        path = root / f"{method}-{len(options)}-{options.get('act_static', '')}"
        summary = api.quantize(str(tiny_llama), method, path, options, calib=str(text_file), **CALIB)
        out[(method, bool(options.get("act_static")))] = (path, summary)
    return out


def ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- smoothing alone is exact

@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma3"])
def test_smoothing_leaves_the_float_model_unchanged(arch, request):
    """Folding s into the norm and the linears computes the same function (Llama w·x̂ norms and
    Gemma's (1 + w)·x̂ norms), with outlier-heavy scales far from 1."""
    loaded = api.load(str(request.getfixturevalue(arch)))
    model, adapter = loaded.model, loaded.adapter
    with torch.no_grad():
        before = model(ids()).logits
    gen = torch.Generator().manual_seed(1)
    changed = 0
    for block in adapter.blocks(model):
        linears = adapter.block_linears(block)
        for group in adapter.groups:
            if group.norm is None:
                continue
            mods = [linears[n] for n in group.linears]
            absmax = torch.rand(mods[0].in_features, generator=gen) * 50 + 0.1
            absmax[:3] *= 100  # outlier channels
            scales = smoothing_scales(absmax, [m.weight for m in mods], 0.5)
            assert scales.max() / scales.min() > 10
            norm = block.get_submodule(group.norm)
            old = norm.weight.clone()
            fold_smoothing(norm, mods, scales, adapter.norm_weight_offset)
            changed += int(not torch.equal(old, norm.weight))
    assert changed == 2 * len(adapter.blocks(model))
    with torch.no_grad():
        after = model(ids()).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_smoothing_scales_follow_the_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -0.25, 2.0, 0.0], [0.5, 1.0, -1.0, 0.0]])
    s = smoothing_scales(act, [w], 0.5)
    # s = sqrt(act) / sqrt(max|w|); zero activation or zero weight column keeps 1
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, [w], 1.0)[:2], torch.tensor([4.0, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, [w], 0.0)[:2], torch.tensor([1.0, 1.0]))


# ---------------------------------------------------------------- artifacts

@pytest.mark.parametrize("case", [("smoothquant", False), ("fp8", False), ("fp8", True)])
def test_artifact_layout_and_bits(case, artifacts):
    path, summary = artifacts[case]
    assert verify(path) == []
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    kind = "int" if case[0] == "smoothquant" else "float"
    assert config["format"] == ("int-quantized" if kind == "int" else "float-quantized")
    assert (group["weights"]["type"], group["weights"]["strategy"]) == (kind, "channel")
    inputs = group["input_activations"]
    assert (inputs["type"], inputs["strategy"], inputs["dynamic"]) == \
        ((kind, "tensor", False) if case[1] else (kind, "token", True))
    tensors = load_tensors(path)
    q = "model.layers.0.self_attn.q_proj."
    assert tensors[q + "weight"].dtype == (torch.int8 if kind == "int" else torch.float8_e4m3fn)
    assert tensors[q + "weight_scale"].shape == (64, 1) and tensors[q + "weight_scale"].dtype == torch.float32
    assert (q + "input_scale" in tensors) == case[1]
    assert "lm_head.weight_scale" not in tensors
    # 8-bit codes + one float32 scale per row of 64 (attention, gate/up) or 128 (down) inputs
    assert 8 + 32 / 64 > summary["bits_per_weight"] > 8 + 32 / 128


@pytest.mark.parametrize("case", [("smoothquant", False), ("fp8", False), ("fp8", True)])
def test_transformers_gives_the_same_logits_as_our_simulation(case, artifacts):
    """transformers + compressed-tensors (which quantizes the linears' inputs itself) and our loader
    with its simulated input quantization agree to float32 rounding (measured: identical)."""
    from transformers import AutoModelForCausalLM

    path, _ = artifacts[case]
    ours = api.load(path).model
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = theirs(ids()).logits
        torch.testing.assert_close(ours(ids()).logits, expected, rtol=1e-6, atol=1e-6)
        # The input quantization is real: switching it off in transformers changes the logits.
        for m in theirs.modules():
            m.quantization_enabled = False
        assert (theirs(ids()).logits - expected).abs().max() > 1e-4


@pytest.mark.parametrize("case", [("smoothquant", False), ("fp8", False)])
def test_reader_round_trips_codes_and_scales(case, artifacts, tiny_llama):
    path, _ = artifacts[case]
    tensors = load_tensors(path)
    model = api.load(path).model
    base = api.load(str(tiny_llama)).model.state_dict()
    hooked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            codes, scale = tensors[name + ".weight"], tensors[name + ".weight_scale"]
            torch.testing.assert_close(module.weight, codes.float() * scale, rtol=0, atol=0)
            hooked += len(module._forward_pre_hooks)
    assert hooked == 3 * 7
    if case[0] == "fp8":  # no smoothing: the weights stay within E4M3's relative rounding of the source
        w, w0 = model.model.layers[1].mlp.up_proj.weight, base["model.layers.1.mlp.up_proj.weight"]
        assert ((w - w0).abs() <= w0.abs() * 2 ** -4 + 1e-6).all()


@pytest.mark.parametrize("method, options", [("smoothquant", {"alpha": 0.8}), ("fp8", {"act_static": True})])
def test_deterministic(method, options, tiny_llama, text_file, tmp_path):
    digests = []
    for run in range(2):
        out = tmp_path / f"a{run}"
        api.quantize(str(tiny_llama), method, out, options, calib=str(text_file), **CALIB)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_smoothquant_on_gemma3_loads_in_transformers(tiny_gemma3, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g"
    api.quantize(str(tiny_gemma3), "smoothquant", out, {}, calib=str(text_file), **CALIB)
    base = api.load(str(tiny_gemma3)).model
    ours = api.load(out).model
    norm = "model.layers.0.pre_feedforward_layernorm.weight"
    assert not torch.equal(ours.state_dict()[norm], base.state_dict()[norm])
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-6, atol=1e-6)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 40)])
def test_our_fake_quantize_gives_the_library_bytes(shape):
    """The torch rule our reader uses without compressed-tensors equals the library's, bit for bit
    (signed zeros included), for per-token dynamic and static per-tensor scales."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5
    x.view(-1)[:40] = 0  # an all-zero token (3-D) and a run of zeros
    x.view(-1)[40:45] = -0.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for kind in ("int", "float"):
            args = QuantizationArgs(num_bits=8, type=kind, strategy="token", symmetric=True, dynamic=True)
            scale, _ = compute_dynamic_scales_and_zp(xd, args, module=torch.nn.Identity())
            ours = activations.fake_quantize_torch(xd, kind, 8)
            assert torch.equal(as_bits(ours), as_bits(fake_quantize(xd, scale, None, args)))
            assert torch.equal(as_bits(activations.fake_quantize(xd, kind, 8)), as_bits(ours))
            static = QuantizationArgs(num_bits=8, type=kind, strategy="tensor", symmetric=True, dynamic=False)
            scale = torch.tensor([0.03])
            ours = activations.fake_quantize_torch(xd, kind, 8, scale)
            assert torch.equal(as_bits(ours), as_bits(fake_quantize(xd, scale, None, static)))
            assert not torch.equal(ours, xd.float())  # it does quantize


@pytest.mark.parametrize("case", [("smoothquant", False), ("fp8", True)])
def test_evaluation_without_compressed_tensors_gives_the_same_logits(case, artifacts, request):
    path, _ = artifacts[case]
    with torch.no_grad():
        expected = api.load(path).model(ids()).logits
        request.getfixturevalue("without_compressed_tensors")
        assert activations._library() is None
        assert torch.equal(api.load(path).model(ids()).logits, expected)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, phrase", [
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha"),
    (["--method", "smoothquant", "--alpha", "-0.1"], "alpha"),
    (["--method", "smoothquant", "--act-static"], "act_static"),
    (["--method", "fp8", "--alpha", "0.5"], "alpha"),
    (["--method", "fp8", "--bits", "4"], "bits"),
])
def test_bad_settings_are_one_line_errors(args, phrase, tiny_llama, tmp_path):
    assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "out", *args), phrase)
    assert not (tmp_path / "out").exists()


def test_config_that_disagrees_with_tensors_is_an_error(artifacts, tmp_path):
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(artifacts[("smoothquant", False)][0], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format"] = "float-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressorError, match="config.json is corrupted"):
        api.load(path)  # the manifest check comes first; the reader's own checks stand behind it
    with pytest.raises(CompressorError, match="do not match the artifact's quantization config"):
        api.load(path, verify=False)
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor"
    config["quantization_config"]["format"] = "int-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "int"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressorError, match="input_scale"):
        api.load(path, verify=False)


def test_fp8_gptq_lowers_the_output_error_of_rounding():
    """GPTQ's error feedback on the E4M3 grid: smaller ‖(W − Ŵ)X‖ than round-to-nearest, same scales."""
    from compressor.methods.quant.fp8 import gptq_fp8_weight, quantize_fp8_weight

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 96, generator=gen) @ torch.randn(96, 96, generator=gen)  # correlated inputs
    w = torch.randn(48, 96, generator=gen)
    h = x.T @ x / x.shape[0]
    rtn = quantize_fp8_weight(w)
    fb = gptq_fp8_weight(w, h, 0.01, 32, "w")
    assert fb["qweight"].dtype == torch.float8_e4m3fn and torch.equal(fb["scale"], rtn["scale"])
    err = {k: ((w - r["qweight"].float() * r["scale"]) @ x.T).pow(2).mean() for k, r in (("rtn", rtn), ("gptq", fb))}
    assert err["gptq"] < 0.7 * err["rtn"]


@pytest.mark.slow
@pytest.mark.parametrize("method, options, samples", [("smoothquant", {"alpha": 0.5}, 16), ("fp8", {}, 16)])
def test_reference_model_w8a8_and_fp8(method, options, samples, tmp_path):
    """On the real reference model: close to fp32 (the figures are in benchmarks/), and transformers
    computes the same logits as our simulation."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    summary = api.quantize("smollm2-135m", method, out, options, samples=samples)
    assert 8.0 < summary["bits_per_weight"] < 8.06
    assert api.verify(out)["ok"]
    result = api.evaluate(str(out), base="smollm2-135m", windows=8)
    assert result["base_ppl"] < result["ppl"] < 1.06 * result["base_ppl"]
    assert 0 < result["kl"] < 0.08
    tokens = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        ours = api.load(out).model(tokens).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
