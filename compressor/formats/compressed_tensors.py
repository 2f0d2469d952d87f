"""compressed-tensors export and import of integer weight-only quantization.

Writes the pack-quantized layout (int32 `weight_packed`, `weight_scale`, packed
`weight_zero_point` for asymmetric schemes, `weight_shape`, optional `weight_g_idx`) with a
matching `quantization_config`, so transformers (with the compressed-tensors package) and
vLLM load the artifact. Reading dequantizes back to float weights for our own evaluation.

A linear with a low-rank error correction (GPTQ's `lowrank`) also carries `weight_lowrank_b`
[out, r] and `weight_lowrank_a` [r, in] in bfloat16: our readers use the weight Q + B·A; other
loaders do not know these tensors and load Q alone (transformers reports them as unused).
"""

from __future__ import annotations

import re

import torch

from compressor.errors import CompressorError
from compressor.formats import bitpack, ct_config
from compressor.schemes import WeightScheme, dequantize

FORMAT = "pack-quantized"
LOWRANK = ("weight_lowrank_b", "weight_lowrank_a")
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", *LOWRANK)
KEPT_DTYPE = torch.float16  # a linear a mixed-precision plan keeps unquantized


def weight_args(scheme: WeightScheme, actorder: str | None = None):
    """The library's QuantizationArgs of our integer weight scheme."""
    return ct_config.args(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                          strategy="channel" if scheme.per_channel else "group",
                          group_size=None if scheme.per_channel else scheme.group_size, dynamic=False,
                          actorder=actorder, observer="minmax")


def quantization_config(scheme: WeightScheme, ignore: list[str], actorder: str | None = None) -> dict:
    return ct_config.quantization_config(FORMAT, weight_args(scheme, actorder), None, ignore)


def mixed_quantization_config(schemes: dict[str, WeightScheme | None], ignore: list[str],
                              actorder: str | None = None) -> dict | None:
    """A scheme per module (mixed precision): one config group per distinct scheme targeting its
    modules by name, fewest bits first; modules kept in 16 bits (None) are ignored. None when every
    module is kept."""
    by_scheme: dict[WeightScheme, list[str]] = {}
    for module, scheme in schemes.items():
        if scheme is not None:
            by_scheme.setdefault(scheme, []).append(module)
    if not by_scheme:
        return None
    kept = sorted(m for m, s in schemes.items() if s is None)
    ordered = sorted(by_scheme, key=lambda s: (s.bits, -s.group_size))
    return ct_config.grouped_config(FORMAT, [(sorted(by_scheme[s]), weight_args(s, actorder), None) for s in ordered],
                                    [*ignore, *kept])


