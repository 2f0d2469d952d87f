"""Structured pruning methods: slicing (SliceGPT) and modular decomposition (MoDeGPT)."""
