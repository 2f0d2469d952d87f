"""Activation-aware scaling before weight quantization, then RTN or GPTQ.

- `awq` / `awq+gptq` (Lin et al., 2023): per group of linears sharing an input, search
  s = mean|x|^α (optionally over mean|ŵ|^(1−α)) on a grid of α, judging each candidate by the
  output error of the attention or MLP module containing the group; fold the best into the norm
  or up_proj in front. Then quantize with RTN (`awq`) or GPTQ (`awq+gptq`).
- `smoothquant+` (Pan et al., 2023): SmoothQuant's s = max|x|^α / max|w|^(1−α) for every
  scalable group of a decoder layer with one α per layer, searched on the block-output error,
  then group-wise weight-only quantization.

Groups with nothing in front to fold into (o_proj under grouped-query attention) keep s = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHODS, Method, Record, Replays
from compressor.methods.quant.gptq import GPTQ, GPTQConfig
from compressor.methods.quant.quantizer import check_scheme, dequantize_record, quantize_weight
from compressor.methods.quant.rtn import RTN, WeightQuantConfig
from compressor.methods.quant.scale_search import (
    ScaledTrial, alpha_grid, awq_scales, fold, scalable, search, smoothquant_scales,
)
from compressor.models.adapters import Adapter, LinearGroup

_SEARCH_FIELDS = {"quantizer", "grid", "search_samples", "duo_scaling"}


class ScaleSearchConfig(GPTQConfig):
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="what quantizes the scaled weights")
    grid: int = Field(20, ge=2, le=200, description="α candidates in [0, 1)")
    search_samples: int = Field(16, ge=1, description="calibration samples the search replays")
    duo_scaling: bool = Field(True, description="AWQ: divide by mean|ŵ|^(1−α) as well")


class _ScaledQuantization(Method):
    """Shared shell: search and fold scales per block, then hand the groups to RTN or GPTQ."""

    Config = ScaleSearchConfig
    transforms_block = True

    def __init__(self, config: ScaleSearchConfig):
        super().__init__(config)
        inner = config.model_dump(exclude=_SEARCH_FIELDS)
        if config.quantizer == "gptq":
            self.inner: Method = GPTQ(GPTQConfig(**inner))
        else:
            self.inner = RTN(WeightQuantConfig(**{k: inner[k] for k in WeightQuantConfig.model_fields}))
        self.needs = self.inner.needs
        self.true_sequential = self.inner.true_sequential
        self.needs_fp_inputs = self.inner.needs_fp_inputs
        self.search_samples = config.search_samples

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def quantize_dequantize(self, w: torch.Tensor) -> torch.Tensor:
        return dequantize_record(quantize_weight(w, self.config.scheme()), torch.float32)

    def apply_group(self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear],
                    stats: dict[str, torch.Tensor]) -> dict[str, Record]:
        return self.inner.apply_group(block, group, linears, stats)

    def export(self) -> dict:
        return self.inner.export()

    @staticmethod
    def _members(group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
        return {n: linears[n] for n in group.linears}


@METHODS.register("awq")
class AWQ(_ScaledQuantization):
    name = "awq"
    search_needs = frozenset({"absmean"})

    def transform_block(self, block: nn.Module, adapter: Adapter, linears: dict[str, nn.Linear],
                        replays: Replays) -> None:
        chosen = []
        grid = alpha_grid(self.config.grid)
        for group in filter(scalable, adapter.groups):
            members = self._members(group, linears)
            weights = [l.weight.data for l in members.values()]
            act_mean = replays.stats[group.name]["absmean"]
            trial = ScaledTrial(members, self.quantize_dequantize)
            _, (s,), _ = search([(trial, lambda a: awq_scales(a, act_mean, weights, self.config.duo_scaling))],
                                replays.for_group(group), grid)
            chosen.append((group, members, s))
        # Every search ran on the unmodified block; fold once all are chosen.
        for group, members, s in chosen:
            fold(block, group, members, s, adapter.norm_weight_offset)


@METHODS.register("awq+gptq")
class AWQGPTQ(AWQ):
    name = "awq+gptq"

    class Config(ScaleSearchConfig):
        quantizer: Literal["rtn", "gptq"] = "gptq"


@METHODS.register("smoothquant+")
class SmoothQuantPlus(_ScaledQuantization):
    name = "smoothquant+"
    search_needs = frozenset({"absmax"})

    def transform_block(self, block: nn.Module, adapter: Adapter, linears: dict[str, nn.Linear],
                        replays: Replays) -> None:
        trials = []
        for group in filter(scalable, adapter.groups):
            members = self._members(group, linears)
            weights = [l.weight.data for l in members.values()]
            act_max = replays.stats[group.name]["absmax"]
            trials.append((group, members, ScaledTrial(members, self.quantize_dequantize),
                           lambda a, act_max=act_max, weights=weights: smoothquant_scales(a, act_max, weights)))
        _, scales, _ = search([(t, f) for _, _, t, f in trials], replays.block, alpha_grid(self.config.grid))
        for (group, members, _, _), s in zip(trials, scales):
            fold(block, group, members, s, adapter.norm_weight_offset)
