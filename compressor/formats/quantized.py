"""The registered quantized formats: each writes a method's records and reads them back.

A format is a compressed-tensors `format` name (written in config.json, which picks the reader)
with the export kind a method names for it ("weight-int", "w8a8-int", "fp8"), the artifact's
`quantization_config`, per-linear `encode` and whole-checkpoint `decode`. Writing builds the
config with compressed-tensors' own models and packs with its packing functions; reading needs
no compressed-tensors (evaluation hosts may not have it) and falls back to our tested-equal code.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from compressor.errors import CompressorError
from compressor.formats import compressed_tensors, naive_quantized
from compressor.registry import Registry


class QuantizedFormat(Protocol):
    name: ClassVar[str]  # the compressed-tensors format in config.json
    kind: ClassVar[str]  # the export kind a method names
    suffixes: ClassVar[tuple[str, ...]]  # leaf names of stored quantization parameters

    def __init__(self, export: dict): ...

    def quantization_config(self, ignore: list[str]) -> dict: ...

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    @staticmethod
    def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    @staticmethod
    def schemes(qconfig: dict) -> object:
        """The config's schemes as this reader understands them; CompressorError if it cannot."""


FORMATS: Registry[type[QuantizedFormat]] = Registry("quantized format")
for _format in (compressed_tensors.PackQuantized, naive_quantized.IntQuantized, naive_quantized.FloatQuantized):
    FORMATS.register(_format.name)(_format)


def writer_for(export: dict) -> QuantizedFormat:
    """The format a method's `export()` names, set up to write its records."""
    for _, fmt in FORMATS.items():
        if fmt.kind == export["kind"]:
            return fmt(export)
    raise CompressorError(f"unknown quantization export kind {export['kind']!r}",
                          f"choose one of: {', '.join(sorted(f.kind for _, f in FORMATS.items()))}")


# Leaf names of quantization parameters, which are not model parameters.
SUFFIXES = tuple(dict.fromkeys(s for _, fmt in FORMATS.items() for s in fmt.suffixes))


def supports(qconfig: dict) -> bool:
    """Whether `decode` reads this quantization config (config groups of schemes we read)."""
    fmt = qconfig.get("format")
    if qconfig.get("quant_method") != "compressed-tensors" or not isinstance(fmt, str) or fmt not in FORMATS:
        return False
    try:
        FORMATS.get(fmt).schemes(qconfig)
    except (CompressorError, KeyError, TypeError, ValueError):
        return False
    return True


def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The float state dict of a quantized artifact (plus static activation scales, if any)."""
    fmt = qconfig.get("format") if isinstance(qconfig, dict) else None
    if (not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors"
            or not isinstance(fmt, str) or fmt not in FORMATS):
        raise CompressorError(
            f"unsupported quantization format "
            f"{qconfig.get('quant_method') if isinstance(qconfig, dict) else type(qconfig).__name__}/{fmt}",
            f"this reader handles compressed-tensors {', '.join(FORMATS.names())}")
    try:
        return FORMATS.get(fmt).decode(tensors, qconfig, dtype)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as exc:
        # The config is untrusted input: a value of the wrong kind anywhere in it is damage, said in one line.
        raise CompressorError(f"the quantization config is damaged or unsupported ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})",
                              "rebuild the artifact, or restore its config.json") from None
