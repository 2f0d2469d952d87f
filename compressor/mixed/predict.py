"""Predicted loss of an assignment (a format per linear) from the sensitivity table: the plain
Hessian prediction Σ ½·tr(ΔW H ΔWᵀ), and the prediction augmented with the measured inter-layer
dependencies (interactions.Interactions): each score weighted by its linear's output Fisher,
corrected per block by the probed gain, and neighbouring blocks coupled."""

from __future__ import annotations

import math

from compressor.methods.quant.candidates import parse_format
from compressor.mixed.interactions import Interactions
from compressor.mixed.sensitivity import LinearScores, SensitivityTable

Plan = dict[str, str]  # linear → format name


class Predictor:
    def __init__(self, table: SensitivityTable, interactions: Interactions | None = None):
        self.table = table
        self.interactions = interactions
        self.blocks = table.blocks
        # What a unit of each linear's Hessian score costs in KL (1 without measurements).
        self.weights = {l.name: interactions.fisher[l.name] if interactions else 1.0 for l in table.linears}

    def linear_loss(self, linear: LinearScores, fmt: str) -> float:
        """One linear's predicted KL in a format, alone (its gain-corrected, Fisher-weighted score)."""
        return self.gains()[linear.block] * self.weights[linear.name] * linear.scores[fmt]

    def plain(self, plan: Plan) -> float:
        return sum(l.scores[plan[l.name]] for l in self.table.linears)

    def block_scores(self, plan: Plan) -> list[float]:
        """Per block: Σ of its linears' scores, each weighted by its output Fisher."""
        per_block = [0.0] * self.blocks
        for l in self.table.linears:
            per_block[l.block] += self.weights[l.name] * l.scores[plan[l.name]]
        return per_block

    def family_losses(self, plan: Plan) -> dict[int, float]:
        """Σ of gain-corrected, Fisher-weighted scores per bit width (16: kept) in the plan."""
        gains, out = self.gains(), {}
        for l in self.table.linears:
            bits = parse_format(plan[l.name]).bits
            out[bits] = out.get(bits, 0.0) + gains[l.block] * self.weights[l.name] * l.scores[plan[l.name]]
        return out

    def block_errors(self, plan: Plan) -> list[float]:
        """E_b = gain_b · Σ of block b's weighted scores: its predicted share of the output KL, alone."""
        return [g * s for g, s in zip(self.gains(), self.block_scores(plan))]

    def augmented(self, plan: Plan) -> float:
        """Σ_b E_b + Σ_b 2·c_b·√(E_b·E_{b+1}) (the plain prediction when nothing was probed)."""
        errors = self.block_errors(plan)
        if self.interactions is None:
            return sum(errors)
        pairs = sum(2 * c * math.sqrt(a * b) for c, a, b in zip(self.interactions.couplings, errors, errors[1:]))
        return sum(errors) + pairs

    def multipliers(self, plan: Plan) -> list[float]:
        """∂(augmented)/∂E_b at this plan: how much a unit of block b's own error costs once its
        couplings with the neighbours are counted (1 without interactions)."""
        if self.interactions is None:
            return [1.0] * self.blocks
        errors = self.block_errors(plan)
        couplings = self.interactions.couplings
        out = []
        for b, e in enumerate(errors):
            m = 1.0
            for n, c in ((b - 1, couplings[b - 1] if b > 0 else 0.0), (b + 1, couplings[b] if b < len(couplings) else 0.0)):
                if 0 <= n < self.blocks and e > 0:
                    m += c * math.sqrt(errors[n] / e)
            out.append(max(m, 0.0))
        return out

    def gains(self) -> list[float]:
        return self.interactions.gains if self.interactions is not None else [1.0] * self.blocks
