"""The sensitivity heatmap: linears (rows, in model order) by candidate formats (columns, cheapest
first), coloured by log10 of each linear's predicted loss in that format (predict.Predictor)."""

from __future__ import annotations

import io
import math

from compressor.methods.quant.candidates import parse_format
from compressor.mixed.predict import Predictor
from compressor.mixed.sensitivity import SensitivityTable


def heatmap(table: SensitivityTable, predictor: Predictor) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    formats = sorted({f for l in table.linears for f in l.scores}, key=lambda f: (parse_format(f).bits, -parse_format(f).group_size))
    grid = np.full((len(table.linears), len(formats)), np.nan)
    for i, l in enumerate(table.linears):
        for j, f in enumerate(formats):
            value = predictor.linear_loss(l, f) if f in l.scores else 0.0
            if value > 0:
                grid[i, j] = math.log10(value)
    fig = plt.figure(figsize=(2.5 + 0.55 * len(formats), 2 + 0.09 * len(table.linears)), dpi=100)
    ax = fig.add_subplot(111)
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    step = max(1, len(table.linears) // 60)
    labels = [f"{l.block}.{l.module.rsplit('.', 1)[-1]}" for l in table.linears]
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
    ax.set_xticks(range(len(formats)), formats, rotation=60, fontsize=7)
    fig.colorbar(image, ax=ax, label="log10 predicted loss", fraction=0.05, pad=0.02)
    ax.set_title("sensitivity: linear x format", fontsize=9)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
