"""Compression methods, each a registered class behind the interface in methods.base.

Importing this package imports every module of its method families (quant, prune, ...), so the
registries are complete at import time and a new method is one new file in its family's folder.
"""

import importlib
import pkgutil

from compressor.methods.base import METHOD_LISTS, METHODS, Method, MethodConfig  # noqa: F401

FAMILIES = ("quant", "prune")

for _family in FAMILIES:
    _package = importlib.import_module(f"{__name__}.{_family}")
    for _module in sorted(m.name for m in pkgutil.iter_modules(_package.__path__)):
        importlib.import_module(f"{_package.__name__}.{_module}")