def encode(module: str, record: dict[str, torch.Tensor], scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """One quantized linear's record as compressed-tensors parameters under `module.`."""
    codes = record["qweight"]
    out = {
        f"{module}.weight_packed": bitpack.pack(codes, scheme.bits),
        f"{module}.weight_scale": record["scale"].contiguous(),
        f"{module}.weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not scheme.symmetric:
        out[f"{module}.weight_zero_point"] = bitpack.pack(record["zero_point"], scheme.bits, dim=0)
    if "g_idx" in record:
        out[f"{module}.weight_g_idx"] = record["g_idx"].to(torch.int32)
    if "lowrank_b" in record:
        out[f"{module}.weight_lowrank_b"] = record["lowrank_b"].contiguous()
        out[f"{module}.weight_lowrank_a"] = record["lowrank_a"].contiguous()
    return out


def lowrank(tensors: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) of a module's low-rank correction, checked against its weight shape, or None."""
    if f"{module}.weight_lowrank_b" not in tensors:
        return None
    b, a = tensors[f"{module}.weight_lowrank_b"], tensors.get(f"{module}.weight_lowrank_a")
    shape = tuple(int(x) for x in tensors[f"{module}.weight_shape"].tolist())
    if a is None or b.dim() != 2 or a.dim() != 2 or (b.shape[0], a.shape[1]) != shape or b.shape[1] != a.shape[0]:
        raise ValueError(f"low-rank factors {tuple(b.shape)} × {None if a is None else tuple(a.shape)} "
                         f"do not make a {shape} weight")
    return b, a


def _weight_scheme(weights: dict) -> WeightScheme:
    if weights.get("type") != "int":
        raise CompressorError(f"unsupported weight type {weights.get('type')!r}", "this reader handles integer weights")
    group_size = weights.get("group_size") if weights.get("strategy") == "group" else -1
    return WeightScheme(int(weights["num_bits"]), int(group_size or -1), bool(weights["symmetric"]))


def group_schemes(qconfig: dict) -> list[tuple[list[str], WeightScheme]]:
    """(targets, scheme) of every config group; one group is what compressor writes, several
    what mixed-precision tools (llm-compressor recipes with per-module schemes) write."""
    # Read without the library's models: evaluation hosts may not have compressed-tensors installed.
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != FORMAT:
        raise CompressorError(
            f"unsupported quantization format {qconfig.get('quant_method')}/{qconfig.get('format')}",
            f"this reader handles compressed-tensors {FORMAT}")
    groups = qconfig.get("config_groups") or {}
    if not groups:
        raise CompressorError("the quantization config has no config groups", "the artifact config is damaged")
    out = []
    for group in groups.values():
        if group.get("format") not in (None, FORMAT):
            raise CompressorError(f"unsupported config group format {group.get('format')!r}",
                                  f"this reader handles {FORMAT}")
        out.append((list(group.get("targets") or []), _weight_scheme(group["weights"])))
    return out


def scheme_from_config(qconfig: dict) -> WeightScheme:
    """The scheme of a one-group config (as compressor writes)."""
    schemes = group_schemes(qconfig)
    if len(schemes) != 1:
        raise CompressorError(f"expected one config group, found {len(schemes)}", "the artifact config is damaged")
    return schemes[0][1]


def _matches(module: str, target: str) -> bool:
    """compressed-tensors target matching for a quantized linear: its class name, `re:` + a
    regex matched from the start of the module name, or the module name itself."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as exc:
            raise CompressorError(f"config group target {target!r} is not a valid regex ({exc})",
                                  "the artifact config is damaged") from None
    return module == target


def scheme_for(module: str, schemes: list[tuple[list[str], WeightScheme]]) -> WeightScheme:
    for targets, scheme in schemes:
        if any(_matches(module, t) for t in targets):
            return scheme
    raise CompressorError(f"{module} has quantized weights but no config group targets it",
                          "the artifact config is damaged or was edited")


def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantize every packed module; other tensors pass through. Errors name the module."""
    schemes = group_schemes(qconfig)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    out = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[-1] in SUFFIXES}
    for m in modules:
        scheme = scheme_for(m, schemes)
        with ct_config.decoding(m):
            shape = tuple(int(x) for x in tensors[f"{m}.weight_shape"].tolist())
            scale = tensors[f"{m}.weight_scale"]
            codes = bitpack.unpack(tensors[f"{m}.weight_packed"], scheme.bits, shape)
            zero = None
            if not scheme.symmetric:
                zero = bitpack.unpack(tensors[f"{m}.weight_zero_point"], scheme.bits, scale.shape, dim=0)
            expected_groups = 1 if scheme.per_channel else shape[1] // scheme.group_size
            if scale.shape != (shape[0], expected_groups):
                raise ValueError(f"scale shape {tuple(scale.shape)} != {(shape[0], expected_groups)}")
            g_idx = tensors.get(f"{m}.weight_g_idx")
            # Our rule, not the library's `dequantize`: that one multiplies in the scale's dtype (float16),
            # ours in float32 as the pipeline's simulated model does, so reloading gives its exact weights.
            out[f"{m}.weight"] = dequantize(codes, scale, zero, g_idx, dtype)
            factors = lowrank(tensors, m)
            if factors is not None:
                out[f"{m}.weight"] = (dequantize(codes, scale, zero, g_idx, torch.float32)
                                      + factors[0].float() @ factors[1].float()).to(dtype)
    return out


class PackQuantized:
    """The registered format of integer weight-only quantization (export kind "weight-int"): one
    `scheme` for every linear, or `schemes` per module (mixed precision; None keeps a linear's
    weight in 16 bits, from a record {"weight": tensor})."""

    name = FORMAT
    kind = "weight-int"
    suffixes = SUFFIXES
    decode = staticmethod(decode)
    schemes = staticmethod(group_schemes)

    def __init__(self, export: dict):
        self.scheme, self.actorder = export.get("scheme"), export.get("actorder")
        self.per_module: dict[str, WeightScheme | None] | None = export.get("schemes")

    def quantization_config(self, ignore: list[str]) -> dict | None:
        if self.per_module is not None:
            return mixed_quantization_config(self.per_module, ignore, self.actorder)
        return quantization_config(self.scheme, ignore, self.actorder)

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scheme = self.scheme if self.per_module is None else self.per_module[module]
        if scheme is None:
            return {f"{module}.weight": record["weight"].to(KEPT_DTYPE).contiguous()}
        return encode(module, record, scheme)
