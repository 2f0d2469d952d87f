"""Mixed-precision integer weights as compressed-tensors pack-quantized with one config group per
distinct format, each targeting its modules by name; linears kept in 16 bits are ignored by the
quantization config and stored as float16 `weight`. transformers (with compressed-tensors) and our
reader (formats.compressed_tensors.decode, which resolves each module's group) load it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from compressor.formats import compressed_tensors
from compressor.safetensors_file import int_values, read_header
from compressor.schemes import WeightScheme

KEPT_DTYPE = torch.float16


class MixedWriter:
    """Writes a method's export {"kind": "weight-int-mixed", "schemes": {module: WeightScheme or None
    (kept in 16 bits)}, "actorder": ...}."""

    def __init__(self, export: dict):
        self.schemes: dict[str, WeightScheme | None] = export["schemes"]
        self.actorder = export.get("actorder")

    def quantization_config(self, ignore: list[str]) -> dict | None:
        kept = sorted(m for m, s in self.schemes.items() if s is None)
        by_scheme: dict[WeightScheme, list[str]] = {}
        for module, scheme in self.schemes.items():
            if scheme is not None:
                by_scheme.setdefault(scheme, []).append(module)
        ordered = sorted(by_scheme, key=lambda s: (s.bits, -s.group_size))
        if not ordered:
            return None
        config = compressed_tensors.quantization_config(ordered[0], [*ignore, *kept], self.actorder)
        template = config["config_groups"]["group_0"]
        config["config_groups"] = {}
        for index, scheme in enumerate(ordered):
            weights = compressed_tensors.quantization_config(scheme, [], self.actorder)["config_groups"]["group_0"]
            config["config_groups"][f"group_{index}"] = {**template, "targets": sorted(by_scheme[scheme]),
                                                         "weights": weights["weights"]}
        return config

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scheme = self.schemes[module]
        if scheme is None:
            return {f"{module}.weight": record["weight"].to(KEPT_DTYPE).contiguous()}
        return compressed_tensors.encode(module, record, scheme)


def is_mixed(qconfig: dict | None) -> bool:
    return bool(qconfig) and len(qconfig.get("config_groups") or {}) > 1


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
