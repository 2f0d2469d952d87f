"""RTN: round-to-nearest weight quantization, symmetric or asymmetric, per channel or per group.

Needs no calibration data: each weight matrix is quantized on its own with min-max scales.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compressor.methods.base import METHODS, BlockContext, Method, MethodConfig, Record
from compressor.methods.quant.quantizer import check_scheme, compute_qparams, dequantize_record, make_record
from compressor.models.adapters import Adapter, LinearGroup
from compressor.schemes import WeightScheme


class WeightQuantConfig(MethodConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per weight, 2..8")
    group_size: int = Field(64, ge=-1, description="columns sharing a scale; -1 for per-channel")
    sym: bool = Field(True, description="symmetric (no zero point), or integer zero points",
                      json_schema_extra={"flag": "--sym/--asym"})
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of the stored scales")

    @field_validator("group_size")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 is not a group size; use -1 for per-channel scales")
        return value

    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.sym, self.scale_dtype)


@METHODS.register("rtn")
class RTN(Method):
    Config = WeightQuantConfig
    produces = "weights"

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def qparams(self, w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and integer zero point) per row and group: min-max here; refinements override it."""
        return compute_qparams(w, scheme)

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        records = {}
        scheme = self.config.scheme()
        for name, linear in linears.items():
            w = linear.weight.data
            record = make_record(w, *self.qparams(w, scheme), scheme)
            linear.weight.data = dequantize_record(record, w.dtype)
            records[name] = record
        return records

    def export(self) -> dict:
        return {"kind": "weight-int", "scheme": self.config.scheme()}
