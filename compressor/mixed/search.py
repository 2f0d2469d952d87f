"""A plan (a format per linear) for a budget: the multiple-choice knapsack (knapsack.py) on the
predicted losses (predict.py), with the inter-block couplings linearised around the current plan
and re-solved until the plan stops improving (a few rounds, deterministic)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from compressor.errors import CompressorError
from compressor.methods.quant.candidates import parse_format
from compressor.mixed import knapsack
from compressor.mixed.predict import Plan, Predictor
from compressor.mixed.sensitivity import SensitivityTable

LINEARISATION_ROUNDS = 6


@dataclass
class Choice:
    plan: Plan
    bits_per_weight: float
    predicted_kl: float  # augmented (plain when nothing was probed)
    predicted_plain: float  # Σ of Hessian scores

    @property
    def uniform(self) -> str | None:
        formats = set(self.plan.values())
        return next(iter(formats)) if len(formats) == 1 else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.plan.values():
            out[f] = out.get(f, 0) + 1
        return dict(sorted(out.items()))


def average_bits(table: SensitivityTable, plan: Plan) -> float:
    total = sum(l.bits[plan[l.name]] * l.params for l in table.linears)
    return total / sum(l.params for l in table.linears)


def bits_range(table: SensitivityTable) -> tuple[float, float]:
    params = sum(l.params for l in table.linears)
    low = sum(min(l.bits.values()) * l.params for l in table.linears) / params
    high = sum(max(l.bits.values()) * l.params for l in table.linears) / params
    return low, high


def scaled(table: SensitivityTable, factors: dict[int, float]) -> SensitivityTable:
    """The table with each format's scores multiplied by its bit width's factor (1 when absent)."""
    linears = [replace(l, scores={f: s * factors.get(parse_format(f).bits, 1.0) for f, s in l.scores.items()})
               for l in table.linears]
    return replace(table, linears=linears)


def describe(table: SensitivityTable, predictor: Predictor, plan: Plan) -> Choice:
    return Choice(plan, average_bits(table, plan), predictor.augmented(plan), predictor.plain(plan))


def _items(table: SensitivityTable, predictor: Predictor, weights: list[float]) -> list[knapsack.Item]:
    return [knapsack.Item(np.array([l.bits[f] * l.params for f in l.scores]),
                          np.array([weights[l.block] * predictor.weights[l.name] * s for s in l.scores.values()]))
            for l in table.linears]


def _plan(table: SensitivityTable, picks: list[int]) -> Plan:
    return {l.name: list(l.scores)[k] for l, k in zip(table.linears, picks)}


def _iterate(table: SensitivityTable, predictor: Predictor, solve, rank) -> Choice:
    """Solve with each block's losses weighted by its gain and coupling multiplier at the last
    plan; the best plan by `rank` (smaller is better) of those seen."""
    gains = predictor.gains()
    weights = gains
    best: Choice | None = None
    seen: set[tuple] = set()
    for _ in range(LINEARISATION_ROUNDS):
        picks = solve(_items(table, predictor, weights))
        choice = describe(table, predictor, _plan(table, picks))
        if best is None or rank(choice) < rank(best):
            best = choice
        key = tuple(picks)
        if key in seen:
            break
        seen.add(key)
        weights = [g * m for g, m in zip(gains, predictor.multipliers(choice.plan))]
    return best


def check_target(target_bits: float, low: float) -> None:
    if target_bits < low - 1e-9:
        raise CompressorError(
            f"--target-bits {target_bits:g} is below the smallest achievable {low:.4f} bits per weight "
            "(every linear in its cheapest candidate, scales and zero points included)",
            f"raise --target-bits to at least {low:.4f}, or add cheaper candidates (larger --candidate-group-sizes)")


def for_bits(table: SensitivityTable, predictor: Predictor, target_bits: float) -> Choice:
    """The plan of least predicted loss whose average bits per weight is at most `target_bits`."""
    low, high = bits_range(table)
    check_target(target_bits, low)
    if target_bits >= high:  # room for every linear's most accurate candidate: nothing to choose
        return describe(table, predictor, {l.name: min(l.scores, key=l.scores.get) for l in table.linears})
    budget = target_bits * sum(l.params for l in table.linears)
    return _iterate(table, predictor, lambda items: knapsack.solve(items, budget), lambda c: c.predicted_kl)


def uniform_within(table: SensitivityTable, predictor: Predictor, target_bits: float) -> Choice | None:
    """The uniform plan (every linear in one format) that spends the most bits within the budget
    (not the least predicted loss: the prediction is what this plan is there to check)."""
    shared = set.intersection(*(set(l.scores) for l in table.linears))
    plans = [describe(table, predictor, {l.name: f for l in table.linears}) for f in sorted(shared)]
    return max((c for c in plans if c.bits_per_weight <= target_bits + 1e-9),
               key=lambda c: (c.bits_per_weight, -c.predicted_kl), default=None)


def for_loss(table: SensitivityTable, predictor: Predictor, max_kl: float) -> Choice:
    """The plan of fewest bits whose predicted KL is at most `max_kl`."""
    params = sum(l.params for l in table.linears)
    _, high = bits_range(table)

    def cheapest(items):
        frontier = knapsack.frontier(items, high * params)
        picks = frontier.cheapest_within(max_kl)
        return picks if picks is not None else frontier.solve(high * params)

    choice = _iterate(table, predictor, cheapest,
                      lambda c: (c.predicted_kl > max_kl, c.bits_per_weight if c.predicted_kl <= max_kl else c.predicted_kl))
    if choice.predicted_kl > max_kl:
        best = describe(table, predictor, {l.name: min(l.scores, key=l.scores.get) for l in table.linears})
        if best.predicted_kl > max_kl:
            raise CompressorError(
                f"a KL of {max_kl:g} is below what any plan reaches (predicted {best.predicted_kl:.4g} with every "
                "linear in its most accurate candidate)", "raise the budget")
    return choice
