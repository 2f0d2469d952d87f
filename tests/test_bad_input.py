"""Bad input: every problem is a one-line error naming the problem and the fix (CLI: `error: ...` on
stderr, exit code 2; API: CompressorError), and nothing already on disk is lost."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.calib.data import calibration_set
from compressor.errors import CompressorError
from compressor.methods.quant.rtn import RTN
from compressor.models.adapters import LlamaAdapter
from compressor.safetensors_file import read_header
from helpers import assert_cli_error, cli, error_line, leftovers, run_compress, snapshot

def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


RTN_OPTIONS = {"bits": 4, "group_size": 32, "sym": False}


@pytest.fixture(scope="module", autouse=True)
def tiny_llama_untouched(tiny_llama):
    """No test here may change the source checkpoint."""
    before = snapshot(tiny_llama)
    yield
    assert snapshot(tiny_llama) == before


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    """A good RTN artifact of the tiny model (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("artifact") / "q"
    api.quantize(str(tiny_llama), "rtn", out, RTN_OPTIONS)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return api.load(tiny_llama).tokenizer


# ---------------------------------------------------------------- 1. missing model path

def test_quantize_missing_model_path_subprocess(tmp_path):
    result = run_compress("quantize", "/nonexistent", "-o", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    message = error_line(result.stderr)
    assert "/nonexistent does not exist" in message
    assert "HF model directory" in message  # the fix: what to pass instead
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["eval", "--base", "BASE"]])
def test_eval_and_inspect_missing_model_path(command, tiny_llama, tmp_path):
    if "BASE" in command:  # a good model, a missing base
        args = [command[0], tiny_llama, "--base", tmp_path / "nosuch", "--data", tmp_path / "x.txt"]
        missing = str(tmp_path / "nosuch")
    else:
        args = [*command, "/nonexistent/model"]
        missing = "/nonexistent/model"
    assert_cli_error(cli(*args), f"model path {missing} does not exist")


def test_model_path_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_cli_error(cli("quantize", tmp_path / "empty", "-o", tmp_path / "out"), "has no config.json")
    assert not (tmp_path / "out").exists()


def test_api_raises_compressor_error_for_missing_model(tmp_path):
    with pytest.raises(CompressorError, match="does not exist"):
        api.quantize(str(tmp_path / "nosuch"), "rtn", tmp_path / "out", RTN_OPTIONS)
    with pytest.raises(CompressorError, match="does not exist"):
        api.inspect(str(tmp_path / "nosuch"))


# ---------------------------------------------------------------- 2. damaged safetensors

def _truncate(model: Path) -> None:
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_length(model: Path) -> None:
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    f.write_bytes(bytes(data))


def _garbage_header(model: Path) -> None:
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00\xff garbage garbage garbage \xfe\x01"[:32]
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, phrase", [(_truncate, "is truncated"),
                                            (_garbage_length, "truncated or not a safetensors file"),
                                            (_garbage_header, "corrupted safetensors header")],
                         ids=["truncated", "bad-length", "bad-header"])
def test_damaged_safetensors_names_the_file(damage, phrase, tiny_llama, text_file, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "model")
    damage(model)
    before = snapshot(model)
    weights = str(model / "model.safetensors")
    out = tmp_path / "out"
    assert_cli_error(cli("quantize", model, "-o", out), weights, phrase)
    assert_cli_error(cli("inspect", model), weights, phrase)
    assert_cli_error(cli("eval", model, "--data", text_file, "--windows", "2", "--window-len", "32"), weights)
    assert not out.exists()
    assert snapshot(model) == before  # nothing was "repaired" or deleted


