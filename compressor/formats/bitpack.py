"""Dense little-endian bit packing of signed integer codes into int32 words.

Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream, LSB first,
stored as an offset-binary unsigned value (code + 2^(bits-1)); words hold 32 stream bits.
This is the compressed-tensors pack-quantized layout for 1..8 bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_words(count: int, bits: int) -> int:
    return math.ceil(count * bits / 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] int8 signed codes → [rows, ceil(cols*bits/32)] int32."""
    rows, cols = codes.shape
    unsigned = (codes.to(torch.int16) + (1 << (bits - 1))).numpy().astype(np.uint8)
    stream = np.unpackbits(unsigned[:, :, None], axis=2, bitorder="little")[:, :, :bits]
    stream = stream.reshape(rows, cols * bits)
    words = packed_words(cols, bits)
    padded = np.zeros((rows, words * 32), dtype=np.uint8)
    padded[:, : cols * bits] = stream
    packed = np.packbits(padded, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(packed.astype(np.int32))


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_rows: [rows, words] int32 → [rows, cols] int8 signed codes."""
    rows, words = packed.shape
    if words != packed_words(cols, bits):
        raise ValueError(f"{words} packed words cannot hold {cols} codes of {bits} bits")
    raw = np.ascontiguousarray(packed.numpy().astype("<i4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : cols * bits].reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.int16)).astype(np.int16)
    values = (stream.astype(np.int16) * weights).sum(axis=2) - (1 << (bits - 1))
    return torch.from_numpy(values.astype(np.int8))


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    return pack_rows(codes, bits) if dim == 1 else pack_rows(codes.T.contiguous(), bits).T.contiguous()


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    if dim == 1:
        return unpack_rows(packed, bits, shape[1])
    return unpack_rows(packed.T.contiguous(), bits, shape[0]).T.contiguous()
