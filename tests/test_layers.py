"""Imports point one way: every import of every module in the package (function-level ones too)
is checked against the layer order agreed in DESIGN.md. A layer may import itself, the shared
foundation modules and the layers below it, directly or through another layer; anything else
fails the test naming the file, the line and the import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compressor"

# Small shared modules every layer may use; they import only each other.
FOUNDATION = {"compressor", "errors", "registry", "util", "devices", "outputs", "safetensors_file", "schemes",
              "_hooks", "progress"}

# The layers each layer builds on (DESIGN.md's arrows; the closure is taken below).
BUILDS_ON: dict[str, set[str]] = {
    "__main__": {"cli"},
    "lm_eval": {"evaluation"},  # `python -m compressor.lm_eval`: lm-eval's CLI with our model registered
    "cli": {"api", "cli_options"},
    "cli_options": {"api"},  # the CLI's options, derived from the method configs
    "api": {"export", "pipeline", "distill", "evaluation", "reporting", "formats", "models", "recipes", "mixed"},
    "distill": {"calib", "formats", "models"},  # knowledge distillation on accelerate
    "mixed": {"pipeline"},  # mixed-precision search: sensitivity pass, probes, knapsack, measured rounds
    "export": {"pipeline", "formats"},  # what an engine run becomes on disk
    "pipeline": {"methods", "calib", "models"},
    "methods": {"calib", "models"},
    "reporting": {"evaluation"},
    "evaluation": {"models", "formats", "calib"},  # calib.data holds the evaluation texts too
    "formats": {"kernels", "codecs", "models"},  # sliced and packed models are written/run from model configs
    "calib": {"models"},  # models.assets locates the cached calibration texts
    "models": set(),
    "recipes": set(),
    "kernels": set(),
    "codecs": set(),
}

# (importing module, imported module): known violations waiting for a change that removes them.
KNOWN: set[tuple[str, str]] = set()


def allowed(layer: str) -> set[str]:
    """The layers `layer` may import: itself, the foundation, and everything below it."""
    seen, todo = {layer}, [layer]
    while todo:
        for below in BUILDS_ON[todo.pop()]:
            if below not in seen:
                seen.add(below)
                todo.append(below)
    return seen | FOUNDATION


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "compressor"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported compressor module) for every import statement in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "compressor"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "compressor":
                continue
            for alias in node.names:  # `from compressor.formats import packed` imports a module
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    layer = layer_of(module)
    if layer not in BUILDS_ON and layer not in FOUNDATION:
        return [f"{module}: no layer for {layer!r}; add it to BUILDS_ON (or FOUNDATION) in tests/test_layers.py"]
    ok = FOUNDATION if layer in FOUNDATION else allowed(layer)
    return [f"{module}:{line} imports {target} ({layer} → {layer_of(target)})"
            for line, target in dict.fromkeys(imports(module, source, is_package))
            if layer_of(target) not in ok and (module, target) not in KNOWN]


def all_modules() -> list[tuple[str, str, bool]]:
    return [(module_name(p), p.read_text(), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))]


def test_imports_follow_the_layer_order():
    problems = [v for module, source, is_package in all_modules() for v in violations(module, source, is_package)]
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_known_exceptions_still_exist():
    """An exception that no longer occurs is removed from KNOWN, so it cannot come back unnoticed."""
    actual = {(module, target) for module, source, is_package in all_modules()
              for _, target in imports(module, source, is_package)}
    assert not KNOWN - actual, f"no longer imported, remove from KNOWN: {sorted(KNOWN - actual)}"


def test_the_check_catches_an_upward_import_inside_a_function():
    source = "import torch\n\ndef f():\n    from compressor.methods.base import Method\n    return Method\n"
    assert violations("compressor.formats.example", source) == [
        "compressor.formats.example:4 imports compressor.methods.base (formats → methods)"]
    assert violations("compressor.errors", "from compressor.models import adapters\n") == [
        "compressor.errors:1 imports compressor.models.adapters (errors → models)"]
    assert violations("compressor.models.example", "from ..formats import artifact\n") == [
        "compressor.models.example:1 imports compressor.formats.artifact (models → formats)"]
    assert violations("compressor.newlayer.x", "") == [
        "compressor.newlayer.x: no layer for 'newlayer'; add it to BUILDS_ON (or FOUNDATION) in tests/test_layers.py"]
