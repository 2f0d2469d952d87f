"""Minitron's activation-based importance (Muralidharan et al., 2024), from one pass of the dense
model over calibration data:

- MLP neurons: the intermediate activations entering down_proj (act(gate) * up), |a| per token;
- attention heads: the norm of each head's output (its slice of o_proj's input) per token;
- embedding channels: |x| of every norm's output on the residual stream (each block's norms and
  the final norm), summed over the norms;
- blocks: 1 - cosine(block input, block output) (block importance), and the increase of the
  calibration loss when the block alone is skipped.

Per-token values are aggregated over the sequence, then over the batch: mean, L2 or variance each
(the paper compares them; L2 over the batch of per-sequence means is its best for width).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.methods.base import Runner
from compressor.models.adapters import Adapter

AGGREGATIONS = ("mean", "l2", "var")


class Aggregate:
    """Per-channel aggregation of per-token values [batch, seq, channels], streamed over batches."""

    def __init__(self, seq: str, batch: str):
        self.seq, self.batch = seq, batch
        self.sum = self.sumsq = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double()
        per_sequence = {"mean": lambda: v.mean(1), "l2": lambda: v.pow(2).sum(1).sqrt(),
                        "var": lambda: v.var(1, correction=0)}[self.seq]()
        total, squares = per_sequence.sum(0), per_sequence.pow(2).sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.sumsq = squares if self.sumsq is None else self.sumsq + squares
        self.count += per_sequence.shape[0]

    def result(self) -> torch.Tensor:
        mean = self.sum / self.count
        out = {"mean": mean, "l2": self.sumsq.sqrt(), "var": self.sumsq / self.count - mean.pow(2)}[self.batch]
        return out.cpu()


@dataclass
class Importance:
    hidden: torch.Tensor  # [hidden] embedding channels
    heads: list[torch.Tensor]  # per block: [heads] query heads
    neurons: list[torch.Tensor]  # per block: [intermediate]
    cosine: list[float]  # per block: 1 - mean cos(input, output)
    loss: float | None = None  # dense calibration loss (nats per token) on the depth samples
    loss_drop: list[float] | None = None  # per block: loss without that block minus the dense loss
    block_inputs: list[torch.Tensor] = field(default_factory=list, repr=False)  # depth samples' inputs


def head_norms(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head output norms [b, s, heads] of an attention output [b, s, heads * head_dim]."""
    return x.unflatten(-1, (heads, -1)).float().norm(dim=-1)


