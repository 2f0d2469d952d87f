"""Activation-aware scaling before weight quantization, then RTN or GPTQ.

- `awq` (Lin et al., 2023): per group of linears sharing an input, search
  s = mean|x|^α (optionally over mean|ŵ|^(1−α)) on a grid of α, judging each candidate by the
  output error of the attention or MLP module containing the group; fold the best into the norm
  or up_proj in front. A quantizer after it rounds the weights: RTN alone, or the list
  `awq+gptq` (AWQ then GPTQ).
- `smoothquant+` (Pan et al., 2023): SmoothQuant's s = max|x|^α / max|w|^(1−α) for every
  scalable group of a decoder layer with one α per layer, searched on the block-output error,
  then group-wise weight-only quantization (RTN unless the list names another quantizer).

Groups with nothing in front to fold into (o_proj under grouped-query attention) keep s = 1.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compressor.methods.base import METHOD_LISTS, METHODS, BlockContext, Method, Replays
from compressor.methods.quant.quantizer import check_scheme, dequantize_record, quantize_weight
from compressor.methods.quant.rtn import WeightQuantConfig
from compressor.methods.quant.scale_search import (
    ScaledTrial, alpha_grid, awq_scales, fold, scalable, search, smoothquant_scales,
)
from compressor.models.adapters import Adapter, LinearGroup

class ScaleSearchConfig(WeightQuantConfig):
    """The weight format the search rounds candidates to (the quantizer after it gets the same
    settings), and the search itself."""

    grid: int = Field(20, ge=2, le=200, description="α candidates in [0, 1)")
    search_samples: int = Field(16, ge=1, description="calibration samples the search replays")


class AWQConfig(ScaleSearchConfig):
    duo_scaling: bool = Field(True, description="AWQ: divide by mean|ŵ|^(1−α) as well")


class _ScaleSearch(Method):
    """Shared shell: search per-input-channel scales on replays of the block and fold them in;
    a quantizer after it in the list (RTN unless another is named) rounds the scaled weights."""

    Config = ScaleSearchConfig
    needs_calibration = True
    default_quantizer = "rtn"
    search_needs: frozenset[str] = frozenset()

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        check_scheme(self.config.scheme(), model, adapter)

    def quantize_dequantize(self, w: torch.Tensor) -> torch.Tensor:
        return dequantize_record(quantize_weight(w, self.config.scheme()), torch.float32)

    def on_block_start(self, ctx: BlockContext) -> None:
        replays = ctx.replays(self.config.search_samples, set(self.search_needs))
        self.search_and_fold(ctx, ctx.linears(), replays)

    def search_and_fold(self, ctx: BlockContext, linears: dict[str, nn.Linear], replays: Replays) -> None:
        raise NotImplementedError

    @staticmethod
    def _members(group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
        return {n: linears[n] for n in group.linears}


@METHODS.register("awq")
class AWQ(_ScaleSearch):
    Config = AWQConfig
    search_needs = frozenset({"absmean"})

    def search_and_fold(self, ctx: BlockContext, linears: dict[str, nn.Linear], replays: Replays) -> None:
        chosen = []
        grid = alpha_grid(self.config.grid)
        for group in filter(scalable, ctx.groups):
            members = self._members(group, linears)
            weights = [l.weight.data for l in members.values()]
            act_mean = replays.stats[group.name]["absmean"]
            trial = ScaledTrial(members, self.quantize_dequantize)
            _, (s,), _ = search([(trial, lambda a: awq_scales(a, act_mean, weights, self.config.duo_scaling))],
                                replays.for_group(group), grid)
            chosen.append((group, members, s))
        # Every search ran on the unmodified block; fold once all are chosen.
        for group, members, s in chosen:
            fold(ctx.block, group, members, s, ctx.adapter.norm_weight_offset)


@METHODS.register("smoothquant+")
class SmoothQuantPlus(_ScaleSearch):
    search_needs = frozenset({"absmax"})

    def search_and_fold(self, ctx: BlockContext, linears: dict[str, nn.Linear], replays: Replays) -> None:
        trials = []
        for group in filter(scalable, ctx.groups):
            members = self._members(group, linears)
            weights = [l.weight.data for l in members.values()]
            act_max = replays.stats[group.name]["absmax"]
            trials.append((group, members, ScaledTrial(members, self.quantize_dequantize),
                           lambda a, act_max=act_max, weights=weights: smoothquant_scales(a, act_max, weights)))
        _, scales, _ = search([(t, f) for _, _, t, f in trials], replays.block, alpha_grid(self.config.grid))
        for (group, members, _, _), s in zip(trials, scales):
            fold(ctx.block, group, members, s, ctx.adapter.norm_weight_offset)


# AWQ scales, then GPTQ: a list, under the name users know.
METHOD_LISTS.register("awq+gptq")(("awq", "gptq"))
