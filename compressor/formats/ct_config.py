"""compressed-tensors `quantization_config` dicts, built with the library's own models.

QuantizationArgs, QuantizationScheme and QuantizationConfig check what we write, so a config the
library (and so transformers and vLLM) would not load is an error here, before any artifact
exists. The dict is then read off those objects under a fixed set of keys, because the
library's own dump (0.20) leaves out None-valued `actorder`/`block_structure` and empty
`observer_kwargs` and adds `global_compression_ratio`, `moe_sparsity_config` and `version`:
that would change every artifact's config.json bytes without changing what a loader reads.
"""

from __future__ import annotations

import importlib
from enum import Enum
from contextlib import contextmanager
from typing import Any, Iterator

from compressor.errors import CompressorError

ARG_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder", "observer",
            "observer_kwargs", "block_structure")
GROUP_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")


def library(module: str = "compressed_tensors.quantization"):
    """A module of compressed-tensors, which writing artifacts needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompressorError("writing compressed-tensors artifacts needs the compressed-tensors package",
                              "pip install compressed-tensors") from None


def args(**fields: Any):
    """compressed-tensors QuantizationArgs (validated by the library)."""
    return library().QuantizationArgs(**fields)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _args_dict(quant_args) -> dict | None:
    return None if quant_args is None else {k: _plain(getattr(quant_args, k)) for k in ARG_KEYS}


def quantization_config(fmt: str, weights, inputs, ignore: list[str]) -> dict:
    """One config group targeting every Linear not in `ignore`, stored compressed in format `fmt`."""
    return grouped_config(fmt, [(["Linear"], weights, inputs)], ignore)


def grouped_config(fmt: str, groups: list[tuple[list[str], Any, Any]], ignore: list[str]) -> dict:
    """Config groups `group_0`, `group_1`, … of (targets, weight args, input args), in order; a
    mixed-precision artifact has one per format, targeting its modules by name."""
    q = library()
    schemes = {f"group_{i}": q.QuantizationScheme(targets=targets, weights=weights, input_activations=inputs,
                                                   format=fmt)
               for i, (targets, weights, inputs) in enumerate(groups)}
    config = q.QuantizationConfig(config_groups=schemes, format=fmt, ignore=ignore,
                                  quantization_status="compressed")
    groups = {}
    for name, group in config.config_groups.items():
        groups[name] = {k: _plain(getattr(group, k)) for k in GROUP_KEYS}
        for key in ("weights", "input_activations", "output_activations"):
            groups[name][key] = _args_dict(getattr(group, key))
    return {
        "quant_method": config.quant_method,
        "format": config.format,
        "quantization_status": _plain(config.quantization_status),
        "config_groups": groups,
        "ignore": list(config.ignore),
        "kv_cache_scheme": _args_dict(config.kv_cache_scheme),
        # The library's ModelCompressor writes these beside the config; we store no sparsity or transforms.
        "sparsity_config": {},
        "transform_config": {},
    }


@contextmanager
def decoding(module: str) -> Iterator[None]:
    """A module whose stored tensors disagree with the artifact's config, as one line naming it."""
    try:
        yield
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CompressorError(
            f"tensors of {module} do not match the artifact's quantization config ({exc})",
            "the artifact is damaged or its config.json was edited; rebuild it") from None
