"""Report figures as PNG bytes (matplotlib, no display): quality-vs-size Pareto plots and
per-layer heatmaps."""

from __future__ import annotations

import io
import math

from compressor.reporting.document import Metric, Section, pareto_front


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=110)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamps: the same data, the same bytes
    plt.close(fig)
    return buf.getvalue()


def pareto(section: Section, x: Metric, y: Metric) -> bytes | None:
    """Each row as a point (x: size, y: quality, lower is better on both); the Pareto front joined."""
    points = [(r.metrics[x.key], r.metrics[y.key], r.name) for r in section.ok_rows()
              if x.key in r.metrics and y.key in r.metrics and all(map(math.isfinite, (r.metrics[x.key], r.metrics[y.key])))]
    if len(points) < 2:
        return None
    if y.better == "higher":  # the front of (x, -y)
        front = pareto_front([(px, -py, n) for px, py, n in points])
    else:
        front = pareto_front(points)
    plt, fig = _figure(7.5, 4.6)
    ax = fig.add_subplot(111)
    base = section.base
    for px, py, name in points:
        on = name in front
        is_base = base is not None and name == base.name
        ax.scatter([px], [py], s=46 if on else 30, marker="*" if is_base else "o",
                   color="#d62728" if is_base else ("#1f77b4" if on else "#9aa5b1"), zorder=3)
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=7.5,
                    color="#222" if on else "#666")
    line = sorted((px, py) for px, py, n in points if n in front)
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], color="#1f77b4", linewidth=1, zorder=2)
    ys = [p[1] for p in points]
    if y.better == "lower" and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(x.label + (f" ({x.unit})" if x.unit else ""))
    ax.set_ylabel(y.label + (" — lower is better" if y.better == "lower" else " — higher is better"))
    ax.set_title(f"{section.title}: {y.label} vs {x.label} (Pareto front in blue)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _png(plt, fig)


def heatmap(title: str, values: dict[str, list], label: str) -> bytes | None:
    """Linears (rows) by decoder block (columns)."""
    if not values:
        return None
    import numpy as np

    names = list(values)
    blocks = max(len(v) for v in values.values())
    grid = np.full((len(names), blocks), np.nan)
    for i, name in enumerate(names):
        for j, v in enumerate(values[name]):
            if v is not None:
                grid[i, j] = v
    plt, fig = _figure(min(2.5 + 0.28 * blocks, 12), 1.2 + 0.32 * len(names))
    ax = fig.add_subplot(111)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    step = max(1, blocks // 15)
    ax.set_xticks(range(0, blocks, step), [str(i) for i in range(0, blocks, step)], fontsize=8)
    ax.set_xlabel("decoder block")
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.02)
    ax.set_title(title, fontsize=10)
    return _png(plt, fig)
