"""A calibration-driven test method: RTN whose scale is shrunk by a statistic-dependent
factor, recording every statistic it receives. It exercises the whole calibration path of
the pipeline (capture, hooks, true-sequential collection, propagation, checkpoints)."""

from __future__ import annotations

from compressor.methods.base import METHODS
from compressor.methods.quant.quantizer import compute_qparams, dequantize_record, make_record
from compressor.methods.quant.rtn import RTN, WeightQuantConfig

NAME = "test-stats-rtn"


class StatsRTN(RTN):
    name = NAME
    Config = WeightQuantConfig
    needs_calibration = True
    seen: list[dict] | None = []  # None: don't record (benchmarks)

    def on_group(self, ctx, group, linears):
        stats = ctx.group_stats(group, {"hessian", "absmax", "mean"})
        if StatsRTN.seen is not None:
            StatsRTN.seen.append({"group": group.name, **{k: v.clone() for k, v in stats.items()}})
        # A deterministic use of the statistics: clip range shrinks where activations are small.
        scheme = self.config.scheme()
        records = {}
        for name, linear in linears.items():
            w = linear.weight.data
            importance = stats["hessian"].diagonal().float().sqrt()
            clip = 0.9 + 0.1 * (importance / importance.max())
            record = make_record(w, *compute_qparams(w * clip, scheme), scheme)
            linear.weight.data = dequantize_record(record, w.dtype)
            records[name] = record
        return records


def register() -> None:
    if NAME not in METHODS:
        METHODS.register(NAME)(StatsRTN)
