"""compressed-tensors packing, artifact round trips, manifests and loading in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.formats import bitpack
from compressor.formats.artifact import load_tensors, save_tensors
from compressor.formats.manifest import verify
from compressor.methods.quant.quantizer import dequantize_record, quantize_weight
from compressor.schemes import WeightScheme

compressed_tensors = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [32, 64, 100, 7])
def test_our_unpacking_reads_what_compressed_tensors_packs(bits, cols):
    """Packing is the library's; our numpy reader (for hosts without it) gives back the same codes."""
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), generator=g, dtype=torch.int8)
    for dim in (0, 1):
        c = codes if dim == 1 else codes.T.contiguous()
        packed = bitpack.pack(c, bits, dim=dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] == bitpack.packed_words(cols, bits)
        assert torch.equal(bitpack.unpack(packed, bits, tuple(c.shape), dim=dim), c)
        rows = packed if dim == 1 else packed.T.contiguous()
        ours = bitpack.unpack_rows(rows, bits, cols)
        assert torch.equal(ours if dim == 1 else ours.T, c)


def test_packed_layout_is_dense_little_endian_offset_binary():
    """Code i occupies bits [i*bits, (i+1)*bits) as code + 2^(bits-1); 3-bit codes straddle words."""
    four = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    nibbles = [0, 1, 8, 15, 9, 10, 11, 12]
    word = sum(n << (4 * i) for i, n in enumerate(nibbles))
    assert bitpack.pack(four, 4).tolist() == [[word - (1 << 32)]]  # top bit set: a negative int32
    three = torch.tensor([[3] * 11], dtype=torch.int8)  # unsigned 7 = 0b111: 33 ones in a row
    assert bitpack.pack(three, 3).tolist() == [[-1, 1]]
    with pytest.raises(ValueError, match="cannot hold"):
        bitpack.unpack(bitpack.pack(three, 3), 8, (1, 11))  # 88 bits do not fit 2 words


def test_reading_needs_no_compressed_tensors(tiny_llama, tmp_path, request):
    """Evaluation hosts may lack the library: our readers give back the same weights without it."""
    out = tmp_path / "q"
    api.quantize(str(tiny_llama), "rtn", out, {"bits": 3, "group_size": 32, "sym": False})  # packed zero points
    with_library = api.load(out).model.state_dict()
    request.getfixturevalue("without_compressed_tensors")
    with pytest.raises(ImportError):
        import compressed_tensors  # noqa: F401
    without = api.load(out).model.state_dict()
    assert with_library.keys() == without.keys()
    assert all(torch.equal(with_library[k], without[k]) for k in with_library)


def test_writing_without_compressed_tensors_is_a_clear_error(tiny_llama, tmp_path, without_compressed_tensors):
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="needs the compressed-tensors package"):
        api.quantize(str(tiny_llama), "rtn", tmp_path / "q", {"bits": 4, "group_size": 32})
    assert not (tmp_path / "q").exists()


def test_configs_are_the_library_models_under_our_keys():
    """What the library refuses is refused here; what we write, it reads back to the same scheme."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    from compressor.formats import compressed_tensors as pack_quantized

    with pytest.raises(ValidationError, match="actorder='group' has been removed"):
        pack_quantized.quantization_config(WeightScheme(4, 32, True), ["lm_head"], actorder="group")
    ours = pack_quantized.quantization_config(WeightScheme(3, 64, False), ["lm_head"], actorder="weight")
    weights = QuantizationConfig.model_validate(ours).config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric, weights.actorder) == (3, 64, False, "weight")
    assert set(ours["config_groups"]["group_0"]["weights"]) == {
        "num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder", "observer",
        "observer_kwargs", "block_structure"}


def test_sharded_save_round_trip(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    save_tensors(tmp_path, tensors, max_shard_bytes=500)
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = load_tensors(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("sym", [True, False])
def test_artifact_reloads_to_the_simulated_model(tiny_llama, tmp_path, sym):
    """Our reader gives back exactly the fake-quantized weights, and the manifest verifies."""
    out = tmp_path / "q"
    api.quantize(str(tiny_llama), "rtn", out, {"bits": 3, "group_size": 32, "sym": sym})
    assert verify(out) == []
    base = api.load(str(tiny_llama)).model
    model = api.load(out).model
    scheme = WeightScheme(3, 32, sym)
    quantized = 0
    for (name, w), (_, w0) in zip(model.named_parameters(), base.named_parameters()):
        if name.endswith("proj.weight"):
            assert torch.equal(w, dequantize_record(quantize_weight(w0, scheme), w.dtype)), name
            assert max(len(group.unique()) for group in w.reshape(-1, 32)) <= 2 ** 3  # 3-bit grid per group
            quantized += 1
        else:
            assert torch.equal(w, w0), name
    assert quantized == 7 * len(model.model.layers)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["name"] == "rtn"
    assert manifest["source"]["sha256"]
    expected_bpw = 3 + 16 / 32 + (0 if sym else 3 / 32)
    assert manifest["metrics"]["bits_per_weight"] == pytest.approx(expected_bpw, abs=0.02)


@pytest.mark.parametrize("method,opts", [
    ("rtn", {}),
    ("gptq", {"act_order": True}),                            # static groups: actorder "weight"
    ("awq+gptq", {"static_groups": False}),   # groups fitted during the sweep; folded norms
])
def test_plain_transformers_loads_symmetric_artifact(method, opts, tiny_llama, text_file, tmp_path):
    """transformers + compressed-tensors loads our artifact and computes the same logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    cal = {"calib": str(text_file), "samples": 8, "seq_len": 64} if method != "rtn" else {}
    api.quantize(str(tiny_llama), method, out, {"bits": 4, "group_size": 32, "sym": True, **opts}, **cal)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = api.load(out).model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_that_disagrees_with_tensors_is_an_error(tiny_llama, tmp_path):
    from compressor.errors import CompressorError

    out = tmp_path / "q"
    api.quantize(str(tiny_llama), "rtn", out, {"bits": 4, "group_size": 32})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressorError, match="config.json is corrupted"):
        api.load(out)  # the manifest check comes first
    with pytest.raises(CompressorError, match="do not match the artifact's quantization config"):
        api.load(out, verify=False)  # and the reader's own check still stands behind it


def test_bf16_checkpoint_keeps_bf16_outside_the_quantized_linears(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_llama
    from transformers import AutoModelForCausalLM

    src = make_llama(tmp_path / "src", layers=1)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / f).write_bytes((src / f).read_bytes())
    out = tmp_path / "q"
    api.quantize(str(tmp_path / "bf16"), "rtn", out, {"bits": 4, "group_size": 32})
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    tensors = load_tensors(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
