"""Stored bits per weight of every decoder-block linear, read from safetensors headers alone.

Works for every kind of checkpoint we read: float weights (their dtype's bits), compressed-
tensors modules (packed codes + scales + zero points over the logical weight count) and packed
(lossless) artifacts (each tensor's coded bytes over its element count). Tensor names are only
parsed into labels (block index, linear name), never used as paths.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from compressor.safetensors_file import int_values, read_header

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# Per-module tensors that are not weights of the linear itself.
_NOT_WEIGHT = ("bias", "input_scale", "input_zero_point", "output_scale")


def split_block_name(module: str) -> tuple[int, str] | None:
    m = _BLOCK.search(module)
    return (int(m.group(1)), m.group(2)) if m else None


def block_linear_bits(path: Path) -> dict[str, list[float | None]]:
    """{linear name inside a block (e.g. 'self_attn.q_proj'): [bits per weight of block 0, 1, …]}."""
    sizes: dict[str, list[float]] = {}  # module -> [stored bytes, logical weights]
    for f in sorted(Path(path).glob("*.safetensors")):
        entries, metadata = read_header(f)
        if metadata.get("format") == "compressor-packed":
            metas = json.loads(metadata.get("tensors", "{}"))
            for name, e in entries.items():
                module, _, leaf = name.rpartition(".")
                meta = metas.get(name, {})
                if leaf in _NOT_WEIGHT or not module:
                    continue
                acc = sizes.setdefault(module, [0.0, 0.0])
                acc[0] += e.end - e.start
                if leaf == "weight":  # packed int codes (weight_packed) have no float count here: skipped
                    acc[1] += math.prod(meta.get("shape") or [0])
            continue
        for name, e in entries.items():
            module, _, leaf = name.rpartition(".")
            if leaf in _NOT_WEIGHT or not module:
                continue
            acc = sizes.setdefault(module, [0.0, 0.0])
            acc[0] += e.end - e.start
            if leaf == "weight":
                acc[1] += math.prod(e.shape)
            elif leaf == "weight_packed" and f"{module}.weight_shape" in entries:
                acc[1] += math.prod(int_values(f, entries[f"{module}.weight_shape"]))
    out: dict[str, dict[int, float]] = {}
    for module, (stored, count) in sizes.items():
        where = split_block_name(module)
        if where is None or count <= 0:
            continue
        index, linear = where
        if not linear.endswith("proj") and "fc" not in linear and "dense" not in linear:
            continue
        out.setdefault(linear, {})[index] = 8 * stored / count
    blocks = 1 + max((i for per in out.values() for i in per), default=-1)
    return {linear: [per.get(i) for i in range(blocks)] for linear, per in sorted(out.items())}