@torch.no_grad()
def measure(model: nn.Module, adapter: Adapter, hidden: torch.Tensor, block_kwargs: list[dict[str, Any]],
            run: Runner, heads: int, seq: str, batch: str, keep_inputs: int, progress) -> Importance:
    """Every importance except the loss drops, in one pass over the dense blocks; the inputs of
    every block for the first `keep_inputs` samples are kept for `loss_drops`."""
    layout = adapter.layout
    norm_names = [n for n in (layout.attn_norm, layout.mlp_norm, layout.attn_post_norm, layout.mlp_post_norm) if n]
    blocks = adapter.blocks(model)
    hidden_total = None
    head_scores, neuron_scores, cosine, inputs = [], [], [], []
    with progress.task("minitron: importance", total=len(blocks)) as bar:
        for index, block in enumerate(blocks):
            norms = [Aggregate(seq, batch) for _ in norm_names]
            head_agg, neuron_agg = Aggregate(seq, batch), Aggregate(seq, batch)
            with ExitStack() as stack:
                for name, agg in zip(norm_names, norms):
                    handle = block.get_submodule(name).register_forward_hook(
                        lambda _m, _a, out, agg=agg: agg.add(out.abs()))
                    stack.callback(handle.remove)
                handle = block.get_submodule(layout.attn_output).register_forward_pre_hook(
                    lambda _m, args: head_agg.add(head_norms(args[0], heads)))
                stack.callback(handle.remove)
                handle = block.get_submodule(layout.mlp_output).register_forward_pre_hook(
                    lambda _m, args: neuron_agg.add(args[0].abs()))
                stack.callback(handle.remove)
                out = run(block, hidden, block_kwargs[index])
            for agg in norms:
                hidden_total = agg.result() if hidden_total is None else hidden_total + agg.result()
            head_scores.append(head_agg.result().float())
            neuron_scores.append(neuron_agg.result().float())
            cosine.append(1 - mean_cosine(hidden, out))
            if keep_inputs:
                inputs.append(hidden[:keep_inputs].clone())
            hidden = out
            bar.advance()
    final = Aggregate(seq, batch)
    run.map(adapter.final_norm(model), lambda h: final.add(adapter.final_norm(model)(h).abs()), hidden)
    hidden_total = hidden_total + final.result()
    if keep_inputs:
        inputs.append(hidden[:keep_inputs].clone())  # what enters the final norm
    return Importance(hidden_total.float(), head_scores, neuron_scores, cosine, block_inputs=inputs)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, a.shape[0], chunk):
        cos = F.cosine_similarity(a[start:start + chunk].double(), b[start:start + chunk].to(a.device).double(), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return total / count


class LanguageModelHead(nn.Module):
    """The final norm and output head of a model (with Gemma's logit soft-capping), as one module
    the block runner can move to the compute device."""

    def __init__(self, model: nn.Module, adapter: Adapter, norm: nn.Module | None = None,
                 head: nn.Module | None = None):
        super().__init__()
        self.norm = norm if norm is not None else adapter.final_norm(model)
        self.head = head if head is not None else adapter.head(model)
        self.softcap = getattr(adapter.text_config(model.config), "final_logit_softcapping", None)

    def nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Summed next-token negative log-likelihood, one sequence at a time (logits stay small)."""
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for h, t in zip(hidden, ids):
            logits = self.head(self.norm(h[:-1])).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            total += F.cross_entropy(logits, t[1:].to(logits.device), reduction="sum").double()
        return total.reshape(1)


def calibration_loss(lm_head: LanguageModelHead, hidden: torch.Tensor, ids: torch.Tensor, run: Runner) -> float:
    """Mean next-token loss (nats) of final hidden states against their token ids."""
    sums = run.map(lm_head, lambda h, t: lm_head.nll(h, t), hidden, ids)
    return float(sums.sum()) / (ids.shape[0] * (ids.shape[1] - 1))


@torch.no_grad()
def loss_drops(blocks: list[nn.Module], block_kwargs: list[dict[str, Any]], inputs: list[torch.Tensor],
               ids: torch.Tensor, lm_head: LanguageModelHead, run: Runner, progress,
               ) -> tuple[float, list[float]]:
    """(dense loss, per block: the loss with that block alone skipped minus the dense loss)."""
    dense = calibration_loss(lm_head, inputs[-1], ids, run)
    drops = []
    with progress.task("minitron: loss without each block", total=len(blocks)) as bar:
        for index in range(len(blocks)):
            hidden = inputs[index]
            for later in range(index + 1, len(blocks)):
                hidden = run(blocks[later], hidden, block_kwargs[later])
            drops.append(calibration_loss(lm_head, hidden, ids, run) - dense)
            bar.advance()
    return dense, drops


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring indices, in ascending order (ties broken by position)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:keep].sort().values


def heads_to_keep(scores: torch.Tensor, kv_heads: int, keep_heads: int, keep_groups: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept key/value groups): whole GQA groups by their heads' summed
    importance, then the same number of query heads in each kept group, so every kept head still
    reads its own group's keys and values."""
    per_group = scores.numel() // kv_heads
    grouped = scores.view(kv_heads, per_group)
    groups = top_indices(grouped.sum(1), keep_groups)
    heads = [g * per_group + top_indices(grouped[g], keep_heads // keep_groups) for g in groups.tolist()]
    return torch.cat(heads), groups

