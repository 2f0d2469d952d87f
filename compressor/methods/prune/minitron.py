"""Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): rank MLP neurons, attention heads, embedding channels and whole layers by
activation-based importance on a small calibration set (minitron_importance), prune the model to
a target architecture in one shot, and leave the recovery to distillation (`compress distill`).

The target is an explicit shape (--hidden, --ffn, --heads, --kv-heads, --layers; unset ones keep
the original) or a parameter budget (--target-params 100M) reached along --axis:
- depth: the most layers that fit; the dropped ones are those whose removal costs least
  (--depth-metric: calibration perplexity without the layer, or 1 - cos(input, output));
- width: hidden size and MLP width (heads keep their count unless pinned); several shapes that
  fit are built and the one with the lowest calibration loss wins (a zero-shot stand-in for the
  paper's lightweight search);
- both: depth takes --depth-share of the layers depth alone would drop, width the rest.
Heads go by whole GQA groups first, then equally within the kept groups, so the result is an
ordinary config of the same family (transformers loads it without compressor).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, BlockContext, MethodConfig, ModelContext
from compressor.methods.prune.minitron_importance import (Importance, LanguageModelHead,
                                                          calibration_loss, heads_to_keep, loss_drops, measure,
                                                          top_indices)
from compressor.methods.prune.minitron_shape import (ParameterCounter, Shape, depth_shape, hidden_step, shape_of,
                                                     width_shapes)
from compressor.methods.prune.pruner import Pruner
from compressor.models.adapters import Adapter
from compressor.models.sliced import set_embedding, set_linear, set_norm
from compressor.util import parse_count, release_memory

Aggregation = Literal["mean", "l2", "var"]
DIMENSIONS = ("hidden", "ffn", "heads", "kv_heads", "layers")


class MinitronConfig(MethodConfig):
    target_params: str | None = Field(None, description="parameter budget of the pruned model (e.g. 100M, 1.5B); "
                                                        "the shape is searched along --axis")
    axis: Literal["width", "depth", "both"] = Field("width", description="what a parameter budget prunes: widths "
                                                                         "(hidden size, MLP), layers, or both")
    hidden: int | None = Field(None, ge=1, description="hidden size (embedding channels) to keep")
    ffn: int | None = Field(None, ge=1, description="MLP intermediate size to keep")
    heads: int | None = Field(None, ge=1, description="query heads to keep")
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA groups) to keep")
    layers: int | None = Field(None, ge=1, description="decoder layers to keep")
    batch_agg: Aggregation = Field("l2", description="importance: how per-sequence values combine over the batch")
    seq_agg: Aggregation = Field("mean", description="importance: how per-token activations combine over a sequence")
    depth_metric: Literal["ppl", "cosine"] = Field(
        "ppl", description="layers to drop: least calibration perplexity increase when skipped alone, or least "
                           "1 - cos(block input, block output)")
    depth_samples: int = Field(4, ge=1, description="calibration samples for the perplexity without each layer")
    depth_share: float = Field(0.5, gt=0, lt=1, description="axis both: the share of depth-only pruning's layer "
                                                            "removal that depth takes; width takes the rest")
    width_candidates: int = Field(6, ge=1, description="shapes within the budget compared by calibration loss")
    candidate_samples: int = Field(8, ge=1, description="calibration samples that score each candidate shape")
    round_to: int = Field(8, ge=1, description="round kept widths to a multiple of this (hidden sizes to a "
                                               "multiple of the head count too)")


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k/v projection (or columns of o) that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def select(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    set_linear(linear, weight.clone(), None if bias is None else bias.clone())


class Plan:
    """What survives: embedding channels, per block the query heads, key/value groups and MLP
    neurons (sorted indices into the original), and the dropped blocks."""

    def __init__(self, shape: Shape, hidden: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor,
                 neurons: torch.Tensor, dropped: list[int]):
        self.shape, self.hidden, self.heads, self.groups = shape, hidden, heads, groups
        self.neurons, self.dropped = neurons, dropped

    @classmethod
    def from_importance(cls, shape: Shape, importance: Importance, dropped: list[int], kv_heads: int) -> "Plan":
        heads, groups = zip(*(heads_to_keep(s, kv_heads, shape.heads, shape.kv_heads) for s in importance.heads))
        neurons = [top_indices(s, shape.ffn) for s in importance.neurons]
        return cls(shape, top_indices(importance.hidden, shape.hidden), torch.stack(heads), torch.stack(groups),
                   torch.stack(neurons), sorted(dropped))

    def carry(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "heads": self.heads, "groups": self.groups, "neurons": self.neurons,
                "dropped": self.dropped, "shape": self.shape.describe()}

    @classmethod
    def restore(cls, carry: dict[str, Any]) -> "Plan":
        return cls(Shape(**carry["shape"]), carry["hidden"], carry["heads"], carry["groups"], carry["neurons"],
                   list(carry["dropped"]))


@METHODS.register("minitron")
class Minitron(Pruner):
    Config = MinitronConfig

    def __init__(self, config: MinitronConfig):
        super().__init__(config)
        self.plan: Plan | None = None
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------ settings, before any work

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        super().check(model, adapter)
        c = self.config
        text = adapter.text_config(model.config)
        self.original = shape_of(text)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.counter = ParameterCounter(text, adapter.tied_embeddings(model))
        self.pins = {d: getattr(c, d) for d in DIMENSIONS if getattr(c, d) is not None}
        if c.target_params is None and not self.pins:
            raise CompressorError("minitron needs a target: --target-params (e.g. 100M) or an explicit shape",
                                  "pass --target-params 100M, or some of --hidden --ffn --heads --kv-heads --layers")
        o = self.original
        for dim, value in self.pins.items():
            if value > getattr(o, dim):
                raise CompressorError(f"--{dim.replace('_', '-')} {value} is larger than the model's {getattr(o, dim)}",
                                      f"pass at most {getattr(o, dim)}")
        heads, kv = self.pins.get("heads", o.heads), self.pins.get("kv_heads", o.kv_heads)
        if heads % kv or heads // kv > o.heads // o.kv_heads:
            raise CompressorError(
                f"{heads} query heads over {kv} key/value heads is not a whole number of heads per group of at most "
                f"{o.heads // o.kv_heads} (the model's {o.heads}/{o.kv_heads})",
                "keep heads a multiple of kv-heads, with no more heads per group than the model has")
        self.start = replace(o, **self.pins)
        if self.start.hidden % heads:
            raise CompressorError(f"hidden size {self.start.hidden} is not a multiple of the {heads} query heads kept",
                                  "transformers configs need hidden_size divisible by num_attention_heads")
        self.target = None if c.target_params is None else parse_count(c.target_params, "--target-params")
        if self.target is not None:
            self._check_budget()
        elif self.start == o:
            raise CompressorError("the explicit shape is the model's own; nothing would be pruned",
                                  "pass smaller values, or --target-params")

    def _check_budget(self) -> None:
        c, o, total = self.config, self.original, self.counter(self.original)
        if self.target >= total:
            raise CompressorError(f"target {self.target:,} parameters is not smaller than the model ({total:,})",
                                  f"pass --target-params below {total:,}")
        free = self._free()
        if not free:
            raise CompressorError(f"--axis {c.axis} has nothing left to choose: every dimension it prunes is pinned",
                                  "drop an explicit dimension, or --target-params")
        steps = {"layers": 1, "ffn": c.round_to, "hidden": hidden_step(c.round_to, self.start.heads)}
        floor = replace(self.start, **{d: min(steps[d], getattr(self.start, d)) for d in free})
        if self.counter(floor) > self.target:
            raise CompressorError(
                f"no {c.axis} pruning reaches {self.target:,} parameters: the smallest such shape has "
                f"{self.counter(floor):,} (the embeddings alone hold a large part)",
                "raise --target-params, or prune along --axis both")

    def _free(self) -> set[str]:
        axes = {"width": {"hidden", "ffn"}, "depth": {"layers"}, "both": {"hidden", "ffn", "layers"}}
        return axes[self.config.axis] - set(self.pins)

    # ------------------------------------------------------------ engine hooks

    @torch.no_grad()
    def on_start(self, ctx: ModelContext) -> None:
        """Importance, the target shape and what survives (carried: not recomputed on resume)."""
        if self.plan is None:
            self.plan = self._plan(ctx)
        if self.plan.shape.hidden < self.original.hidden:
            ctx.set_inputs(ctx.hidden[..., self.plan.hidden])

    def _plan(self, ctx: ModelContext) -> Plan:
        c, blocks = self.config, ctx.adapter.blocks(ctx.model)
        layers = self._layers()
        keep_inputs = c.depth_samples if layers < self.original.layers and c.depth_metric == "ppl" else 0
        importance = measure(ctx.model, ctx.adapter, ctx.hidden, ctx.block_kwargs, ctx.run, self.original.heads,
                             c.seq_agg, c.batch_agg, keep_inputs, ctx.progress)
        self.report = {"original": self.original.describe(), "aggregation": {"seq": c.seq_agg, "batch": c.batch_agg},
                       "block_cosine": [round(x, 6) for x in importance.cosine]}
        dropped: list[int] = []
        if layers < self.original.layers:
            if keep_inputs:
                head = LanguageModelHead(ctx.model, ctx.adapter)
                dense, drops = loss_drops(list(blocks), ctx.block_kwargs, importance.block_inputs,
                                          ctx.input_ids[:keep_inputs], head, ctx.run, ctx.progress)
                self.report.update(dense_loss=round(dense, 6), loss_drop=[round(x, 6) for x in drops])
                scores = torch.tensor(drops)
            else:
                scores = torch.tensor(importance.cosine)
            keep = top_indices(scores, layers).tolist()
            dropped = [i for i in range(self.original.layers) if i not in keep]
        importance.block_inputs.clear()
        shape = replace(self.start, layers=layers)
        if self.target is not None and self._free() - {"layers"}:
            shape = self._search_width(ctx, shape, importance, dropped)
        self.report.update(shape=shape.describe(), params=self.counter(shape), dropped_layers=dropped,
                           target_params=self.target)
        ctx.progress.log(f"minitron: {self.original} -> {shape}, {self.counter(shape):,} parameters"
                         + (f", dropping layers {dropped}" if dropped else ""))
        return Plan.from_importance(shape, importance, dropped, self.original.kv_heads)

    def _layers(self) -> int:
        """The layer count: pinned, or what the budget leaves along the axis."""
        c, start = self.config, self.start
        if self.target is None or "layers" not in self._free():
            return start.layers
        depth_only = depth_shape(start, self.target, self.counter).layers
        if c.axis == "depth":
            return depth_only
        return start.layers - round(c.depth_share * (start.layers - depth_only))

    def _search_width(self, ctx: ModelContext, start: Shape, importance: Importance, dropped: list[int]) -> Shape:
        c = self.config
        shapes = width_shapes(start, self.target, self.counter, self._free() - {"layers"}, c.round_to,
                              c.width_candidates)
        if not shapes:
            raise CompressorError(f"no width reaches {self.target:,} parameters with {start.layers} layers",
                                  "raise --target-params or lower --depth-share")
        if len(shapes) == 1:
            return shapes[0]
        scored = []
        with ctx.progress.task("minitron: candidate shapes", total=len(shapes)) as bar:
            for shape in shapes:
                plan = Plan.from_importance(shape, importance, dropped, self.original.kv_heads)
                scored.append((self._calibration_loss(ctx, plan), shape))
                bar.advance()
        self.report["candidates"] = [{**s.describe(), "params": self.counter(s), "loss": round(loss, 6)}
                                     for loss, s in scored]
        return min(scored, key=lambda pair: pair[0])[1]

    def _calibration_loss(self, ctx: ModelContext, plan: Plan) -> float:
        """Loss of the model pruned by `plan` on the first candidate samples, built block by block."""
        k = self.config.candidate_samples
        hidden = ctx.hidden[:k][..., plan.hidden]
        for index, block in enumerate(ctx.adapter.blocks(ctx.model)):
            if index not in plan.dropped:
                pruned = copy.deepcopy(block)
                self._slice_block(pruned, index, plan, ctx.adapter)
                hidden = ctx.run(pruned, hidden, ctx.block_kwargs[index])
        norm = copy.deepcopy(ctx.adapter.final_norm(ctx.model))
        set_norm(norm, norm.weight[plan.hidden].clone())
        source = ctx.adapter.head(ctx.model)
        head = nn.Linear(len(plan.hidden), source.out_features, bias=False)
        set_linear(head, source.weight[:, plan.hidden].clone())
        loss = calibration_loss(LanguageModelHead(ctx.model, ctx.adapter, norm, head), hidden, ctx.input_ids[:k],
                                ctx.run)
        release_memory()
        return loss

    @torch.no_grad()
    def on_block_start(self, ctx: BlockContext) -> None:
        if ctx.index in self.plan.dropped:
            ctx.drop()
            return
        self._slice_block(ctx.block, ctx.index, self.plan, ctx.adapter)
        s = self.plan.shape
        ctx.meta.update({"in": s.hidden, "mid": s.hidden, "out": s.hidden, "attn_shortcut": False,
                         "mlp_shortcut": False, "intermediate": s.ffn, "heads": s.heads, "kv_heads": s.kv_heads})

    def _slice_block(self, block: nn.Module, index: int, plan: Plan, adapter: Adapter) -> None:
        layout, hidden, hd = adapter.layout, plan.hidden, self.head_dim
        heads, groups = head_rows(plan.heads[index], hd), head_rows(plan.groups[index], hd)
        query, *key_value = (block.get_submodule(n) for n in layout.attn_inputs)
        select(query, rows=heads, cols=hidden)
        for linear in key_value:
            select(linear, rows=groups, cols=hidden)
        select(block.get_submodule(layout.attn_output), rows=hidden, cols=heads)
        neurons = plan.neurons[index]
        for name in layout.mlp_inputs:
            select(block.get_submodule(name), rows=neurons, cols=hidden)
        select(block.get_submodule(layout.mlp_output), rows=hidden, cols=neurons)
        for name in (layout.attn_norm, layout.mlp_norm, layout.attn_post_norm, layout.mlp_post_norm):
            if name:
                norm = block.get_submodule(name)
                set_norm(norm, norm.weight[hidden].clone())
        block.get_submodule(layout.attention).num_key_value_groups = plan.shape.heads // plan.shape.kv_heads

    @torch.no_grad()
    def on_end(self, ctx: ModelContext) -> None:
        """The embeddings, final norm and head keep the surviving channels."""
        model, adapter, hidden = ctx.model, ctx.adapter, self.plan.hidden
        embedding, head = adapter.embedding(model), adapter.head(model)
        tied = adapter.tied_embeddings(model)
        set_embedding(embedding, embedding.weight[:, hidden].clone())
        norm = adapter.final_norm(model)
        set_norm(norm, norm.weight[hidden].clone())
        if tied:
            head.weight = embedding.weight
            head.in_features = len(hidden)
        else:
            select(head, cols=hidden)

    def restore_block(self, block: nn.Module, meta: dict[str, Any], adapter: Adapter, model: nn.Module) -> None:
        if not meta.get("dropped"):
            index = next(i for i, b in enumerate(adapter.blocks(model)) if b is block)
            self._slice_block(block, index, self.plan, adapter)

    def structure(self, block_meta: list[dict], model: nn.Module, adapter: Adapter) -> dict:
        hidden = self.plan.shape.hidden
        return {"embedding": hidden, "head": hidden, "layers": block_meta, "minitron": self.report}

    def carry(self) -> dict[str, Any]:
        return {**self.plan.carry(), "report": self.report}

    def restore(self, carry: dict[str, Any]) -> None:
        self.plan, self.report = Plan.restore(carry), carry["report"]
