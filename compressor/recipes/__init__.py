"""YAML recipes: a named chain of stages, validated before anything runs.

    name: w4a16-gptq
    stages:
      - quantize:
          method: gptq
          options: {bits: 4, group_size: 64, act_order: true}
          calib: {data: wiki, samples: 128, seq_len: 512}

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


class QuantizeStage(_Strict):
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    calib: CalibSpec = CalibSpec()


class Stage(_Strict):
    quantize: QuantizeStage | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Stage":
        kinds = [k for k, v in self if v is not None]
        if len(kinds) != 1:
            raise ValueError(f"a stage names exactly one of {', '.join(type(self).model_fields)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)


class Recipe(_Strict):
    name: str
    description: str = ""
    stages: list[Stage] = Field(min_length=1)


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
