"""compressed-tensors `int-quantized` and `float-quantized`: 8-bit weights with quantized inputs.

Each quantized linear stores `weight` as int8 codes (int-quantized, W8A8) or float8_e4m3fn codes
(float-quantized, FP8), `weight_scale` [out, 1] in float32 (one scale per output channel,
w ≈ weight · weight_scale), and, only when the input activations have a static per-tensor
scale, `input_scale` [1]. Dynamic per-token activation scales are computed at run time, so
nothing is stored for them. transformers (with the compressed-tensors package) and vLLM load
these artifacts; our reader dequantizes the weights and passes `input_scale` through for the
activation simulation in `formats.activations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError
from compressor.formats import ct_config

INT_FORMAT = "int-quantized"
FLOAT_FORMAT = "float-quantized"
SUFFIXES = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")
CODE_DTYPES = {"int": torch.int8, "float": torch.float8_e4m3fn}


@dataclass(frozen=True)
class W8Scheme:
    """8-bit symmetric weights per output channel; 8-bit symmetric inputs of the same type."""

    type: str  # "int" or "float"
    act_dynamic: bool = True  # per-token scales at run time; False: one calibrated scale per tensor

    @property
    def format(self) -> str:
        return INT_FORMAT if self.type == "int" else FLOAT_FORMAT


def _args(kind: str, strategy: str, dynamic: bool):
    return ct_config.args(num_bits=8, type=kind, symmetric=True, strategy=strategy, dynamic=dynamic,
                          observer=None if dynamic else "minmax")


def quantization_config(scheme: W8Scheme, ignore: list[str]) -> dict:
    inputs = _args(scheme.type, "token", True) if scheme.act_dynamic else _args(scheme.type, "tensor", False)
    return ct_config.quantization_config(scheme.format, _args(scheme.type, "channel", False), inputs, ignore)


def scheme_from_config(qconfig: dict) -> W8Scheme:
    fmt = qconfig.get("format")
    groups = qconfig.get("config_groups") or {}
    if len(groups) != 1:
        raise CompressorError(f"expected one config group, found {len(groups)}", "the artifact config is damaged")
    group = next(iter(groups.values()))
    w, a = group.get("weights") or {}, group.get("input_activations")
    kind = "int" if fmt == INT_FORMAT else "float"
    if (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("symmetric")) != (kind, 8, "channel", True):
        raise CompressorError(
            f"unsupported {fmt} weights {w.get('type')}{w.get('num_bits')} {w.get('strategy')} "
            f"(symmetric={w.get('symmetric')})", "this reader handles symmetric 8-bit per-channel weights")
    return W8Scheme(kind, act_dynamic=bool(a and a.get("dynamic")))


def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantize every quantized linear (w = codes · scale, computed in the scale's dtype as
    compressed-tensors does); other tensors, `input_scale` included, pass through."""
    scheme = scheme_from_config(qconfig)
    modules = sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale"))
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ("weight_scale", "weight_zero_point")}
    for m in modules:
        with ct_config.decoding(m):
            codes, scale = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]
            if codes.dtype != CODE_DTYPES[scheme.type]:
                raise ValueError(f"weight dtype {codes.dtype} is not {CODE_DTYPES[scheme.type]}")
            if codes.dim() != 2 or tuple(scale.shape) != (codes.shape[0], 1):
                raise ValueError(f"scale shape {tuple(scale.shape)} != {(codes.shape[0], 1)}")
            if not scheme.act_dynamic and f"{m}.input_scale" not in tensors:
                raise KeyError(f"{m}.input_scale")
            out[f"{m}.weight"] = (codes.to(scale.dtype) * scale).to(dtype)
    return out


class NaiveQuantized:
    """The registered formats of 8-bit weights with quantized inputs (one subclass per code type)."""

    name: str
    kind: str
    type: str
    suffixes = SUFFIXES
    decode = staticmethod(decode)
    schemes = staticmethod(scheme_from_config)

    def __init__(self, export: dict):
        self.scheme = W8Scheme(self.type, export.get("act_dynamic", True))

    def quantization_config(self, ignore: list[str]) -> dict:
        return quantization_config(self.scheme, ignore)

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        codes = record["qweight"]
        if codes.dtype != CODE_DTYPES[self.scheme.type]:
            raise ValueError(f"{module}: {self.scheme.format} stores {CODE_DTYPES[self.scheme.type]} codes, "
                             f"not {codes.dtype}")
        out = {f"{module}.weight": codes.contiguous(),
               f"{module}.weight_scale": record["scale"].to(torch.float32).contiguous()}
        if not self.scheme.act_dynamic:
            out[f"{module}.input_scale"] = record["input_scale"].to(torch.float32).reshape(1).contiguous()
        return out


class IntQuantized(NaiveQuantized):
    name, kind, type = INT_FORMAT, "w8a8-int", "int"


class FloatQuantized(NaiveQuantized):
    name, kind, type = FLOAT_FORMAT, "fp8", "float"
