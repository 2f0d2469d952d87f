"""Structured pruning (SliceGPT, MoDeGPT) on the tiny in-process models: invariance, artifacts
that load in plain transformers with the logits of the in-memory pruned model, the CLI, bad input."""

from __future__ import annotations

import json
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor  # noqa: F401  (registers the sliced model type with transformers)
from compressor import api
from compressor.calib.data import calibration_set
from compressor.errors import CompressorError
from compressor.formats import sliced as sliced_format
from compressor.methods.prune.modegpt import MoDeGPT
from compressor.methods.prune.slicegpt import SliceGPT
from compressor.models.adapters import count_parameters
from compressor.models.loading import load_model
from compressor.pipeline.checkpoint import RunDirectory
from compressor.pipeline.sequential import SequentialPipeline
from helpers import assert_cli_error, cli

SAMPLES, SEQ = 16, 64


def ids(n: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, x=None) -> torch.Tensor:
    return model(ids() if x is None else x).logits


def prune_in_memory(model_dir: Path, data: Path, method) -> tuple:
    """What `compress prune` does before writing: the pruned model and its spec."""
    loaded = load_model(model_dir)
    tokens = calibration_set(data, loaded.tokenizer, SAMPLES, SEQ, 0)
    method.check(loaded.model, loaded.adapter)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDirectory(Path(tmp) / "run", "in-memory", len(loaded.adapter.blocks(loaded.model)))
        engine = SequentialPipeline(loaded.model, loaded.adapter, [method], run, tokens)
        engine.execute(resume=False)
    return loaded, method.structure(engine.block_meta, loaded.model, loaded.adapter)