def test_truncated_safetensors_subprocess_one_line(tiny_llama, tmp_path):
    """The real console script: a long message (long tmp path) still fits on one line at any width."""
    model = copy_model(tiny_llama, tmp_path / ("a-rather-long-directory-name-" * 3) / "model")
    _truncate(model)
    result = run_compress("quantize", model, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stdout == ""
    message = error_line(result.stderr)
    assert str(model / "model.safetensors") in message and "truncated" in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. pickle checkpoints

@pytest.fixture
def pickle_model(tiny_llama, tmp_path) -> Path:
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    model.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    torch.save(load_file(tiny_llama / "model.safetensors"), model / "pytorch_model.bin")
    return model


def test_pickle_checkpoint_refused_without_allow_pickle(pickle_model, text_file, tmp_path):
    before = snapshot(pickle_model)
    out = tmp_path / "out"
    message = assert_cli_error(cli("quantize", pickle_model, "-o", out), "pytorch_model.bin", "--allow-pickle")
    assert "pickle" in message
    assert_cli_error(cli("eval", pickle_model, "--data", text_file, "--windows", "2", "--window-len", "32"),
                     "--allow-pickle")
    with pytest.raises(CompressorError, match="--allow-pickle"):
        api.load(pickle_model)
    assert not out.exists()
    assert snapshot(pickle_model) == before


def test_pickle_checkpoint_loads_with_allow_pickle(pickle_model, tmp_path):
    out = tmp_path / "out"
    result = cli("quantize", pickle_model, "-o", out, "--bits", "4", "--group-size", "32", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert cli("verify", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]


# ---------------------------------------------------------------- 4. unsupported architecture

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1,
                        eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_unsupported_architecture_lists_supported_types(tiny_gpt2, tmp_path):
    out = tmp_path / "out"
    message = assert_cli_error(cli("quantize", tiny_gpt2, "-o", out), "unsupported architecture 'gpt2'",
                               "supported model types")
    assert "llama" in message and "gemma3" in message
    assert not out.exists()
    with pytest.raises(CompressorError, match="llama"):
        api.load(tiny_gpt2)


# ---------------------------------------------------------------- 5. calibration / evaluation data

def test_empty_calibration_file(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CompressorError, match="contains no text") as info:
        calibration_set(empty, tokenizer, samples=4, seq_len=32)
    assert str(empty) in str(info.value)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \t\n")
    with pytest.raises(CompressorError, match="contains no text"):
        calibration_set(blank, tokenizer, samples=4, seq_len=32)


def test_empty_jsonl_calibration_file(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(CompressorError, match="contains no text"):
        calibration_set(empty, tokenizer, samples=4, seq_len=32)


def test_too_few_calibration_tokens_names_the_counts(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The river city was great. " * 20)
    n_tokens = len(tokenizer(short.read_text(), add_special_tokens=False)["input_ids"])
    samples, seq_len = 16, 64
    assert n_tokens < samples * seq_len
    with pytest.raises(CompressorError) as info:
        calibration_set(short, tokenizer, samples=samples, seq_len=seq_len)
    message = info.value.one_line()
    assert f"{n_tokens} tokens" in message
    assert str(samples * seq_len) in message
    assert "--samples" in message  # the fix
    assert "\n" not in message


def test_calibration_settings_out_of_range(tokenizer, text_file):
    with pytest.raises(CompressorError, match="samples >= 1"):
        calibration_set(text_file, tokenizer, samples=0, seq_len=32)
    with pytest.raises(CompressorError, match="seq-len >= 2"):
        calibration_set(text_file, tokenizer, samples=2, seq_len=1)


def test_jsonl_without_text_field(tokenizer, jsonl_file, tmp_path):
    with pytest.raises(CompressorError, match="'content'") as info:
        calibration_set(jsonl_file, tokenizer, samples=2, seq_len=32, text_field="content")
    assert "--text-field" in str(info.value)
    assert "text" in str(info.value)  # lists the fields that do exist


def test_bad_jsonl_line_is_named(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CompressorError, match=re.escape(f"{bad}:2 is not valid JSON")):
        calibration_set(bad, tokenizer, samples=1, seq_len=2)


def test_csv_data_file_unsupported(tokenizer, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello world\n")
    with pytest.raises(CompressorError, match="unsupported data file data.csv") as info:
        calibration_set(csv, tokenizer, samples=1, seq_len=2)
    assert ".jsonl" in str(info.value)


def test_missing_data_file(tokenizer, tmp_path):
    with pytest.raises(CompressorError, match="does not exist"):
        calibration_set(tmp_path / "nosuch.txt", tokenizer, samples=1, seq_len=2)


def test_eval_data_problems_through_cli(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_cli_error(cli("eval", tiny_llama, "--data", empty, "--windows", "2", "--window-len", "32"),
                     "contains no text")
    short = tmp_path / "short.txt"
    short.write_text("The river city was great.")
    message = assert_cli_error(cli("eval", tiny_llama, "--data", short, "--windows", "4", "--window-len", "64"),
                               "evaluation needs 4", "(256 tokens)")
    assert "--windows" in message
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    assert_cli_error(cli("eval", tiny_llama, "--data", csv), "unsupported data file data.csv")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "hello"}) + "\n")
    assert_cli_error(cli("eval", tiny_llama, "--data", jsonl, "--text-field", "content"), "'content'",
                     "--text-field")


@pytest.mark.parametrize("args, phrase", [
    (["--windows", "0"], "windows >= 1"),
    (["--windows", "-1"], "windows >= 1"),
    (["--window-len", "1"], "window-len >= 2"),
    (["--window-len", "0"], "window-len >= 2"),
    (["--batch-size", "0"], "batch size"),
])
def test_eval_window_settings_out_of_range(args, phrase, tiny_llama, text_file):
    assert_cli_error(cli("eval", tiny_llama, "--data", text_file, *args), phrase)


# ---------------------------------------------------------------- 6. group size

@pytest.mark.parametrize("group_size", [48, 128, 256])
def test_group_size_not_dividing_in_features(group_size, tiny_llama, tmp_path):
    out = tmp_path / "out"
    message = assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--group-size", group_size),
                               f"group size {group_size}", "in_features 64",
                               "model.layers.0.self_attn.q_proj", "--group-size -1")
    assert "32, 64" in message  # divisors that would work
    assert not out.exists()


def test_per_channel_group_size_works(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = cli("quantize", tiny_llama, "-o", out, "--bits", "4", "--group-size", "-1")
    assert result.exit_code == 0, result.stderr
    assert cli("verify", out).exit_code == 0
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["strategy"] == "channel"
    entries, _ = read_header(out / "model.safetensors")
    assert entries["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)


# ---------------------------------------------------------------- 7. bits and other settings

@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_out_of_range(bits, tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--bits", bits), "bits", f"(got {bits})")
    assert not out.exists()


@pytest.mark.parametrize("args, phrase", [
    (["--scale-dtype", "int8"], "scale_dtype"),
    (["--group-size", "-2"], "group_size"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_other_bad_settings(args, phrase, tiny_llama, tmp_path):
    assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "out", *args), phrase)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. existing output

def test_existing_output_needs_overwrite(artifact, tiny_llama, tmp_path):
    out = copy_model(artifact, tmp_path / "out")
    before = snapshot(out)
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--group-size", "32"), f"output {out} already exists",
                     "--overwrite")
    assert snapshot(out) == before

    result = cli("quantize", tiny_llama, "-o", out, "--bits", "3", "--group-size", "32", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert snapshot(out) != before
    assert json.loads((out / "manifest.json").read_text())["method"]["config"]["bits"] == 3
    assert cli("verify", out).exit_code == 0
    assert leftovers(out) == []


def test_overwrite_refuses_a_directory_compressor_did_not_write(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("precious")
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--group-size", "32", "--overwrite"),
                     "is not a compressor artifact")
    assert (out / "sentinel.txt").read_text() == "precious"


def test_overwrite_refuses_an_artifact_holding_foreign_files(artifact, tiny_llama, tmp_path):
    out = copy_model(artifact, tmp_path / "out")
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--group-size", "32", "--overwrite"),
                     "files compressor did not write (notes.txt)")
    assert snapshot(out) == before


def test_overwrite_replaces_an_empty_directory(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = cli("quantize", tiny_llama, "-o", out, "--group-size", "32", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert cli("verify", out).exit_code == 0


def test_output_is_a_file(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.write_text("precious")
    assert_cli_error(cli("quantize", tiny_llama, "-o", out), "already exists")
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--overwrite"), "is not a directory")
    assert out.read_text() == "precious"


def _old_output(artifact: Path, tmp_path: Path) -> Path:
    return copy_model(artifact, tmp_path / "out")


@pytest.mark.parametrize("error", [RuntimeError("boom"), CompressorError("boom", "fix it")])
def test_failure_midway_keeps_old_output(error, artifact, tiny_llama, tmp_path, monkeypatch):
    out = _old_output(artifact, tmp_path)
    before = snapshot(out)
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > len(LlamaAdapter.groups):  # second block
            raise error
        return original(self, *args, **kwargs)

    original = RTN.apply_group
    monkeypatch.setattr(RTN, "apply_group", failing)
    with pytest.raises(type(error), match="boom"):
        api.quantize(str(tiny_llama), "rtn", out, {"bits": 3, "group_size": 32}, overwrite=True)
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_failure_while_writing_keeps_old_output(artifact, tiny_llama, tmp_path, monkeypatch):
    from compressor.formats import artifact as artifacts

    out = _old_output(artifact, tmp_path)
    before = snapshot(out)
    original = artifacts.save_tensors

    def half_written(directory, tensors, *args, **kwargs):
        original(directory, tensors, *args, **kwargs)
        _truncate(directory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "save_tensors", half_written)
    with pytest.raises(OSError, match="No space left"):
        api.quantize(str(tiny_llama), "rtn", out, {"bits": 3, "group_size": 32}, overwrite=True)
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_interrupt_keeps_old_output_and_resumes(artifact, tiny_llama, tmp_path, monkeypatch):
    out = _old_output(artifact, tmp_path)
    before = snapshot(out)
    calls = []
    original = RTN.apply_group

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == len(LlamaAdapter.groups) + 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RTN, "apply_group", interrupted)
    args = ["quantize", tiny_llama, "-o", out, "--bits", "3", "--group-size", "32", "--overwrite"]
    result = cli(*args)
    assert result.exit_code == 130
    assert "--resume" in result.stderr
    assert snapshot(out) == before
    monkeypatch.setattr(RTN, "apply_group", original)
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert snapshot(out) != before
    assert json.loads((out / "manifest.json").read_text())["method"]["config"]["bits"] == 3
    assert cli("verify", out).exit_code == 0


# ---------------------------------------------------------------- 9. verify

def test_verify_intact_artifact(artifact):
    result = cli("verify", artifact)
    assert result.exit_code == 0, result.stderr
    assert "ok" in result.stdout
    assert api.verify(artifact)["ok"] is True


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight_packed",
                                    "model.layers.2.self_attn.q_proj.weight_scale",
                                    "model.embed_tokens.weight"])
def test_verify_names_the_flipped_tensor(tensor, artifact, tmp_path):
    damaged = copy_model(artifact, tmp_path / "damaged")
    f = damaged / "model.safetensors"
    entries, _ = read_header(f)
    entry = entries[tensor]
    data = bytearray(f.read_bytes())
    data[(entry.start + entry.end) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    message = assert_cli_error(cli("verify", damaged), f"tensor {tensor} in model.safetensors is corrupted")
    assert message.count("is corrupted") == 1  # only the damaged tensor is blamed
    with pytest.raises(CompressorError, match=re.escape(tensor)):
        api.verify(damaged)


def test_verify_names_a_corrupted_file(artifact, tmp_path):
    damaged = copy_model(artifact, tmp_path / "damaged")
    config = json.loads((damaged / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (damaged / "config.json").write_text(json.dumps(config))
    assert_cli_error(cli("verify", damaged), "file config.json is corrupted")


def test_verify_truncated_artifact(artifact, tmp_path):
    damaged = copy_model(artifact, tmp_path / "damaged")
    _truncate(damaged)
    assert_cli_error(cli("verify", damaged), "model.safetensors", "truncated")


def test_verify_not_an_artifact(tiny_llama, tmp_path):
    assert_cli_error(cli("verify", tiny_llama), "manifest.json")
    assert_cli_error(cli("verify", tmp_path / "nosuch"), "does not exist")


# ---------------------------------------------------------------- 10. resume

def test_resume_without_interrupted_run(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--resume"), "no interrupted run", "drop --resume")
    assert not out.exists()


def test_interrupted_run_requires_resume_or_restart(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    options = ["--bits", "4", "--group-size", "32", "--asym"]
    calls = []
    original = RTN.apply_group

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > len(LlamaAdapter.groups):
            raise RuntimeError("killed on the 2nd block")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(RTN, "apply_group", failing)
        with pytest.raises(RuntimeError, match="2nd block"):
            api.quantize(str(tiny_llama), "rtn", out, RTN_OPTIONS)
    run_dir = api.run_directory_for(out)
    assert (run_dir / "run.json").is_file() and not out.exists()
    run_before = snapshot(run_dir)

    assert_cli_error(cli("quantize", tiny_llama, "-o", out, *options), "interrupted run", "--resume",
                     "--restart")
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, *options, "--resume", "--restart"),
                     "--resume", "--restart")
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--bits", "3", "--group-size", "32", "--resume"),
                     "other settings", "--restart")
    assert snapshot(run_dir) == run_before and not out.exists()

    result = cli("quantize", tiny_llama, "-o", out, *options, "--resume")
    assert result.exit_code == 0, result.stderr
    assert not run_dir.exists()
    assert cli("verify", out).exit_code == 0
    # Same tensors as an uninterrupted run.
    fresh = tmp_path / "fresh"
    api.quantize(str(tiny_llama), "rtn", fresh, RTN_OPTIONS)
    manifest = lambda p: json.loads((p / "manifest.json").read_text())["tensors"]  # noqa: E731
    assert manifest(out) == manifest(fresh)


def test_restart_discards_interrupted_run(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def failing(self, *args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(RTN, "apply_group", failing)
        with pytest.raises(RuntimeError):
            api.quantize(str(tiny_llama), "rtn", out, RTN_OPTIONS)
    assert (api.run_directory_for(out) / "run.json").is_file()
    result = cli("quantize", tiny_llama, "-o", out, "--group-size", "32", "--restart")
    assert result.exit_code == 0, result.stderr
    assert not api.run_directory_for(out).exists()
    assert cli("verify", out).exit_code == 0


# ---------------------------------------------------------------- 11. unknown names

def test_unknown_method_lists_methods(tiny_llama, tmp_path):
    message = assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "out", "--method", "nosuch"),
                               "unknown method 'nosuch'")
    assert "rtn" in message.split("nosuch", 1)[1]
    assert not (tmp_path / "out").exists()


def test_unknown_asset(monkeypatch):
    from compressor.models import assets

    def no_network(*args, **kwargs):
        raise AssertionError("must not try to fetch anything")

    monkeypatch.setattr(assets, "locate", no_network)
    message = assert_cli_error(cli("assets", "fetch", "nosuch"), "unknown asset 'nosuch'")
    assert "smollm2-135m" in message and "wiki" in message


# ---------------------------------------------------------------- quantization inputs (issue 3)

def _with_tensor_edit(model_dir: Path, out: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(model_dir, out)
    state = load_file(out / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weight_names_the_layer(method, tiny_llama, text_file, tmp_path):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    model = _with_tensor_edit(tiny_llama, tmp_path / "nan-model", poison)
    result = cli("quantize", str(model), "--method", method, "--calib", str(text_file), "--samples", "4",
                 "--seq-len", "32", "-o", str(tmp_path / "q"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: model.layers.1.mlp.up_proj has NaN or Inf in its weights; ")
    assert "embedding" not in result.stderr  # found before any calibration work
    assert not (tmp_path / "q").exists()


def test_inf_activations_name_the_layer(tiny_llama, text_file, tmp_path):
    def blow_up(state):  # an infinite norm weight makes every input of block 1's MLP infinite
        state["model.layers.1.post_attention_layernorm.weight"][0] = float("inf")
    model = _with_tensor_edit(tiny_llama, tmp_path / "inf-model", blow_up)
    result = cli("quantize", str(model), "--method", "gptq", "--calib", str(text_file), "--samples", "4",
                 "--seq-len", "32", "-o", str(tmp_path / "q"))
    assert result.exit_code == 2
    assert "activations entering model.layers.1.mlp.gate_proj/mlp.up_proj contain NaN or Inf" in result.stderr


def test_too_few_calibration_tokens_for_the_hessian_warns(tiny_llama, text_file, tmp_path):
    result = cli("quantize", str(tiny_llama), "--method", "gptq", "--calib", str(text_file), "--samples", "2",
                 "--seq-len", "32", "-o", str(tmp_path / "q"))
    assert result.exit_code == 0, result.stderr
    assert "warning: 64 calibration tokens cannot give full-rank Hessians for linears with 128 inputs; " \
           "use at least 128 tokens" in result.stderr
    assert (tmp_path / "q" / "model.safetensors").exists()
