"""Lists of methods from what a user writes: `gptq`, `awq,gptq`, `awq+gptq` (a registered list
name), `slicegpt,gptq`. Options are one namespace: each applies to every method in the list whose
settings have that field (bits and group size reach AWQ's search and the quantizer after it), and
an option no method in the list has is an error that lists the valid ones."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from compressor.errors import CompressorError
from compressor.methods.base import METHOD_LISTS, METHODS, Method


def method_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Registered method names, in order, for a spec: names or list names, comma-separated or a list."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        if not part:
            raise CompressorError(f"empty method name in {spec!r}", "separate method names with commas, e.g. awq,gptq")
        if part in METHOD_LISTS and part not in METHODS:
            names.extend(METHOD_LISTS.get(part))
        elif part in METHODS:
            names.append(part)
        else:
            raise CompressorError(f"unknown method {part!r}",
                                  f"choose from: {', '.join(sorted({*METHODS.names(), *METHOD_LISTS.names()}))}")
    classes = [METHODS.get(n) for n in names]
    if not any(c.produces != "transform" for c in classes):
        default = next((c.default_quantizer for c in reversed(classes) if c.default_quantizer), None)
        if default is not None:
            names.append(default)
    return names


def option_fields(names: list[str]) -> dict[str, list[str]]:
    """Option name → the methods of the list that take it."""
    fields: dict[str, list[str]] = {}
    for name in names:
        for field in METHODS.get(name).Config.model_fields:
            fields.setdefault(field, []).append(name)
    return fields


def build_methods(spec: str | list[str], options: dict[str, Any] | None = None, command: str = "quantize",
                  ) -> list[Method]:
    """Configured methods for a spec; options set to None are left at each method's default."""
    names = method_names(spec)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    fields = option_fields(names)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise CompressorError(
            f"option {', '.join(unknown)} does not apply to {' → '.join(names)}",
            f"valid options: {', '.join(sorted(fields)) or 'none'}")
    methods = []
    for name in names:
        cls = METHODS.get(name)
        own = {k: v for k, v in options.items() if k in cls.Config.model_fields}
        try:
            methods.append(cls.from_options(**own))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise CompressorError(f"invalid {name} setting {field}: {err['msg']} (got {err.get('input')!r})",
                                  f"see `compress {command} --help` for valid values") from None
    return methods


def describe(methods: list[Method], spec: str | list[str] | None = None) -> dict:
    """The manifest's account of a list: its name, each method's settings, and all settings merged."""
    name = spec if isinstance(spec, str) else "+".join(m.name for m in methods)
    merged: dict[str, Any] = {}
    for m in methods:
        merged.update(m.config.model_dump(mode="json"))
    return {"name": name, "methods": [m.describe() for m in methods], "config": merged}
