"""Inter-layer dependencies, measured on a probe set (after "Augmenting Hessians with Inter-Layer
Dependencies for Mixed-Precision Post-Training Quantization").

A layer's Hessian score ½·tr(ΔW H ΔWᵀ) is its own output error. What reaches the model's output
depends on the layers after it (which amplify or absorb the error) and on the layers around it
(whose errors add up, or cancel, with its own). Three measurements, on the probe set:

- each linear's output Fisher (fisher.py): the second-order cost at the model's output of a unit
  of its Hessian score, through every layer after it;
- the KL at the output with one block quantized alone at a reference format: its gain,
  KL / the Fisher-weighted scores of its linears, corrects what the second-order, one-layer-at-a-
  time view misses inside the block;
- the KL with two neighbouring blocks quantized together: their coupling,
  c = (KL_pair − KL_a − KL_b) / (2·√(KL_a·KL_b)), is how their errors combine (0: independent,
  1: aligned, < 0: they cancel).

The augmented prediction of an assignment is Σ_b E_b + Σ_b 2·c_b·√(E_b·E_{b+1}), with
E_b = gain_b · Σ_{l in b} fisher_l · score_l (predict.Predictor).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from compressor.mixed.fisher import output_fisher
from compressor.mixed.probes import KLProbe
from compressor.mixed.sensitivity import LinearScores
from compressor.methods.quant.candidates import parse_format

REFERENCE_BITS = 3


@dataclass
class Interactions:
    reference: dict[str, str]  # linear → the format it was probed in
    fisher: dict[str, float]  # linear → mean output Fisher (KL per unit of Hessian score)
    predicted: list[float]  # per block: Σ fisher · score of its linears at the reference
    single: list[float]  # per block: KL with that block alone at the reference
    pair: list[float]  # per neighbouring pair (b, b+1): KL with both
    probe: dict  # windows, length, tokens, seconds

    @property
    def gains(self) -> list[float]:
        return [s / h if h > 0 else 0.0 for s, h in zip(self.single, self.predicted)]

    @property
    def couplings(self) -> list[float]:
        out = []
        for b, both in enumerate(self.pair):
            a, c = self.single[b], self.single[b + 1]
            # Errors that cancel more than fully are noise of the probe: bound below by -1.
            out.append(max(-1.0, (both - a - c) / (2 * math.sqrt(a * c))) if a > 0 and c > 0 else 0.0)
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "gains": self.gains, "couplings": self.couplings}

    @classmethod
    def from_json(cls, data: dict) -> "Interactions":
        return cls(data["reference"], data["fisher"], data["predicted"], data["single"], data["pair"], data["probe"])


def reference_formats(linears: list[LinearScores], bits: int = REFERENCE_BITS) -> dict[str, str]:
    """Per linear, the candidate at `bits` (or the nearest integer width) with the largest group."""
    out = {}
    for linear in linears:
        integer = [parse_format(f) for f in linear.scores if not parse_format(f).kept]
        nearest = min({f.bits for f in integer}, key=lambda b: (abs(b - bits), b))
        out[linear.name] = max((f for f in integer if f.bits == nearest), key=lambda f: f.group_size).name
    return out


def measure(probe: KLProbe, linears: list[LinearScores], weight: Callable[[str, str], torch.Tensor],
            log: Callable[[str], None] = lambda _: None) -> Interactions:
    """Output Fisher of every linear, then single-block and neighbouring-pair probes at the
    reference formats; `weight(linear, format)` is the quantized weight the sensitivity pass found."""
    started = time.perf_counter()
    fisher = output_fisher(probe.model, probe.adapter, probe.ids, probe.batch_size)
    log(f"output Fisher of {len(fisher)} linears in {time.perf_counter() - started:.0f} s")
    reference = reference_formats(linears)
    blocks = max(l.block for l in linears) + 1
    members = [[l for l in linears if l.block == b] for b in range(blocks)]
    predicted = [sum(fisher[l.name] * l.scores[reference[l.name]] for l in m) for m in members]

    def quantized(*chosen: int) -> dict[str, torch.Tensor]:
        return {l.name: weight(l.name, reference[l.name]) for b in chosen for l in members[b]}

    single = []
    for b in range(blocks):
        single.append(probe.kl(quantized(b)))
        log(f"probe block {b}: KL {single[-1]:.4g}")
    pair = [probe.kl(quantized(b, b + 1)) for b in range(blocks - 1)]
    windows, length = probe.ids.shape
    return Interactions(reference, fisher, predicted, single, pair,
                        {"windows": int(windows), "length": int(length), "tokens": probe.tokens,
                         "seconds": time.perf_counter() - started})
