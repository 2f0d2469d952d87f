"""Dense little-endian bit packing of signed integer codes into int32 words: compressed-tensors'
pack-quantized layout for 1..8 bits, done by compressed-tensors' own `pack_to_int32` and
`unpack_from_int32`.

Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream, LSB first,
stored as an offset-binary unsigned value (code + 2^(bits-1)); words hold 32 stream bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from compressor.formats import ct_config


def packed_words(count: int, bits: int) -> int:
    return math.ceil(count * bits / 32)


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 signed codes [rows, cols] → int32 words, packed along `dim`."""
    helpers = ct_config.library("compressed_tensors.compressors.pack_quantized.helpers")
    return helpers.pack_to_int32(codes, bits, packed_dim=dim)


@functools.cache
def _library_unpack():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:
        return None
    return unpack_from_int32


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of pack: int32 words → int8 signed codes of `shape`."""
    if packed.dim() != 2 or packed.shape[dim] != packed_words(shape[dim], bits) \
            or packed.shape[1 - dim] != shape[1 - dim]:
        raise ValueError(f"packed words {tuple(packed.shape)} cannot hold {tuple(shape)} codes of {bits} bits")
    if dim == 0:  # through a transposed copy: unpack_from_int32(packed_dim=0) fails on one packed row (0.20.1)
        rows = packed.T.clone(memory_format=torch.contiguous_format)
        return unpack(rows, bits, (shape[1], shape[0])).T.contiguous()
    library = _library_unpack()
    return unpack_rows(packed, bits, shape[1]) if library is None else library(packed, bits, torch.Size(shape))


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """[rows, words] int32 → [rows, cols] int8 codes, in numpy: our reader where compressed-tensors
    is not installed (evaluation hosts may lack it); tested equal to `unpack_from_int32`."""
    rows, words = packed.shape
    if words != packed_words(cols, bits):
        raise ValueError(f"{words} packed words cannot hold {cols} codes of {bits} bits")
    raw = np.ascontiguousarray(packed.numpy().astype("<i4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : cols * bits].reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.int16)).astype(np.int16)
    values = (stream.astype(np.int16) * weights).sum(axis=2) - (1 << (bits - 1))
    return torch.from_numpy(values.astype(np.int8))
