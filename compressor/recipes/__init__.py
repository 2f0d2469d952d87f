"""YAML recipes: a named chain of stages, validated before anything runs.

    name: w4a16-gptq
    stages:
      - quantize:
          method: gptq                  # or a list run in one pass: [awq, gptq], [slicegpt, gptq]
          options: {bits: 4, group_size: 64, act_order: true}
          calib: {data: wiki, samples: 128, seq_len: 512}

Stage kinds: quantize and prune (an engine pass), distill (the previous output learns from the
recipe's input model), evaluate (perplexity and KL to the input model; writes nothing).

Unknown keys anywhere are errors (recipe typos must not pass silently), and each stage's
method options are checked against the method's own settings before the first stage starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compressor.errors import CompressorError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibSpec(_Strict):
    data: str = "wiki"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=1)
    seed: int = 0
    text_field: str = "text"
    chat_template: bool = False
    batch_size: int = Field(8, ge=1)


class MethodsStage(_Strict):
    """One engine pass: a method, a list name (awq+gptq) or a list ([slicegpt, gptq])."""

    method: str | list[str]
    options: dict[str, Any] = Field(default_factory=dict)
    calib: CalibSpec = CalibSpec()


class DistillStage(_Strict):
    """Distill the previous stage's output (the student) from the recipe's input model (the
    teacher, unless one is named) on `data`; `settings` are `compress distill`'s."""

    data: str | list[str] = "wiki"
    eval_data: str = "wiki"
    teacher: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class EvaluateStage(_Strict):
    """Perplexity and KL to the recipe's input model of the artifact so far (writes nothing)."""

    data: str = "wiki"
    windows: int = Field(64, ge=1)
    window_len: int = Field(512, ge=2)


class Stage(_Strict):
    quantize: MethodsStage | None = None
    prune: MethodsStage | None = None
    distill: DistillStage | None = None
    evaluate: EvaluateStage | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Stage":
        kinds = [k for k, v in self if v is not None]
        if len(kinds) != 1:
            raise ValueError(f"a stage names exactly one of {', '.join(type(self).model_fields)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def spec(self) -> MethodsStage | DistillStage | EvaluateStage:
        return getattr(self, self.kind)

    @property
    def writes(self) -> bool:
        """Whether the stage makes an artifact (every kind but evaluate)."""
        return self.kind != "evaluate"


class Recipe(_Strict):
    name: str
    description: str = ""
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _starts_with_an_artifact(self) -> "Recipe":
        if not self.stages[0].writes:
            raise ValueError("the first stage must write an artifact (quantize, prune or distill); evaluate follows one")
        return self


SHIPPED = Path(__file__).parent


def shipped() -> dict[str, Path]:
    """The recipes that come with compressor, by name (`compress run w4a16-gptq ...`)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def recipe_path(ref: str | Path) -> Path:
    """A recipe file, or the shipped recipe of that name."""
    path = Path(ref)
    if path.is_file():
        return path
    by_name = shipped()
    if str(ref) in by_name:
        return by_name[str(ref)]
    raise CompressorError(f"recipe {ref} is neither a file nor a shipped recipe",
                          f"pass a recipe YAML file or one of: {', '.join(by_name)}")


def load_recipe(ref: str | Path) -> Recipe:
    path = recipe_path(ref)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise CompressorError(f"recipe {path} is not valid YAML{where}", "fix the YAML syntax") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "recipe"
        raise CompressorError(f"recipe {path}: {field}: {err['msg']}",
                              f"see the shipped recipes in {SHIPPED} for the recipe keys") from None
