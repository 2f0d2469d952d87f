"""Command-line options derived from the registered methods' settings: every field of every
method's pydantic config becomes a `--field-name` option (bools a `--x/--no-x` pair, lists a
comma-separated value), with the field's description and each method's default as its help.
`--opt key=value` reaches any field too. Adding a method adds its options here without a line of
CLI code."""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any, Callable, Literal, Optional

import typer

from compressor.errors import CompressorError


def _method_fields() -> dict[str, list[tuple[str, Any]]]:
    """Field name → [(method name, pydantic field info)] over every registered method."""
    from compressor.methods import METHODS

    fields: dict[str, list[tuple[str, Any]]] = {}
    for name, cls in METHODS.items():
        for field, info in cls.Config.model_fields.items():
            fields.setdefault(field, []).append((name, info))
    return fields


def _base_type(annotation: Any) -> Any:
    """int/float/str/bool of a field (Optional[...] unwrapped; Literal and list as str)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin is Literal or origin is list:
        return str
    return annotation if annotation in (int, float, str, bool) else str


def _list_item_type(annotation: Any) -> Any | None:
    for candidate in [annotation, *typing.get_args(annotation)]:
        if typing.get_origin(candidate) is list:
            return typing.get_args(candidate)[0]
    return None


def _help(field: str, owners: list[tuple[str, Any]]) -> str:
    description = next((info.description for _, info in owners if info.description), field.replace("_", " "))
    by_default: dict[str, list[str]] = {}
    for method, info in owners:
        by_default.setdefault(json.dumps(info.default), []).append(method)
    choices = typing.get_args(owners[0][1].annotation) if typing.get_origin(owners[0][1].annotation) is Literal else ()
    parts = [description[0].upper() + description[1:] if description[0].isascii() else description]
    if choices:
        parts.append(f"one of {', '.join(map(str, choices))}")
    if len(by_default) == 1:
        parts.append(f"default {next(iter(by_default))}")
    else:
        parts.append("default " + "; ".join(f"{v} for {', '.join(ms)}" for v, ms in by_default.items()))
    parts.append(f"({', '.join(m for m, _ in owners)})")
    return "; ".join(parts[:-1]) + " " + parts[-1] + "."


def method_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per method setting, as typer options."""
    return [_option(field, owners[0][1], _help(field, owners)) for field, owners in sorted(_method_fields().items())]


def _option(field: str, info: Any, help: str) -> inspect.Parameter:
    flag = (info.json_schema_extra or {}).get("flag") if isinstance(info.json_schema_extra, dict) else None
    kind = _base_type(info.annotation)
    if kind is bool:
        decls = [flag or f"--{field.replace('_', '-')}/--no-{field.replace('_', '-')}"]
    else:
        decls = [flag or f"--{field.replace('_', '-')}"]
    option = typer.Option(None, *decls, help=help, show_default=False)
    return inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def with_settings_options(settings: type, command: Callable[..., None]) -> Callable[..., None]:
    """Give a command one option per field of a pydantic settings model (help from the field's
    description, with its default); the function receives them as keyword arguments, None where
    not given (`given_settings` keeps the others)."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own}
    extra = []
    for field, info in settings.model_fields.items():
        if field not in taken:
            description = info.description or field.replace("_", " ")
            extra.append(_option(field, info, f"{description[0].upper()}{description[1:]}; default "
                                              f"{json.dumps(info.default)}."))
    command.__signature__ = signature.replace(parameters=own + extra)
    return command


def given_settings(settings: type, values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in settings.model_fields and v is not None}


OPT_PARAMETER = inspect.Parameter(
    "opt", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
    default=typer.Option(None, "--opt", help="A method setting as key=value (repeatable); values are JSON where "
                                             "they parse (true, 0.5, [0.2, 0.3]), else text."))


def collect(values: dict[str, Any]) -> dict[str, Any]:
    """The method settings a command received: derived options that were given, then --opt pairs."""
    fields = _method_fields()
    options: dict[str, Any] = {}
    for field, owners in fields.items():
        value = values.get(field)
        if value is None:
            continue
        item = _list_item_type(owners[0][1].annotation)
        if item is not None and isinstance(value, str):
            try:
                value = [item(v) for v in value.split(",")]
            except ValueError:
                raise CompressorError(f"--{field.replace('_', '-')} must be comma-separated {item.__name__} values, "
                                      f"got {value!r}", "e.g. 0.2,0.25,0.3") from None
        options[field] = value
    for pair in values.get("opt") or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CompressorError(f"--opt takes key=value, got {pair!r}", "e.g. --opt damp=0.02")
        try:
            options[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = raw
    return options


def calibration_parameters() -> list[inspect.Parameter]:
    """The calibration settings (recipes' `calib`) as typer options with their defaults."""
    from compressor.recipes import CalibSpec

    params = []
    for field, info in CalibSpec.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        decl = extra.get("flag") or f"--{field.replace('_', '-')}"
        kind = _base_type(info.annotation)
        help_text = info.description[0].upper() + info.description[1:] + "."
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                        default=typer.Option(info.default, decl, help=help_text)))
    return params


def calibration(values: dict[str, Any]):
    """The calibration settings a command received (checked where they are used, as in recipes)."""
    from compressor.recipes import CalibSpec

    return CalibSpec.model_construct(**{k: values[k] for k in CalibSpec.model_fields if k in values})


def with_method_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command function the calibration and method options (typer reads its signature);
    the function receives them as keyword arguments, read back with `calibration` and `collect`."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own}
    extra = [p for p in calibration_parameters() + method_parameters() if p.name not in taken] + [OPT_PARAMETER]
    command.__signature__ = signature.replace(parameters=own + extra)
    return command
