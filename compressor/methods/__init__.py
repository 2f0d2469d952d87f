"""Compression methods, each a registered class behind the interface in methods.base. Importing
this package registers every method, so the registries are complete at import time."""

from compressor.methods.base import METHOD_LISTS, METHODS, Method, MethodConfig  # noqa: F401
from compressor.methods.quant import awq, fp8, gptq, rtn, smoothquant  # noqa: F401  (registers)
from compressor.methods.prune import modegpt, slicegpt  # noqa: F401  (registers)
