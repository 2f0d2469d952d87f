"""Run a registration function once given modules have been imported, whenever that happens."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def _register(module: str, function: str) -> None:
    getattr(importlib.import_module(module), function)()


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, watched: tuple[str, ...], module: str, function: str):
        self.watched = set(watched)
        self.module, self.function = module, function
        self.busy = False

    def find_spec(self, name, path, target=None):
        if name not in self.watched or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, self

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                hook.fired(name)

        spec.loader = Loader()
        return spec

    def fired(self, name: str) -> None:
        self.watched.discard(name)
        if not self.watched and self in sys.meta_path:
            sys.meta_path.remove(self)
        _register(self.module, self.function)


def after_import(name: str, module: str, function: str) -> None:
    """Call module.function() once module `name` has finished importing (now, if it has)."""
    if name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None \
            and not getattr(sys.modules[name].__spec__, "_initializing", False):
        _register(module, function)
        return
    sys.meta_path.insert(0, _AfterImport((name,), module, function))
