"""Structured pruning methods: slicing (SliceGPT) and modular decomposition (MoDeGPT)."""

from compressor.methods.prune import slicegpt  # noqa: F401  (registers)
from compressor.methods.prune import modegpt  # noqa: F401,E402  (registers)
