"""Reading mixed-precision artifacts: compressed-tensors pack-quantized with one config group per
distinct format, each targeting its modules by name (written by formats.compressed_tensors'
PackQuantized with per-module schemes); linears kept in 16 bits are in the config's `ignore` and
stored as float16 `weight`.
"""

from __future__ import annotations

import math
from pathlib import Path

from compressor.safetensors_file import int_values, read_header


def is_mixed(qconfig: dict | None) -> bool:
    """Whether config groups name their modules (a format per linear) rather than every Linear."""
    groups = (qconfig or {}).get("config_groups") or {}
    return any(t != "Linear" for g in groups.values() for t in g.get("targets") or ())


def bit_map(directory: Path, qconfig: dict) -> dict[str, dict]:
    """Per quantized or kept linear: its format and stored bits per weight (codes, scales and zero
    points, or the kept 16-bit weight), read from the artifact's config and safetensors headers."""
    groups = qconfig.get("config_groups") or {}
    formats = {m: _format_name(g["weights"]) for g in groups.values() for m in g.get("targets", ()) if m != "Linear"}
    kept = set(qconfig.get("ignore") or ())
    stored: dict[str, int] = {}
    params: dict[str, int] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        entries, _ = read_header(f)
        for name, e in entries.items():
            module, _, leaf = name.rpartition(".")
            if module in formats and leaf == "weight_shape":
                params[module] = math.prod(int_values(f, e))
            elif module in formats:
                stored[module] = stored.get(module, 0) + e.end - e.start
            elif module in kept and leaf == "weight":
                formats[module] = "fp16"
                stored[module], params[module] = e.end - e.start, math.prod(e.shape)
    return {m: {"format": formats[m], "bits_per_weight": round(8 * stored[m] / params[m], 4), "params": params[m]}
            for m in sorted(params)}


def _format_name(weights: dict) -> str:
    return f"int{weights['num_bits']}-g{weights['group_size']}" if weights.get("group_size") else \
        f"int{weights['num_bits']}-channel"
