"""Minitron pruning: importance finds what carries no signal (zeroed neurons, heads, a block that
passes its input through) and prunes exactly that with the model's output unchanged; budgets are
met with the exact parameter count; the artifact is an ordinary config that plain transformers
loads without compressor; a killed run resumes to identical bytes; bad targets are one-line
errors before any work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.methods.prune.minitron_importance import Aggregate, heads_to_keep
from compressor.methods.prune.minitron_shape import ParameterCounter, Shape, shape_of
from conftest import make_gemma3, make_llama
from helpers import assert_cli_error, cli

CAL = {"samples": 8, "seq_len": 64}
IDS = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def _edit(directory: Path, edit) -> Path:
    """Apply `edit(model)` to a saved tiny model and save it again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _logits(path) -> torch.Tensor:
    model = api.load(str(path)).model
    with torch.no_grad():
        return model(input_ids=IDS).logits


def prune(model, text_file, out, **options) -> dict:
    return api.prune(str(model), "minitron", out, None, options, calib=str(text_file), **CAL)


def test_aggregations_over_sequence_then_batch():
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [batch 2, seq 2, channels 2]
    means = torch.tensor([[2.0, 3.0], [6.0, 7.0]])  # per sequence
    expect = {("mean", "mean"): means.mean(0), ("mean", "l2"): means.norm(dim=0),
              ("mean", "var"): means.var(0, correction=0),
              ("l2", "mean"): values.norm(dim=1).mean(0), ("var", "l2"): values.var(1, correction=0).norm(dim=0)}
    for (seq, batch), want in expect.items():
        agg = Aggregate(seq, batch)
        agg.add(values[:1])
        agg.add(values[1:])  # streamed over batches
        assert torch.allclose(agg.result().float(), want), (seq, batch)


def test_heads_are_kept_by_whole_groups_then_within_them():
    scores = torch.tensor([5.0, 1.0, 2.0, 0.5, 0.1, 9.0])  # 3 groups of 2 heads
    heads, groups = heads_to_keep(scores, kv_heads=3, keep_heads=2, keep_groups=2)
    assert groups.tolist() == [0, 2] and heads.tolist() == [0, 5]  # group 1 sums lowest; best head per group


def test_parameter_count_is_exact_for_every_shape(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    counter = ParameterCounter(config, tied=False)
    for shape in (Shape(64, 128, 4, 2, 3), Shape(32, 96, 2, 1, 2), Shape(48, 32, 4, 1, 1)):
        real = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=256, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=16,
            tie_word_embeddings=False))
        assert counter(shape) == sum(p.numel() for p in real.parameters())


def test_zeroed_neurons_and_group_are_what_is_pruned_and_output_is_unchanged(tmp_path, text_file):
    model = make_llama(tmp_path / "m", layers=2)

    def silence(m):
        for layer in m.model.layers:
            layer.mlp.down_proj.weight[:, 96:] = 0  # neurons 96.. reach nothing
            layer.mlp.up_proj.weight[96:] = 0  # and are zero
            layer.self_attn.v_proj.weight[16:] = 0  # key/value group 1: heads 2, 3 output zero
            layer.self_attn.o_proj.weight[:, 32:] = 0

    _edit(model, silence)
    out = tmp_path / "pruned"
    result = prune(model, text_file, out, ffn=96, heads=2, kv_heads=1)
    assert result["model_type"] == "llama"
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (96, 2, 1)
    assert torch.allclose(_logits(out), _logits(model), atol=1e-5)


def test_a_block_that_passes_its_input_through_is_the_one_dropped(tmp_path, text_file):
    model = make_llama(tmp_path / "m", layers=4)

    def pass_through(m):
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()

    _edit(model, pass_through)
    out = tmp_path / "pruned"
    prune(model, text_file, out, layers=3, depth_metric="cosine")
    report = json.loads((out / "build.json").read_text())["spec"]["minitron"]
    assert report["dropped_layers"] == [2] and report["block_cosine"][2] == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.allclose(_logits(out), _logits(model), atol=1e-5)
    # by perplexity: skipping it changes nothing, and the layer whose absence costs least goes
    prune(model, text_file, tmp_path / "ppl", layers=3, depth_metric="ppl")
    report = json.loads((tmp_path / "ppl" / "build.json").read_text())["spec"]["minitron"]
    drops = report["loss_drop"]
    assert abs(drops[2]) < 1e-5 and report["dropped_layers"] == [drops.index(min(drops))]


