"""compressed-tensors export and import of integer weight-only quantization.

Writes the pack-quantized layout (int32 `weight_packed`, `weight_scale`, packed
`weight_zero_point` for asymmetric schemes, `weight_shape`, optional `weight_g_idx`) with a
matching `quantization_config`, so transformers (with the compressed-tensors package) and
vLLM load the artifact. Reading dequantizes back to float weights for our own evaluation.
"""

from __future__ import annotations

import re

import torch

from compressor.errors import CompressorError
from compressor.formats import bitpack
from compressor.schemes import WeightScheme, dequantize

FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def quantization_config(scheme: WeightScheme, ignore: list[str], actorder: str | None = None) -> dict:
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.per_channel else "group",
        "group_size": None if scheme.per_channel else scheme.group_size,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None, "format": FORMAT}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
    }


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
    return out


def _check_format(qconfig: dict) -> None:
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != FORMAT:
        raise CompressorError(
            f"unsupported quantization format {qconfig.get('quant_method')}/{qconfig.get('format')}",
            f"this reader handles compressed-tensors {FORMAT}")


def _weights_scheme(w: dict) -> WeightScheme:
    if w.get("type") != "int":
        raise CompressorError(f"unsupported weight type {w.get('type')!r}", "this reader handles integer weights")
    group_size = w.get("group_size") if w.get("strategy") == "group" else -1
    return WeightScheme(int(w["num_bits"]), int(group_size or -1), bool(w["symmetric"]))


def scheme_from_config(qconfig: dict) -> WeightScheme:
    _check_format(qconfig)
    groups = qconfig.get("config_groups") or {}
    if len(groups) != 1:
        raise CompressorError(f"expected one config group, found {len(groups)}", "the artifact config is damaged")
    return _weights_scheme(next(iter(groups.values()))["weights"])


def _targets(target: str, module: str) -> bool:
    """compressed-tensors' matching for our quantized modules, which are all Linear."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in (module, "Linear")


def schemes_by_module(qconfig: dict, modules: list[str]) -> dict[str, WeightScheme]:
    """Each quantized module's scheme, from the config group that targets it: one group for
    every Linear, or one group per format naming its modules (a mixed-precision artifact).
    A module named by more than one group, or by none, is an error."""
    _check_format(qconfig)
    groups = qconfig.get("config_groups") or {}
    if len(groups) == 1:
        scheme = scheme_from_config(qconfig)
        return {m: scheme for m in modules}
    schemes = {name: _weights_scheme(group["weights"]) for name, group in groups.items()}
    out = {}
    for m in modules:
        # Exact names win over patterns and class names, as in compressed-tensors.
        named = [g for g, group in groups.items() if m in group.get("targets", ())]
        matched = named or [g for g, group in groups.items() if any(_targets(t, m) for t in group.get("targets", ()))]
        if len(matched) != 1:
            raise CompressorError(f"{m} is targeted by {len(matched)} config groups ({', '.join(matched) or 'none'})",
                                  "the artifact config is damaged")
        out[m] = schemes[matched[0]]
    return out


def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantize every packed module; other tensors pass through. Errors name the module."""
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    schemes = schemes_by_module(qconfig, modules)
    out = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[-1] in SUFFIXES}
    for m in modules:
        scheme = schemes[m]
        try:
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
            out[f"{m}.weight"] = dequantize(codes, scale, zero, g_idx, dtype)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CompressorError(
                f"tensors of {m} do not match the artifact's quantization config ({exc})",
                "the artifact is damaged or its config.json was edited; rebuild it") from None
    return out
