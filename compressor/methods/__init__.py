"""Compression methods, each a registered class behind the interface in methods.base."""

from compressor.methods.base import METHODS, Method, MethodConfig  # noqa: F401
from compressor.methods.quant import gptq, rtn  # noqa: F401  (registers)
from compressor.methods.quant import fp8, smoothquant  # noqa: F401  (registers)
