"""The compressed-tensors pack-quantized bit stream, in torch, on any device.

Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's stream, LSB first, as the
offset-binary value code + 2^(bits-1); int32 words hold 32 stream bits. This is the layout of
formats/bitpack.py (numpy, on the CPU); doing it in torch lets a loader unpack an 8B model's
weights on the GPU in seconds instead of minutes.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 4096  # bounds the int64 temporaries to a few hundred MB on the widest layers


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def _positions(cols: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(cols, device=device, dtype=torch.int64) * bits
    return start >> 5, start & 31


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """[rows, words] int32 → [rows, cols] int8 signed codes."""
    rows, words = packed.shape
    if words != packed_words(cols, bits):
        raise ValueError(f"{words} packed words cannot hold {cols} codes of {bits} bits")
    word, shift = _positions(cols, bits, packed.device)
    out = torch.empty(rows, cols, dtype=torch.int8, device=packed.device)
    for r in range(0, rows, ROWS_PER_CHUNK):
        w = packed[r:r + ROWS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # a code may straddle into the next word
        value = ((w[:, word] >> shift) | (w[:, word + 1] << (32 - shift))) & ((1 << bits) - 1)
        out[r:r + ROWS_PER_CHUNK] = (value - (1 << (bits - 1))).to(torch.int8)
    return out


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_rows: [rows, cols] signed codes → [rows, ceil(cols*bits/32)] int32."""
    rows, cols = codes.shape
    words = packed_words(cols, bits)
    word, shift = _positions(cols, bits, codes.device)
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    for r in range(0, rows, ROWS_PER_CHUNK):
        u = (codes[r:r + ROWS_PER_CHUNK].to(torch.int64) + (1 << (bits - 1))) << shift
        acc = torch.zeros(u.shape[0], words + 1, dtype=torch.int64, device=codes.device)
        # Codes of one word occupy disjoint bits, so adding their parts is OR-ing them.
        acc.index_add_(1, word, u & 0xFFFFFFFF)
        acc.index_add_(1, word + 1, u >> 32)
        acc = acc[:, :words]
        out[r:r + ROWS_PER_CHUNK] = torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)
    return out
