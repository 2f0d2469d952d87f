"""Compression methods, each a registered class behind the interface in methods.base."""

from compressor.methods.base import METHODS, Method, MethodConfig  # noqa: F401
from compressor.methods.quant import awq, fp8, gptq, rtn, smoothquant  # noqa: F401  (registers)
