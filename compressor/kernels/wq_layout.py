"""Integer weight-only layers repacked once, at load time, into the weight-only kernel's layout.

The on-disk pack-quantized stream (codes LSB-first along a row) makes a kernel shift and mask
per code at a different offset. Here each code's unsigned value u = code + 2^(bits-1) is split
into bit planes of 1, 2 or 4 bits (2 = [2], 3 = [2, 1], 4 = [4], 5 = [4, 1], 6 = [4, 2],
8 = [4, 4]) and each plane is stored so that one shift and one mask of an int32 word yield two
values at once, one in each 16-bit half:

    K is cut into tiles of `block_k` columns (one quantization group per tile). In a tile, a plane
    of width w has S = 16 / w slots and W = block_k * w / 32 words per row; column
    2*W*s + 2*j + h of the tile sits in word j, bits [16*h + s*w, 16*h + (s+1)*w).

OR-ing 0x4300 into each half then gives the bf16 number 128 + u_plane exactly (0x6400 and 1024
for fp16), which the kernel feeds to the tensor cores. Scales (and integer zero points) are
stored one row per tile, [tiles, n_pad]; per-channel and groups larger than a tile repeat their
row. Act-order weights are permuted so that groups are contiguous; the kernel then reads the
activations through `perm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLANES = {2: ((0, 2),), 3: ((0, 2), (2, 1)), 4: ((0, 4),), 5: ((0, 4), (4, 1)), 6: ((0, 4), (4, 2)),
          8: ((0, 4), (4, 4))}  # (lowest bit, width) of each plane
MAX_TILE = 128
ROW_ALIGN = 128  # rows are padded to the largest output tile


class Unsupported(ValueError):
    """The layer's format has no kernel layout; it runs on the reference path instead."""


@dataclass
class WqWeights:
    bits: int
    in_features: int
    out_features: int
    block_k: int
    planes: list[torch.Tensor]        # int32 [n_pad, k_pad * width / 32], one per PLANES[bits] entry
    scales: torch.Tensor              # [k_pad / block_k, n_pad], the stored scale dtype
    zeros: torch.Tensor | None        # int8 [k_pad / block_k, n_pad] (asymmetric schemes)
    perm: torch.Tensor | None         # int32 [in_features]: kernel column c reads activation perm[c]

    @property
    def n_pad(self) -> int:
        return self.scales.shape[1]

    @property
    def k_pad(self) -> int:
        return self.scales.shape[0] * self.block_k

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def nbytes(self) -> int:
        tensors = [*self.planes, self.scales, self.zeros, self.perm]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def block_k_for(group_size: int, in_features: int) -> int:
    """Tile width: one group per tile for groups up to 128, 128 columns for larger groups and
    per-channel scales (whose rows the layout repeats)."""
    if group_size <= 0 or group_size >= in_features:
        return MAX_TILE
    if group_size in (32, 64, 128) or group_size % MAX_TILE == 0:
        return min(group_size, MAX_TILE)
    raise Unsupported(f"group size {group_size} (kernels take 32, 64, 128 or multiples of 128)")


def act_order_permutation(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Columns sorted by group, or None when g_idx is the plain consecutive map. Raises
    Unsupported when groups are not exactly `group_size` columns each."""
    in_features = g_idx.numel()
    plain = torch.arange(in_features, device=g_idx.device) // group_size
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise Unsupported("act-order groups of unequal size")
    return perm.to(torch.int32)


def _plane_words(u: torch.Tensor, low: int, width: int, block_k: int) -> torch.Tensor:
    """One plane of unsigned values u [n, k_pad] in the tile layout described above."""
    n, k = u.shape
    slots, words = 16 // width, block_k * width // 32
    field = ((u >> low) & ((1 << width) - 1)).to(torch.int64)
    field = field.reshape(n, k // block_k, slots, words, 2).permute(0, 1, 3, 2, 4)
    shift = (torch.arange(slots, device=u.device)[:, None] * width
             + torch.tensor([0, 16], device=u.device)[None, :])
    word = (field << shift).sum(dim=(3, 4))  # disjoint bits: the sum is the OR
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)
    return word.reshape(n, -1).to(torch.int32).contiguous()


def _rows_per_tile(values: torch.Tensor, in_features: int, group_size: int, block_k: int,
                   k_pad: int, n_pad: int) -> torch.Tensor:
    """[out, groups] per-group values → [k_pad / block_k, n_pad], one row per tile."""
    out_features = values.shape[0]
    tiles = k_pad // block_k
    if group_size <= 0 or group_size >= in_features:
        per_tile = values[:, :1].expand(out_features, tiles)
    else:
        per_tile = values.repeat_interleave(group_size // block_k, dim=1)
    padded = torch.zeros(n_pad, tiles, dtype=values.dtype, device=values.device)
    padded[:out_features] = per_tile
    return padded.T.contiguous()


def repack(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
           group_size: int, g_idx: torch.Tensor | None = None) -> WqWeights:
    """Kernel layout of one linear's signed codes [out, in], per-group scale [out, groups] and
    optional signed zero points [out, groups] and act-order g_idx [in]."""
    if bits not in PLANES:
        raise Unsupported(f"{bits}-bit weights (kernels take {', '.join(map(str, PLANES))})")
    out_features, in_features = codes.shape
    block_k = block_k_for(group_size, in_features)
    perm = None
    if g_idx is not None and 0 < group_size < in_features:
        perm = act_order_permutation(g_idx.to(codes.device), group_size)
    if perm is not None:
        codes = codes[:, perm.long()]
    k_pad = -(-in_features // block_k) * block_k
    n_pad = -(-out_features // ROW_ALIGN) * ROW_ALIGN
    u = torch.zeros(n_pad, k_pad, dtype=torch.int32, device=codes.device)
    u[:out_features, :in_features] = codes.to(torch.int32) + (1 << (bits - 1))
    planes = [_plane_words(u, low, width, block_k) for low, width in PLANES[bits]]
    scales = _rows_per_tile(scale, in_features, group_size, block_k, k_pad, n_pad)
    zeros = None
    if zero_point is not None:
        zeros = _rows_per_tile(zero_point.to(torch.int8), in_features, group_size, block_k, k_pad, n_pad)
    return WqWeights(bits, in_features, out_features, block_k, planes, scales, zeros, perm)


def unpack_values(w: WqWeights) -> torch.Tensor:
    """The unsigned values [n_pad, k_pad] a layout stores (inverse of the plane packing; for tests)."""
    u = torch.zeros(w.n_pad, w.k_pad, dtype=torch.int32, device=w.scales.device)
    for words, (low, width) in zip(w.planes, PLANES[w.bits]):
        slots, per_row = 16 // width, w.block_k * width // 32
        word = words.to(torch.int64).reshape(w.n_pad, -1, per_row, 1, 1) & 0xFFFFFFFF
        shift = (torch.arange(slots, device=u.device)[:, None] * width
                 + torch.tensor([0, 16], device=u.device)[None, :])
        field = (word >> shift) & ((1 << width) - 1)  # [n, tiles, words, slots, 2]
        field = field.permute(0, 1, 3, 2, 4).reshape(w.n_pad, w.k_pad)
        u |= (field << low).to(torch.int32)
    return u
