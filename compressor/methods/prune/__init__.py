"""Structured pruning methods: slicing (SliceGPT) and modular decomposition (MoDeGPT)."""

from compressor.methods.prune import slicegpt  # noqa: F401  (registers)
