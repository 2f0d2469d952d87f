"""Table-based asymmetric numeral systems (tANS) tables for a byte alphabet.

A tensor's symbol histogram is normalised to counts summing to L = 2**table_log; the counts
alone (512 bytes) are stored, and encoder and decoder tables are rebuilt from them the same
way on every machine. Decoding one symbol is one table lookup plus reading `nbits` bits:

    entry = table[state]; value = entry & 0xFFFF; nbits = (entry >> 16) & 15
    state = (entry >> 20) + next_bits(nbits)

which is as cheap as a length-limited Huffman lookup but codes within a few thousandths of a
bit of the histogram's entropy (Huffman loses up to several hundredths on exponent
distributions).
"""

from __future__ import annotations

import numpy as np

ALPHABET = 256


def normalize(counts: np.ndarray, table_log: int) -> np.ndarray:
    """Integer counts summing to 2**table_log, every present symbol at least 1, chosen
    greedily to minimise the coded size sum(c * -log2(n / L))."""
    counts = np.asarray(counts, dtype=np.float64)
    size = 1 << table_log
    present = counts > 0
    if present.sum() > size:
        raise ValueError("more distinct symbols than table entries")
    total = counts.sum()
    norm = np.where(present, np.maximum(1, np.floor(counts * size / total)), 0).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        while norm.sum() < size:  # give a slot where it saves the most bits
            gain = np.where(present, counts * np.log2((norm + 1) / np.maximum(norm, 1)), -1.0)
            norm[int(np.argmax(gain))] += 1
        while norm.sum() > size:  # take a slot where it costs the least
            loss = np.where(norm > 1, counts * np.log2(norm / np.maximum(norm - 1, 1)), np.inf)
            norm[int(np.argmin(loss))] -= 1
    return norm


def spread(norm: np.ndarray, table_log: int) -> np.ndarray:
    """Symbol of each table slot: symbols scattered over the table with a fixed odd step."""
    size = 1 << table_log
    step = (size >> 1) + (size >> 3) + 3
    order = np.repeat(np.arange(ALPHABET, dtype=np.int64), norm)
    positions = (np.arange(size, dtype=np.int64) * step) % size
    table = np.empty(size, dtype=np.int64)
    table[positions] = order
    return table


def decode_table(norm: np.ndarray, table_log: int, values: np.ndarray | None = None) -> np.ndarray:
    """uint32 entries, indexed by state in [0, L): values[symbol] (16 bits) | nbits << 16 |
    next-state base << 20. `values` maps symbols to output bit patterns (identity by default)."""
    size = 1 << table_log
    sym = spread(norm, table_log)
    order = np.argsort(sym, kind="stable")
    rank = np.empty(size, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(norm)[:-1]])
    rank[order] = np.arange(size) - starts[sym[order]]
    x = norm[sym] + rank  # in [n_s, 2 n_s)
    nbits = table_log - (np.floor(np.log2(x))).astype(np.int64)
    base = (x << nbits) - size
    if values is None:
        values = np.arange(ALPHABET)
    value = np.asarray(values, dtype=np.int64)[sym] & 0xFFFF
    return (value | (nbits << 16) | (base << 20)).astype(np.uint32)


def encode_tables(norm: np.ndarray, table_log: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, first, shift): slots[first[s] + j] is the table index of symbol s's j-th slot;
    shift[s] = table_log - floor(log2 n_s) (0 for absent symbols)."""
    sym = spread(norm, table_log)
    slots = np.argsort(sym, kind="stable").astype(np.int64)
    first = np.concatenate([[0], np.cumsum(norm)[:-1]]).astype(np.int64)
    shift = np.where(norm > 0, table_log - np.floor(np.log2(np.maximum(norm, 1))).astype(np.int64), 0)
    return slots, first, shift