@pytest.mark.parametrize("axis", ["width", "depth", "both"])
def test_budget_is_met_with_an_ordinary_config_transformers_loads_alone(axis, tiny_llama, text_file, tmp_path):
    out = tmp_path / axis
    result = prune(tiny_llama, text_file, out, target_params="90k", axis=axis)
    assert result["params"] <= 90_000 and result["params_before"] > 90_000
    loaded = api.load(str(out))
    assert sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values()) == result["params"]
    shape = shape_of(loaded.model.config)
    assert (shape.layers < 3) == (axis != "width") and (shape.hidden < 64 or shape.ffn < 128) == (axis != "depth")
    # plain transformers, compressor never imported, gives the same logits as compressor's loader
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); assert 'compressor' not in sys.modules; "
            f"print(m(input_ids=torch.tensor({IDS.tolist()})).logits.sum().item())")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert abs(float(plain.stdout) - float(_logits(out).sum())) < 1e-3


def test_gemma3_prunes_heads_layers_and_width(tmp_path, text_file):
    model = make_gemma3(tmp_path / "g", layers=3)
    out = tmp_path / "pruned"
    prune(model, text_file, out, hidden=32, ffn=64, heads=2, kv_heads=1, layers=2)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and len(config["layer_types"]) == config["num_hidden_layers"] == 2
    assert torch.isfinite(_logits(out)).all()


def test_prune_then_quantize_in_one_pass_with_dropped_layers(tiny_llama, text_file, tmp_path):
    out = tmp_path / "pq"
    api.prune(str(tiny_llama), "minitron,rtn", out, None, {"layers": 2, "group_size": 16}, calib=str(text_file), **CAL)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "quantization_config" in config
    assert torch.isfinite(_logits(out)).all()


_KILL = """
import os, signal
from compressor import api
from compressor.pipeline.checkpoint import RunDirectory
save_block = RunDirectory.save_block
def save_then_die(self, index, *args, **kwargs):
    save_block(self, index, *args, **kwargs)
    if {kill} and index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
RunDirectory.save_block = save_then_die
api.prune({model!r}, "minitron", {out!r}, None, {{"target_params": "80k", "axis": "both"}}, calib={data!r},
          resume={resume}, samples=8, seq_len=64)
"""


def test_sigkilled_minitron_resumes_to_identical_artifact(tiny_llama, text_file, tmp_path):
    options = {"target_params": "80k", "axis": "both"}
    api.prune(str(tiny_llama), "minitron", tmp_path / "clean", None, options, calib=str(text_file), **CAL)
    out = tmp_path / "out"
    code = _KILL.format(model=str(tiny_llama), out=str(out), data=str(text_file), kill=True, resume=False)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    api.prune(str(tiny_llama), "minitron", out, None, options, calib=str(text_file), resume=True, **CAL)
    files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != "build.json"}  # noqa: E731
    assert files(out) == files(tmp_path / "clean")


@pytest.mark.parametrize("args, phrases", [
    (["--target-params", "10M"], ["not smaller than the model"]),
    (["--target-params", "1k", "--axis", "depth"], ["no depth pruning reaches"]),
    (["--target-params", "100x"], ["cannot read --target-params"]),
    (["--heads", "3"], ["not a whole number of heads per group"]),
    (["--hidden", "128"], ["larger than the model"]),
    ([], ["needs a target"]),
    (["--target-params", "90k", "--axis", "depth", "--layers", "2"], ["nothing left to choose"]),
])
def test_bad_targets_are_one_line_errors_before_any_work(args, phrases, tiny_llama, text_file, tmp_path):
    out = tmp_path / "out"
    result = cli("prune", tiny_llama, "--method", "minitron", "--calib", text_file, "--samples", "8", "--seq-len", "64",
                 "-o", out, *args)
    assert_cli_error(result, *phrases)
    assert not out.exists() and not api.run_directory_for(out).exists()
