"""Recipes: the shipped ones validate, a recipe run equals the command it describes, typos are errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from compressor import api
from compressor.errors import CompressorError
from compressor.recipes import load_recipe, recipe_path, shipped
from helpers import api_in_subprocess, artifact_files, cli

RECIPES = sorted(shipped().values())


def test_the_issue_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"w4a16-gptq", "w4a16-awq-gptq", "w8a8-smoothquant", "fp8"} <= names


def test_recipes_are_package_data_addressable_by_name():
    import compressor

    package = Path(compressor.__file__).parent
    assert all(package in p.parents for p in RECIPES)
    assert load_recipe("w4a16-gptq").name == "w4a16-gptq"
    assert recipe_path("fp8") == shipped()["fp8"]


def test_unknown_recipe_name_lists_the_shipped_ones(tiny_llama, tmp_path):
    result = cli("run", "w4a16-nope", tiny_llama, "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "w4a16-gptq" in result.stderr and "neither a file nor a shipped recipe" in result.stderr


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for stage in recipe.stages:
        api.check_stage(stage)
    assert recipe.stages[-1].kind == "report"  # every shipped recipe ends with its report


def test_recipe_run_equals_the_quantize_command(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - quantize:\n      method: gptq\n"
                      "      options: {bits: 4, group_size: 32, act_order: true}\n"
                      "      calib: {samples: 8, seq_len: 64}\n")
    result = cli("run", recipe, tiny_llama, "-o", tmp_path / "via-recipe", "--calib", text_file)
    assert result.exit_code == 0, result.stderr
    api.quantize(str(tiny_llama), "gptq", tmp_path / "direct", {"bits": 4, "group_size": 32, "act_order": True},
                 calib=str(text_file), samples=8, seq_len=64)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "via-recipe" / "01-quantize" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


@pytest.mark.parametrize("body,phrase", [
    ("name: r\nstages:\n  - quantize: {method: gptq, optoins: {bits: 4}}\n", "(line 3): stages.0.quantize.optoins"),
    ("name: r\nstages:\n  - quantize:\n      method: rtn\n      calib:\n        sample: 4\n",
     "(line 6): stages.0.quantize.calib.sample"),
    ("name: r\nstages:\n  - pack: {}\n  - quantize: {method: rtn}\n", "comes after stage 1 (pack)"),
    ("name: r\nstages:\n  - quantize: {method: rtn, name: ../escape}\n", "bare directory name"),
    ("name: r\nstages:\n  - quantize: {method: rtn, name: /tmp/x}\n", "bare directory name"),
    ("name: r\nstages:\n  - pack: {options: {lanes: -1}}\n", "invalid pack option"),
    ("name: r\nstages:\n  - quantize: {method: gptq, options: {bits: 9}}\n", "invalid gptq setting bits"),
    ("name: r\nstages:\n  - quantize: {method: nope}\n", "unknown method"),
    ("name: r\nstages: []\n", "stages"),
    ("name: r\nstages:\n  - [unclosed\n", "not valid YAML"),
])
def test_bad_recipe_is_one_line_before_any_work(body, phrase, tiny_llama, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    result = cli("run", recipe, tiny_llama, "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


CHAIN = """name: chain
stages:
  - prune: {method: slicegpt, options: {sparsity: 0.25}, calib: {samples: 16, seq_len: 64}}
  - quantize: {method: gptq, options: {group_size: 16}, calib: {samples: 16, seq_len: 64}}
  - pack: {}
  - eval: {texts: [wiki], windows: 2, window_len: 32}
  - report: {title: chain}
