"""The multiple-choice knapsack of a mixed-precision plan: one option per item (a format per
linear), the least total loss under a total cost (bits).

`frontier` is the exact dynamic programme over the cost axis, cut into `resolution` units (each
option's cost rounded up, so a solution never exceeds its budget; rounding leaves at most one unit
per item unused): one run gives the best loss at every budget, so a loss budget needs no second
run. `lagrangian` relaxes the budget into a price λ per bit (each item then picks its own
argmin of loss + λ·cost, λ found by bisection) and spends what is left greedily: for problems
too large for the table, and as a cross-check of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DP_CELLS = 1_000_000_000  # items × options × cost units the exact programme may touch (seconds in numpy)


@dataclass
class Item:
    costs: np.ndarray  # per option, bits
    losses: np.ndarray  # per option, predicted loss


@dataclass
class Frontier:
    """Best total loss at every budget of the discretised cost axis, and how to recover the choice."""

    items: list[Item]
    unit: float  # bits per cost unit
    base: int  # units every solution spends (each item's cheapest option)
    best: np.ndarray  # [units + 1]: least loss with at most base + index units
    choices: np.ndarray  # [items, units + 1] option of each item at each remaining budget
    costs: list[np.ndarray]  # per item, option costs in units above its cheapest

    def cheapest_bits(self) -> float:
        return float(sum(item.costs.min() for item in self.items))

    def solve(self, budget_bits: float) -> list[int] | None:
        """The best choice within `budget_bits` (None if even the cheapest options exceed it)."""
        units = math.floor(budget_bits / self.unit + 1e-9) - self.base
        if units < 0:
            return None
        return self._backtrack(min(units, self.best.shape[0] - 1))

    def cheapest_within(self, max_loss: float) -> list[int] | None:
        """The least-cost choice whose loss is at most `max_loss` (None if none is)."""
        ok = np.nonzero(self.best <= max_loss)[0]
        return self._backtrack(int(ok[0])) if ok.size else None

    def _backtrack(self, units: int) -> list[int]:
        picks = [0] * len(self.items)
        for i in range(len(self.items) - 1, -1, -1):
            k = int(self.choices[i, units])
            picks[i] = k
            units -= int(self.costs[i][k])
        return picks


def frontier(items: list[Item], max_bits: float, resolution: int = 100_000) -> Frontier:
    """The exact programme for every budget up to `max_bits`."""
    unit = max_bits / resolution
    units = [np.ceil(item.costs / unit - 1e-9).astype(np.int64) for item in items]
    base = int(sum(u.min() for u in units))
    span = max(0, min(resolution - base, int(sum(u.max() - u.min() for u in units))))
    costs = [u - u.min() for u in units]
    best = np.zeros(span + 1)
    choices = np.zeros((len(items), span + 1), dtype=np.uint8)
    for i, item in enumerate(items):
        new = np.full(span + 1, np.inf)
        pick = np.zeros(span + 1, dtype=np.uint8)
        for k, (c, loss) in enumerate(zip(costs[i], item.losses)):
            if c > span:
                continue
            candidate = np.full(span + 1, np.inf)
            candidate[c:] = best[:span + 1 - c] + loss
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = k
        best, choices[i] = new, pick
    return Frontier(items, unit, base, best, choices, costs)


def lagrangian(items: list[Item], budget_bits: float, iterations: int = 80) -> list[int] | None:
    """Per-item argmin of loss + λ·cost with the least λ that meets the budget, then greedy upgrades."""
    if sum(item.costs.min() for item in items) > budget_bits:
        return None

    def pick(lam: float) -> list[int]:
        return [int(np.argmin(item.losses + lam * item.costs)) for item in items]

    def cost(choice: list[int]) -> float:
        return float(sum(item.costs[k] for item, k in zip(items, choice)))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget_bits:
        hi *= 4
    if cost(pick(lo)) <= budget_bits:
        return pick(lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(pick(mid)) <= budget_bits else (mid, hi)
    choice = pick(hi)
    left = budget_bits - cost(choice)
    while True:  # spend what is left on the upgrade that buys the most loss per bit
        best, gain = None, 0.0
        for i, (item, k) in enumerate(zip(items, choice)):
            extra = item.costs - item.costs[k]
            saved = item.losses[k] - item.losses
            ok = (extra > 0) & (extra <= left) & (saved > 0)
            if ok.any():
                j = int(np.argmax(np.where(ok, saved / np.where(extra > 0, extra, 1), -1)))
                if saved[j] / extra[j] > gain:
                    best, gain = (i, j), saved[j] / extra[j]
        if best is None:
            return choice
        i, j = best
        left -= items[i].costs[j] - items[i].costs[choice[i]]
        choice[i] = j


def solve(items: list[Item], budget_bits: float) -> list[int] | None:
    """Exact when the table is affordable, Lagrangian otherwise."""
    if len(items) * max(len(i.costs) for i in items) * 100_000 <= DP_CELLS:
        return frontier(items, budget_bits).solve(budget_bits)
    return lagrangian(items, budget_bits)
