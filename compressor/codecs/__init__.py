"""Lossless packing: tANS entropy coding of float exponents (DFloat-style), C and torch codecs."""