"""


def test_chained_recipe_writes_every_stage_and_a_report(fake_wiki, tiny_llama, tmp_path):
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(CHAIN)
    out = tmp_path / "out"
    result = api.run_recipe(recipe, str(tiny_llama), out)
    assert list(result["stages"]) == ["01-prune", "02-quantize", "03-pack", "04-eval", "05-report"]
    assert json.loads((out / "02-quantize" / "config.json").read_text())["slicing"]
    assert (out / "03-pack" / "pack.json").is_file() and result["artifact"] == str(out / "03-pack")
    evaluation = json.loads((out / "04-eval.json").read_text())
    assert evaluation["model"] == str(out / "03-pack") and evaluation["result"]
    report = (out / "05-report" / "report.md").read_text()
    assert all(name in report for name in ("01-prune", "02-quantize", "03-pack"))
    for stage in ("01-prune", "02-quantize", "03-pack"):
        assert cli("verify", out / stage).exit_code == 0


def test_a_finished_run_is_replaced_only_with_overwrite(fake_wiki, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - quantize: {method: rtn, options: {group_size: 32}}\n")
    out = tmp_path / "out"
    api.run_recipe(recipe, str(tiny_llama), out)
    with pytest.raises(CompressorError, match="a finished recipe run exists"):
        api.run_recipe(recipe, str(tiny_llama), out)
    api.run_recipe(recipe, str(tiny_llama), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["01-quantize", "recipe-run.json"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(CompressorError, match="not a compressor artifact"):
        api.run_recipe(recipe, str(tiny_llama), foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "x"


KILL_IN_SECOND_STAGE = """
import os, signal
from compressor.pipeline.checkpoint import RunDirectory
save_block, calls = RunDirectory.save_block, []
def save_then_die(self, index, *args, **kwargs):
    save_block(self, index, *args, **kwargs)
    calls.append(index)
    if len(calls) == 5:  # the prune stage saved blocks 0-2, then the quantize stage blocks 0-1
        os.kill(os.getpid(), signal.SIGKILL)
RunDirectory.save_block = save_then_die
"""


def test_killed_chain_resumes_after_its_last_finished_stage(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(CHAIN.split("  - pack")[0])
    clean = tmp_path / "clean"
    api.run_recipe(recipe, str(tiny_llama), clean, calib=str(text_file))
    out = tmp_path / "killed"
    killed = api_in_subprocess("run_recipe", recipe, str(tiny_llama), out, calib=str(text_file),
                               setup=KILL_IN_SECOND_STAGE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((out / "recipe-run.json").read_text())
    assert list(state["done"]) == ["01-prune"] and not (out / "02-quantize").exists()
    with pytest.raises(CompressorError, match="an interrupted recipe run exists"):
        api.run_recipe(recipe, str(tiny_llama), out, calib=str(text_file))
    api.run_recipe(recipe, str(tiny_llama), out, calib=str(text_file), resume=True)
    for stage in ("01-prune", "02-quantize"):
        resumed, uninterrupted = artifact_files(out / stage), artifact_files(clean / stage)
        manifests = [json.loads(files.pop("manifest.json")) for files in (resumed, uninterrupted)]
        for manifest in manifests:  # where each stage read its input from differs; nothing else may
            manifest["source"].pop("ref")
        assert resumed == uninterrupted and manifests[0] == manifests[1]


def test_prune_distill_eval_recipe_runs_end_to_end(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: r
stages:
  - prune: {{method: minitron, options: {{ffn: 64}}, calib: {{data: {text_file}, samples: 8, seq_len: 32}}}}
  - distill: {{data: {text_file}, eval_data: {text_file}, settings: {{tokens: 512, seq_len: 32, batch_size: 4,
               eval_windows: 2}}}}
  - eval: {{texts: [{text_file}], windows: 2, window_len: 32}}
""")
    out = tmp_path / "out"
    result = api.run_recipe(recipe, str(tiny_llama), out)
    assert list(result["stages"]) == ["01-prune", "02-distill", "03-eval"]
    assert result["stages"]["02-distill"]["steps"] == 4 and result["artifact"] == str(out / "02-distill")
    manifest = json.loads((out / "02-distill" / "manifest.json").read_text())
    assert manifest["metrics"]["tokens"] == 512 and manifest["metrics"]["steps"] == 4
    evaluation = json.loads((out / "03-eval.json").read_text())
    assert evaluation["model"] == str(out / "02-distill") and evaluation["result"]


def test_distill_after_pack_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - quantize: {method: rtn}\n  - pack: {}\n  - distill: {data: wiki}\n")
    with pytest.raises(CompressorError, match="stage 3 \\(distill\\) comes after stage 2 \\(pack\\)"):
        load_recipe(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp8", "lossless-pack"])
def test_small_shipped_recipes_run_end_to_end_on_the_reference_model(name, tmp_path):
    out = tmp_path / name
    result = api.run_recipe(name, "smollm2-135m", out)
    names = load_recipe(name).stage_names()
    assert list(result["stages"]) == names
    assert (out / names[-1] / "report.html").is_file()
    evaluation = json.loads((out / f"{names[-2]}.json").read_text())
    assert evaluation["result"]
