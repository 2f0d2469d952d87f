"""One evaluator for every artifact: ours (quantized, packed: run from the packed weights), plain
HF directories, and compressed-tensors checkpoints written by compressed-tensors itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.errors import CompressorError
from compressor.formats import packed as packed_format
from compressor.codecs.dfloat import PackConfig
from compressor.formats.universal import describe, identify, kind_of, open_model
from helpers import cli

pytest.importorskip("compressed_tensors")
SMALL = PackConfig(lanes=8, steps=32)
IDS = torch.randint(3, 250, (2, 13), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def rtn(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("u") / "rtn"
    r = cli("quantize", tiny_llama, "-o", out, "--bits", "4", "--group-size", "32", "--asym")
    assert r.exit_code == 0, r.output
    return out


def test_plain_hf_directory(tiny_llama):
    from transformers import AutoModelForCausalLM

    loaded = open_model(tiny_llama)
    assert loaded.extra["kind"] == "hf" and loaded.tokenizer is not None
    assert torch.equal(logits(loaded.model), logits(AutoModelForCausalLM.from_pretrained(tiny_llama)))


def test_quantized_artifact_matches_the_api_loader(rtn):
    from compressor import api

    loaded = open_model(rtn)
    assert loaded.extra["kind"] == "artifact"
    assert torch.equal(logits(loaded.model), logits(api.load(rtn).model))


def test_packed_bf16_runs_from_the_packed_weights(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    packed_format.pack(tiny_llama, tmp_path / "p", SMALL, torch.bfloat16)
    packed_format.unpack(tmp_path / "p", tmp_path / "u")
    loaded = open_model(tmp_path / "p")
    assert loaded.extra["kind"] == "packed"
    assert "runner" in loaded.extra  # blocks decode from their packed streams in a pre-hook
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.bfloat16)
    assert torch.equal(logits(loaded.model), logits(ref))


def test_packed_quantized_artifact_decodes_in_memory(rtn, tmp_path):
    packed_format.pack(rtn, tmp_path / "p", SMALL)
    loaded = open_model(tmp_path / "p")
    assert loaded.extra["kind"] == "packed" and "runner" not in loaded.extra
    assert torch.equal(logits(loaded.model), logits(open_model(rtn).model))
    assert not list(tmp_path.glob("p/*.safetensors.tmp*"))


def test_foreign_compressed_tensors_with_two_config_groups(tiny_llama, tmp_path):
    """llm-compressor-style mixed schemes (W4 g32 attention, W8 per-channel MLP): our decoder
    resolves each module's group from its targets; weights equal the scheme's fake-quantization."""
    from transformers import AutoModelForCausalLM

    from ct_foreign import fake_quantize, write_foreign

    out = write_foreign(tiny_llama, tmp_path / "ct",
                        {"attn": ("re:.*self_attn.*", 4, 32), "mlp": ("re:.*mlp.*", 8, None)})
    assert kind_of(out) == "compressed-tensors"
    loaded = open_model(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                attn = "self_attn" in name
                module.weight.copy_(fake_quantize(module.weight, 4 if attn else 8, 32 if attn else None))
    assert torch.equal(logits(loaded.model), logits(ref))
    assert describe(out)["kind"] == "compressed-tensors"


def test_foreign_format_we_do_not_decode_goes_through_transformers(tiny_llama, tmp_path):
    """Other compressed-tensors formats (here naive-quantized int4) load via transformers +
    compressed-tensors, dequantized."""
    from transformers import AutoModelForCausalLM

    from ct_foreign import fake_quantize, write_foreign

    out = write_foreign(tiny_llama, tmp_path / "ct", {"all": ("Linear", 4, 32)}, fmt="naive-quantized")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "naive-quantized"
    loaded = open_model(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, 4, 32))
    torch.testing.assert_close(logits(loaded.model), logits(ref), rtol=0, atol=1e-5)


def test_identify_keys_on_content_and_names_damage(rtn, tmp_path):
    import shutil

    first = identify(rtn)
    assert first["kind"] == "artifact" and len(first["sha256"]) == 64
    copy = tmp_path / "copy"
    shutil.copytree(rtn, copy)
    assert identify(copy)["sha256"] == first["sha256"]  # content, not path
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CompressorError, match="damaged: tensor .* is corrupted"):
        identify(copy)


def test_unknown_quantization_method_is_refused(tiny_llama, tmp_path):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressorError, match="bitsandbytes"):
        open_model(tmp_path / "m")
