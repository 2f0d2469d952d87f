"""Recipes: the shipped ones validate, a recipe run equals the command it describes, typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor import api
from compressor.recipes import load_recipe, recipe_path, shipped
from helpers import cli

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
        assert (tmp_path / "via-recipe" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


@pytest.mark.parametrize("body,phrase", [
    ("name: r\nstages:\n  - quantize: {method: gptq, optoins: {bits: 4}}\n", "stages.0.quantize.optoins"),
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


def test_prune_distill_evaluate_recipe_runs_end_to_end(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: r
stages:
  - prune: {{method: minitron, options: {{ffn: 64}}, calib: {{data: {text_file}, samples: 8, seq_len: 32}}}}
  - distill: {{data: {text_file}, eval_data: {text_file}, settings: {{tokens: 512, seq_len: 32, batch_size: 4,
               eval_windows: 2}}}}
  - evaluate: {{data: {text_file}, windows: 2, window_len: 32}}
""")
    result = api.run_recipe(recipe, str(tiny_llama), tmp_path / "out")
    prune, distill, evaluate = result["stages"]
    assert distill["output"] == str(tmp_path / "out") and distill["steps"] == 4
    assert evaluate["model"] == str(tmp_path / "out") and evaluate["kl"] > 0
    assert not (tmp_path / ".out.stages").exists()


def test_a_recipe_must_start_with_an_artifact(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - evaluate: {data: wiki}\n")
    with pytest.raises(Exception, match="first stage must write an artifact"):
        load_recipe(recipe)
