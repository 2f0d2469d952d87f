"""Candidate formats of a mixed-precision search: integer weights at a bit width and group size,
or the weight kept in 16-bit floats, with their storage cost counted exactly as the artifact stores
it (compressed-tensors pack-quantized: codes packed in int32 words per row, one scale per row and
group, integer zero points packed along the output dimension).

Names are what plans, manifests and the command line use: `int4-g64`, `int3-g32`, `fp16`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compressor.errors import CompressorError
from compressor.schemes import WeightScheme

SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
KEEP_BITS = 16
_NAME = re.compile(r"^int([2-8])-g([1-9][0-9]*)$")


@dataclass(frozen=True, order=True)
class Format:
    bits: int  # 16 with group_size 0: kept in float16
    group_size: int

    @property
    def kept(self) -> bool:
        return self.group_size == 0

    @property
    def name(self) -> str:
        return "fp16" if self.kept else f"int{self.bits}-g{self.group_size}"

    def scheme(self, symmetric: bool, scale_dtype: str = "float16") -> WeightScheme | None:
        return None if self.kept else WeightScheme(self.bits, self.group_size, symmetric, scale_dtype)

    def storage_bits(self, out_features: int, in_features: int, symmetric: bool, scale_dtype: str = "float16") -> int:
        """Bits the artifact spends on a linear of this shape (codes, scales, zero points)."""
        if self.kept:
            return KEEP_BITS * out_features * in_features
        groups = in_features // self.group_size
        # Each row's codes fill whole 32-bit words (formats.bitpack.packed_words).
        codes = out_features * math.ceil(in_features * self.bits / 32) * 32
        scales = out_features * groups * SCALE_BITS[scale_dtype]
        zeros = 0 if symmetric else groups * math.ceil(out_features * self.bits / 32) * 32
        return codes + scales + zeros

    def bits_per_weight(self, out_features: int, in_features: int, symmetric: bool,
                        scale_dtype: str = "float16") -> float:
        return self.storage_bits(out_features, in_features, symmetric, scale_dtype) / (out_features * in_features)

    def fits(self, in_features: int) -> bool:
        return self.kept or in_features % self.group_size == 0


KEEP = Format(KEEP_BITS, 0)


def parse_format(name: str) -> Format:
    if name == KEEP.name:
        return KEEP
    match = _NAME.match(name)
    if not match:
        raise CompressorError(f"unknown format {name!r} in the plan",
                              "formats are int<bits>-g<group size> (bits 2..8, e.g. int4-g64) or fp16")
    return Format(int(match.group(1)), int(match.group(2)))


def candidate_formats(bits: list[int], group_sizes: list[int], keep_16bit: bool) -> list[Format]:
    """Every combination, cheapest first within a bit width; the kept format last."""
    formats = [Format(b, g) for b in sorted(set(bits)) for g in sorted(set(group_sizes), reverse=True)]
    return formats + ([KEEP] if keep_16bit else [])


def formats_for(in_features: int, formats: list[Format]) -> list[Format]:
    """The candidates that apply to a linear: group sizes that divide its in-features."""
    return [f for f in formats if f.fits(in_features)]


def unusable_group_sizes(group_sizes: list[int], in_features: set[int]) -> list[int]:
    """Group sizes that divide no linear's in-features (skipped, with a note, never an error)."""
    return sorted(g for g in set(group_sizes) if not any(n % g == 0 for n in in_features))
