"""The release workflow calls only commands that exist, with a shipped recipe, and the artifacts
it archives are the ones that recipe writes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from compressor.cli import app
from compressor.recipes import load_recipe, shipped

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "release.yml"


def _commands() -> list[list[str]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["release"]["steps"]
    lines = [line for step in steps if "run" in step for line in step["run"].splitlines()]
    commands = []
    for line in lines:
        for part in re.split(r"&&|;|\|\||\bdo\b", line):
            words = shlex.split(part.strip()) if part.strip() else []
            if words and words[0] == "compress":
                commands.append(words)
    return commands


def test_workflow_runs_on_tags_with_write_permission():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML reads the key `on` as True
    assert workflow["permissions"]["contents"] == "write"


def test_every_compress_command_exists_with_its_options():
    from typer.main import get_command

    root = get_command(app)
    commands = _commands()
    assert {tuple(c[:2]) for c in commands} >= {("compress", "run"), ("compress", "verify"), ("compress", "assets")}
    for words in commands:
        group, rest = root, words[1:]
        while rest and hasattr(group, "commands") and rest[0] in group.commands:
            group, rest = group.commands[rest[0]], rest[1:]
        assert not hasattr(group, "commands"), f"{' '.join(words)}: not a command"
        options = {opt for p in group.params for opt in (*p.opts, *p.secondary_opts)}
        for word in rest:
            if word.startswith("-"):
                assert word in options, f"{' '.join(words)}: no option {word}"


def test_the_recipe_it_runs_is_shipped_and_its_archive_matches_the_stages():
    run = next(c for c in _commands() if c[1] == "run")
    recipe = run[2]
    assert recipe in shipped()
    names = load_recipe(recipe).stage_names()
    archive = next(line for step in yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]["steps"]
                   for line in step.get("run", "").splitlines() if line.startswith("tar "))
    for name in names:
        assert name in archive or f"{name}.json" in archive, name
    texts = {t for s in load_recipe(recipe).stages if s.kind == "eval" for t in s.spec.texts}
    fetch = next(c for c in _commands() if c[1] == "assets")
    assert texts <= set(fetch[3:]), "the workflow fetches every text the recipe evaluates on"