def prune_cli(model_dir: Path, data: Path, out: Path, *args) -> dict:
    result = cli("--json", "prune", model_dir, "-o", out, "--calib", data, "--samples", SAMPLES, "--seq-len", SEQ,
                 *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


# ---------------------------------------------------------------- computational invariance

@pytest.mark.parametrize("rotation", ["global", "per-block"])
def test_rotation_without_slicing_reproduces_logits(rotation, tiny_llama, text_file):
    reference = load_model(tiny_llama).model
    loaded, spec = prune_in_memory(tiny_llama, text_file, SliceGPT.from_options(sparsity=0.0, rotation=rotation,
                                                                              round_to=1))
    assert spec["embedding"] == 64
    assert all(layer["attn_shortcut"] == (rotation == "per-block") for layer in spec["layers"])
    torch.testing.assert_close(logits(loaded.model), logits(reference), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rotation", ["global", "per-block"])
def test_gemma3_post_norms_are_exact_with_a_full_probe(rotation, tiny_gemma3, text_file):
    """Gemma's sandwich norms divide by the RMS of the unrotated output: with as many probe
    channels as the hidden size the rotated model is exact, with fewer it approximates."""
    reference = load_model(tiny_gemma3).model
    hidden = reference.config.text_config.hidden_size if hasattr(reference.config, "text_config") \
        else reference.config.hidden_size
    exact, spec = prune_in_memory(tiny_gemma3, text_file, SliceGPT.from_options(
        sparsity=0.0, rotation=rotation, round_to=1, probe=hidden))
    assert all(layer["attn_probe"] == hidden and layer["mlp_probe"] == hidden for layer in spec["layers"][:-1])
    torch.testing.assert_close(logits(exact.model), logits(reference), atol=1e-4, rtol=1e-4)
    approx, spec = prune_in_memory(tiny_gemma3, text_file, SliceGPT.from_options(
        sparsity=0.0, rotation=rotation, round_to=1, probe=4))
    layer = approx.adapter.blocks(approx.model)[0]
    assert layer.self_attn.o_proj.out_features == hidden + 4
    assert not torch.allclose(logits(approx.model), logits(reference), atol=1e-4)


def test_slicing_changes_widths_and_keeps_quality_close(tiny_llama, text_file):
    reference = load_model(tiny_llama).model
    loaded, spec = prune_in_memory(tiny_llama, text_file, SliceGPT.from_options(sparsity=0.25))
    layer = loaded.adapter.blocks(loaded.model)[0]
    assert layer.self_attn.q_proj.in_features == 48 and layer.mlp.down_proj.out_features == 48
    assert tuple(layer.attn_shortcut.weight.shape) == (48, 48)
    assert spec["head"] == 64  # the reference behaviour: the head is rotated, not sliced
    a, b = logits(loaded.model).log_softmax(-1), logits(reference).log_softmax(-1)
    kl = (b.exp() * (b - a)).sum(-1).mean()
    assert 0 < kl < 0.5


def test_per_layer_schedule(tiny_llama, text_file):
    loaded, spec = prune_in_memory(tiny_llama, text_file,
                                   SliceGPT.from_options(sparsity=0.25, schedule=[0.125, 0.25, 0.5], round_to=1))
    assert [d["mid"] for d in spec["layers"]] == [56, 48, 32]
    assert [d["in"] for d in spec["layers"]] == [56, 56, 48]
    assert torch.isfinite(logits(loaded.model)).all()


def test_keep_embeddings_stays_tied(tiny_llama, text_file):
    loaded, spec = prune_in_memory(tiny_llama, text_file, SliceGPT.from_options(sparsity=0.25, embeddings="keep"))
    assert spec["embedding"] == 64 and spec["head"] == 64
    assert loaded.adapter.tied_embeddings(loaded.model)
    assert spec["layers"][0]["in"] == 64 and spec["layers"][0]["mid"] == 48


# ---------------------------------------------------------------- artifacts

@pytest.mark.parametrize("rotation", ["per-block", "global"])
def test_artifact_loads_in_transformers_with_in_memory_logits(rotation, tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, _ = prune_in_memory(tiny_llama, text_file, SliceGPT.from_options(sparsity=0.25, rotation=rotation))
    out = tmp_path / "sliced"
    result = prune_cli(tiny_llama, text_file, out, "--rotation", rotation)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("llama" if rotation == "global" else "compressor_sliced")
    assert result["ordinary_config"] == (rotation == "global")
    assert (out / "manifest.json").is_file() and cli("verify", out).exit_code == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(loaded.model), atol=1e-5, rtol=1e-4)
    ours = api.load(out).model
    torch.testing.assert_close(logits(ours), logits(loaded.model), atol=1e-5, rtol=1e-4)
    assert result["params"] == count_parameters(plain)


def test_global_artifact_loads_without_compressor(tiny_llama, text_file, tmp_path):
    out = tmp_path / "global"
    prune_cli(tiny_llama, text_file, out, "--rotation", "global", "--sparsity", "0.25")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 48 and config["head_dim"] == 16 and not config["tie_word_embeddings"]
    torch.save(ids(), tmp_path / "ids.pt")
    script = (f"import sys, torch; from transformers import AutoModelForCausalLM; "
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
              f"assert not any(k.startswith('compressor') for k in sys.modules); "
              f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), {str(tmp_path / 'l.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), logits(api.load(out).model))


@pytest.mark.parametrize("rotation", ["per-block", "global"])
def test_gemma3_artifact_round_trip(rotation, tiny_gemma3, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, _ = prune_in_memory(tiny_gemma3, text_file, SliceGPT.from_options(sparsity=0.25, rotation=rotation))
    out = tmp_path / "gemma"
    prune_cli(tiny_gemma3, text_file, out, "--rotation", rotation, "--probe", "64")
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(loaded.model), atol=1e-5, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["model_type"] == "compressor_sliced"  # probes


def test_gemma3_global_without_probes_is_an_ordinary_config(tiny_gemma3, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, _ = prune_in_memory(tiny_gemma3, text_file, SliceGPT.from_options(sparsity=0.25, rotation="global",
                                                                              probe=0))
    out = tmp_path / "gemma-global"
    result = prune_cli(tiny_gemma3, text_file, out, "--rotation", "global", "--probe", "0")
    config = json.loads((out / "config.json").read_text())
    assert result["ordinary_config"] and config["model_type"].startswith("gemma3")
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(loaded.model), atol=1e-5, rtol=1e-4)


def test_sliced_artifact_evaluates_and_quantizes(tiny_llama, text_file, tmp_path):
    out = tmp_path / "sliced"
    prune_cli(tiny_llama, text_file, out)
    result = cli("--json", "eval", out, "--base", tiny_llama, "--data", text_file, "--windows", 4,
                 "--window-len", 64)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["kl"] > 0
    q = tmp_path / "q"
    result = cli("--json", "quantize", out, "-o", q, "--method", "rtn", "--bits", 4, "--group-size", 16)
    assert result.exit_code == 0, (result.stderr, result.exception)
    result = cli("--json", "eval", q, "--data", text_file, "--windows", 4, "--window-len", 64)
    assert result.exit_code == 0, (result.stderr, result.exception)


def test_sliced_artifact_packs_and_unpacks_bit_exact(tiny_llama, text_file, tmp_path):
    """A sliced artifact (registered class) through `compress pack` / `unpack`: the same bytes
    back, and the unpacked artifact loads with the sliced model's logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sliced"
    prune_cli(tiny_llama, text_file, out)
    result = cli("pack", out, "-o", tmp_path / "p", "--lanes", "8", "--steps", "32")
    assert result.exit_code == 0, result.output
    assert cli("unpack", tmp_path / "p", "-o", tmp_path / "u").exit_code == 0
    assert (tmp_path / "u" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "u")),
                               logits(AutoModelForCausalLM.from_pretrained(out)))


# ---------------------------------------------------------------- MoDeGPT

def test_modegpt_mlp_uniform_is_an_ordinary_config(tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, spec = prune_in_memory(tiny_llama, text_file,
                                   MoDeGPT.from_options(sparsity=0.25, modules="mlp", allocation="uniform"))
    out = tmp_path / "mlp"
    result = prune_cli(tiny_llama, text_file, out, "--method", "modegpt", "--modules", "mlp",
                       "--allocation", "uniform")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == spec["layers"][0]["intermediate"] < 128
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(loaded.model), atol=1e-5, rtol=1e-4)
    assert 0.15 < result["param_reduction"] < 0.3


def test_modegpt_full_is_registered_class(tiny_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, spec = prune_in_memory(tiny_llama, text_file, MoDeGPT.from_options(sparsity=0.25))
    assert len(set(spec["allocation"])) > 1  # per-layer allocation
    assert abs(sum(spec["allocation"]) / 3 - MoDeGPT.from_options(sparsity=0.25)._module_sparsity(
        load_model(tiny_llama).model, loaded.adapter)) < 1e-6
    out = tmp_path / "full"
    prune_cli(tiny_llama, text_file, out, "--method", "modegpt")
    assert json.loads((out / "config.json").read_text())["model_type"] == "compressor_sliced"
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(loaded.model), atol=1e-5, rtol=1e-4)
    attention = loaded.adapter.blocks(loaded.model)[1].self_attn
    assert attention.v_proj.out_features < 2 * 16 and attention.k_proj.out_features < 2 * 16
    assert spec["layers"][1]["qk_head_dim"] % 2 == 0 and tuple(attention.qk_index.shape) == (2, attention.qk_head_dim)


def test_modegpt_without_pruning_reproduces_the_pair_outputs():
    """Nystrom keeping every channel and VO SVD keeping full rank are exact."""
    from torch import nn

    from compressor.methods.prune.modegpt import nystrom_mlp, svd_vo

    torch.manual_seed(0)
    gate, up, down = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
    x = torch.randn(200, 16)
    before = down(x)
    nystrom_mlp([gate, up], down, x.T @ x / 200, 16, 1e-9)
    torch.testing.assert_close(down(x), before, atol=1e-4, rtol=1e-4)
    v, o = nn.Linear(8, 2 * 4, bias=False), nn.Linear(4 * 4, 8, bias=False)  # 4 heads, 2 kv, head_dim 4
    h = torch.randn(100, 8)

    def vo(v, o, width):
        vals = v(h).view(100, 2, width).repeat_interleave(2, dim=1)  # each kv head feeds 2 query heads
        return o(vals.reshape(100, -1))

    before = vo(v, o, 4)
    svd_vo(v, o, h.T @ h / 100, heads=4, kv_heads=2, head_dim=4, keep=4)
    torch.testing.assert_close(vo(v, o, 4), before, atol=1e-4, rtol=1e-4)


def test_qk_channel_selection_keeps_rotary_pairs_and_full_width_is_exact():
    from torch import nn
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    from compressor.methods.prune.modegpt import cr_qk
    from compressor.models.attention import _rotary_per_group

    torch.manual_seed(0)
    q, k = nn.Linear(8, 4 * 8, bias=False), nn.Linear(8, 2 * 8, bias=False)  # 4 heads, 2 kv, head_dim 8
    h = torch.randn(50, 8)
    qw, kw = q.weight.clone(), k.weight.clone()
    index = cr_qk(q, k, h.T @ h / 50, heads=4, kv_heads=2, head_dim=8, keep=8)
    assert index.tolist() == [list(range(8))] * 2 and torch.equal(q.weight, qw) and torch.equal(k.weight, kw)
    angles = torch.randn(1, 5, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    qs, ks = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    expected = apply_rotary_pos_emb(qs, ks, cos, sin)
    got = _rotary_per_group(qs, ks, cos, sin, index, rotate_half)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    index = cr_qk(q, k, h.T @ h / 50, heads=4, kv_heads=2, head_dim=8, keep=4)
    assert all(row[2:] == [i + 4 for i in row[:2]] for row in index.tolist())  # partners kept together
    assert q.out_features == 16 and k.out_features == 8


# ---------------------------------------------------------------- bad input

def one_line_error(result, *phrases):
    return assert_cli_error(result, *phrases)


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.1"])
def test_sparsity_outside_open_interval(sparsity, tiny_llama, text_file, tmp_path):
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--calib", text_file, "--sparsity", sparsity),
                   "sparsity must be in (0, 1)")


def test_sparsity_leaving_zero_width(tiny_llama, text_file, tmp_path):
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--calib", text_file, "--sparsity", "0.9"),
                   "leaves zero width", "64-wide")
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--calib", text_file, "--sparsity", "0.95",
                       "--method", "modegpt"), "lower --sparsity")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    one_line_error(cli("prune", tmp_path / "gpt2", "-o", tmp_path / "o", "--calib", text_file),
                   "unsupported architecture 'gpt2'")


def test_calibration_too_small_for_pca(tiny_llama, text_file, tmp_path):
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--calib", text_file, "--samples", "1",
                       "--seq-len", "32"), "32 tokens", "needs at least 64")


def test_bad_method_and_options(tiny_llama, text_file, tmp_path):
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--method", "wanda"), "unknown pruning method")
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--rotation", "diagonal", "--calib", text_file),
                   "rotation")
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--schedule", "0.1,0.2", "--calib", text_file),
                   "2 sparsities for 3 blocks")
    one_line_error(cli("prune", tiny_llama, "-o", tmp_path / "o", "--method", "modegpt", "--rotation", "global"),
                   "rotation")


def test_export_rejects_nothing_for_ordinary_detection():
    spec = {"embedding": 8, "head": 8, "layers": [{"in": 8, "mid": 8, "out": 8, "attn_shortcut": False,
                                                   "mlp_shortcut": False}]}
    assert sliced_format.is_ordinary(spec, 16)
    spec["layers"][0]["mid"] = 4
    assert not sliced_format.is_ordinary(spec, 16)


def test_sliced_artifact_cannot_be_pruned_again(tiny_llama, text_file, tmp_path):
    out = tmp_path / "s"
    prune_cli(tiny_llama, text_file, out)
    with pytest.raises(CompressorError, match="already a sliced artifact"):
        api.prune(str(out), "slicegpt", tmp_path / "again", 0.25, calib=str(text_file), samples=SAMPLES,
                  seq_len=SEQ)


def test_global_width_is_a_multiple_of_the_heads():
    """transformers rejects a config whose hidden size is not a multiple of its heads."""
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=576, num_attention_heads=9)  # the reference model's shape
    assert SliceGPT.from_options(sparsity=0.1, rotation="global").widths(config, 1) == [513]
    assert SliceGPT.from_options(sparsity=0.1, rotation="per-block").widths(config, 1) == [512]
    llama8b = SimpleNamespace(hidden_size=4096, num_attention_heads=32)
    assert SliceGPT.from_options(sparsity=0.1, rotation="global").widths(llama8b, 1) == [3680]
