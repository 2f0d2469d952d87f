"""YAML recipes: a named chain of stages, validated before anything runs.

    name: release
    stages:
      - prune:    {method: modegpt, options: {sparsity: 0.25}, calib: {samples: 128}}
      - distill:  {data: wiki, settings: {tokens: 64K}}
      - quantize: {method: gptq, options: {bits: 4, group_size: 64, act_order: true}}
      - pack:     {dtype: keep}
      - eval:     {texts: [wiki, austen], windows: 64}
      - report:   {}

`compress run RECIPE MODEL -o DIR` writes each stage's output under DIR (`01-prune/`,
`02-distill/`, ..., `04-eval.json`, `05-report/`), each stage reading the artifact the stage
before it made, and resumes after the last finished stage. A quantize or prune stage is one
engine pass over a method or a list ([awq, gptq], [slicegpt, gptq]); a distill stage trains the
artifact so far (the student) on logits of the recipe's input model (the teacher).

Unknown keys anywhere are errors naming the line, stage orders that cannot work (a pruner,
quantizer or distillation after `pack`, which leaves no float weights to change) are errors, each
stage's method options and distillation settings are checked against their own settings, and
stage names are bare directory names: all before the first stage starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.errors import CompressorError
from compressor.outputs import is_safe_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibSpec(_Strict):
    """Calibration data of an engine pass (recipe key `calib`; on the command line `--calib` and friends)."""

    data: str = Field("wiki", description="calibration data: a .txt/.jsonl/.parquet file, a saved dataset, 'wiki' or "
                      "'austen:train'; several comma-separated (e.g. 'wiki,austen:train') are used one after another",
                      json_schema_extra={"flag": "--calib"})
    samples: int = Field(128, ge=1, description="calibration samples")
    seq_len: int = Field(512, ge=1, description="tokens per calibration sample")
    seed: int = Field(0, description="seed for choosing calibration samples")
    text_field: str = Field("text", description="text column of jsonl/parquet/dataset data")
    chat_template: bool = Field(False, description="render calibration documents through the chat template")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass")


class _StageSpec(_Strict):
    # The directory (or file stem) of the stage's output inside DIR; default NN-kind.
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _bare(cls, value: str | None) -> str | None:
        if value is not None and (not is_safe_name(value) or value.startswith(".")):
            raise ValueError(f"stage name {value!r} must be a bare directory name inside the output directory")
        return value


class MethodsStage(_StageSpec):
    """One engine pass: a method, a list name (awq+gptq) or a list ([slicegpt, gptq])."""

    method: str | list[str]
    options: dict[str, Any] = Field(default_factory=dict)
    calib: CalibSpec = CalibSpec()


class DistillStage(_StageSpec):
    """Distill the previous stage's output (the student) from the recipe's input model (the
    teacher, unless one is named) on `data`; `settings` are `compress distill`'s."""

    data: str | list[str] = "wiki"
    eval_data: str = "wiki"
    teacher: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class PackStage(_StageSpec):
    """Lossless entropy coding of the artifact so far (`compress pack`)."""

    dtype: str = "keep"
    options: dict[str, Any] = Field(default_factory=dict)


class EvalStage(_StageSpec):
    """Perplexity and KL to the source model on held-out texts, and lm-eval tasks, of the artifact so far."""

    texts: list[str] = Field(default_factory=lambda: ["wiki"])
    windows: int = Field(64, ge=1)
    window_len: int = Field(512, ge=2)
    tasks: list[str] = Field(default_factory=list)
    limit: float | None = None
    batch_size: int = Field(4, ge=1)


class ReportStage(_StageSpec):
    """A comparison report of every artifact the recipe made against the source model (the eval
    stage's settings, so its evaluations are reused)."""

    title: str | None = None


ARTIFACT_STAGES = ("prune", "distill", "quantize", "pack")


class Stage(_Strict):
    prune: MethodsStage | None = None
    distill: DistillStage | None = None
    quantize: MethodsStage | None = None
    pack: PackStage | None = None
    eval: EvalStage | None = None
    report: ReportStage | None = None

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
    def spec(self):
        return getattr(self, self.kind)

    @property
    def makes_artifact(self) -> bool:
        return self.kind in ARTIFACT_STAGES


class Recipe(_Strict):
    name: str
    description: str = ""
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> "Recipe":
        packed_at = None
        for index, stage in enumerate(self.stages):
            if stage.kind == "pack":
                packed_at = packed_at or index + 1
            elif stage.kind in ("prune", "distill", "quantize") and packed_at:
                raise ValueError(f"stage {index + 1} ({stage.kind}) comes after stage {packed_at} (pack), which "
                                 "leaves no float weights to change; pack last")
        if self.stages[-1].kind == "report" and not any(s.makes_artifact or s.kind == "eval" for s in self.stages):
            raise ValueError("a report stage needs an artifact or an evaluation before it")
        names = [s.spec.name for s in self.stages if s.spec.name]
        if len(names) != len(set(names)):
            raise ValueError("two stages have the same name")
        return self

    def stage_names(self) -> list[str]:
        return [s.spec.name or f"{i + 1:02d}-{s.kind}" for i, s in enumerate(self.stages)]


SHIPPED = Path(__file__).parent


def shipped() -> dict[str, Path]:
    """The recipes that come with compressor, by name (`compress run w4a16-gptq ...`)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 64  # nested mappings and lists; shipped recipes use 4
# libyaml's parser where PyYAML was built with it (several times faster than the pure-Python one)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise CompressorError(f"recipe {path} is {path.stat().st_size} bytes, more than a recipe can need",
                              "pass the recipe YAML file itself")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CompressorError(f"recipe {path} is not UTF-8 text", "save the recipe as UTF-8 YAML") from None
    try:
        _check_events(text, path)  # before building anything: aliases and nesting depth from the event stream
        raw = yaml.load(text, Loader=_LOADER)
    except RecursionError:
        raise CompressorError(f"recipe {path} is nested too deeply", "fix the YAML structure") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise CompressorError(f"recipe {path} is not valid YAML{where}", "fix the YAML syntax") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(str(p) for p in loc) or "recipe"
        line = _line_of(yaml.compose(text, Loader=_LOADER), loc)
        where = f" (line {line})" if line else ""
        raise CompressorError(f"recipe {path}{where}: {field}: {err['msg']}",
                              f"see the shipped recipes in {SHIPPED} for the recipe keys") from None


def _check_events(text: str, path: Path) -> None:
    """Refuse YAML aliases (a billion laughs) and nesting deeper than any recipe needs, reading the
    parser's events one at a time (no recursion, nothing built)."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise CompressorError(f"recipe {path} uses YAML aliases (*name)", "write each setting out in full")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise CompressorError(f"recipe {path} is nested too deeply (more than {MAX_RECIPE_DEPTH} levels)",
                                      "fix the YAML structure")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _line_of(node, loc: list) -> int | None:
    """The 1-based line of the YAML node at a validation error's location (the deepest one found)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
