"""Which on-disk format stores a method's records, and which reader restores it.

A method's `export()` names a kind ("weight-int", "w8a8-int", "fp8"); the writer registered
for that kind gives the artifact's `quantization_config` and encodes each linear's record.
Readers are chosen by the compressed-tensors `format` written in config.json.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from compressor.errors import CompressorError
from compressor.formats import compressed_tensors, mixed_precision, naive_quantized
from compressor.registry import Registry


class Writer(Protocol):
    def quantization_config(self, ignore: list[str]) -> dict: ...

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


WRITERS: Registry[Callable[[dict], Writer]] = Registry("quantization export kind")


@WRITERS.register("weight-int")
class PackQuantizedWriter:
    """Integer weight-only quantization as compressed-tensors pack-quantized."""

    def __init__(self, export: dict):
        self.scheme = export["scheme"]
        self.actorder = export.get("actorder")

    def quantization_config(self, ignore: list[str]) -> dict:
        return compressed_tensors.quantization_config(self.scheme, ignore, self.actorder)

    def encode(self, module: str, record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return compressed_tensors.encode(module, record, self.scheme)


WRITERS.register("weight-int-mixed")(mixed_precision.MixedWriter)


@WRITERS.register("w8a8-int")
def _int8(export: dict) -> Writer:
    return naive_quantized.Writer(naive_quantized.W8Scheme("int", export.get("act_dynamic", True)))


@WRITERS.register("fp8")
def _fp8(export: dict) -> Writer:
    return naive_quantized.Writer(naive_quantized.W8Scheme("float", export.get("act_dynamic", True)))


def writer_for(export: dict) -> Writer:
    return WRITERS.get(export["kind"])(export)


READERS = {
    compressed_tensors.FORMAT: compressed_tensors.decode,
    naive_quantized.INT_FORMAT: naive_quantized.decode,
    naive_quantized.FLOAT_FORMAT: naive_quantized.decode,
}

# Leaf names of quantization parameters, which are not model parameters.
SUFFIXES = tuple(dict.fromkeys(compressed_tensors.SUFFIXES + naive_quantized.SUFFIXES))


def decode(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The float state dict of a quantized artifact (plus static activation scales, if any)."""
    reader = READERS.get(qconfig.get("format")) if qconfig.get("quant_method") == "compressed-tensors" else None
    if reader is None:
        raise CompressorError(
            f"unsupported quantization format {qconfig.get('quant_method')}/{qconfig.get('format')}",
            f"this reader handles compressed-tensors {', '.join(READERS)}")
    return reader(tensors, qconfig, dtype)
