"""compressor: one toolchain for LLM compression."""

__version__ = "0.1.0"
