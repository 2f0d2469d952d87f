"""What a comparison report holds, independent of how it is rendered (Markdown, HTML).

A `Page` has `Section`s; a section compares `Row`s (one per model) on `Metric`s, one table per
metric with the delta against the section's base row, a Pareto plot of quality against size,
per-layer maps where rows carry them, and each row's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str | None = "lower"  # "lower", "higher" or None (no direction)
    digits: int = 3
    unit: str = ""
    kind: str = "quality"  # "quality" (Pareto y axis candidates), "size" (x axis), "other"


@dataclass
class Row:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, list]] = field(default_factory=dict)  # map title -> {linear: [per block]}
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    is_base: bool = False


@dataclass
class Section:
    title: str
    rows: list[Row]
    metrics: list[Metric]
    intro: list[str] = field(default_factory=list)  # Markdown paragraphs
    pareto: list[tuple[str, str]] = field(default_factory=list)  # (x metric key, y metric key)
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> Row | None:
        return next((r for r in self.rows if r.is_base), None)

    def ok_rows(self) -> list[Row]:
        return [r for r in self.rows if r.error is None]

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)

    def present(self) -> list[Metric]:
        """Metrics that at least one row has."""
        return [m for m in self.metrics if any(m.key in r.metrics for r in self.ok_rows())]


@dataclass
class Page:
    title: str
    sections: list[Section]
    intro: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item, one-line error)


def delta(row: Row, base: Row | None, key: str) -> tuple[float | None, float | None]:
    """Absolute and relative difference of a row's metric from the base's."""
    if base is None or row is base or key not in row.metrics or key not in base.metrics:
        return None, None
    d = row.metrics[key] - base.metrics[key]
    rel = d / base.metrics[key] if base.metrics[key] else None
    return d, rel


def pareto_front(points: list[tuple[float, float, str]]) -> set[str]:
    """Names of the points no other point beats on both x and y (both lower is better)."""
    front = set()
    for x, y, name in points:
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2, _ in points):
            front.add(name)
    return front


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** -digits):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"
