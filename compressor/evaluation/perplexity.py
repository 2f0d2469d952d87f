"""The perplexity protocol and per-token KL divergence to a base model.

Perplexity: token-level over fixed non-overlapping windows, no BOS inserted, exp of the mean
NLL over every predicted token. KL(base ‖ model) per token, averaged over the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from compressor.calib.data import TokenSet
from compressor.progress import Progress


@dataclass
class _Accumulator:
    nll: float = 0.0
    kl: float = 0.0
    tokens: int = 0

    def metrics(self, with_kl: bool) -> dict:
        out = {"ppl": math.exp(self.nll / self.tokens), "nll": self.nll / self.tokens, "tokens": self.tokens}
        if with_kl:
            out["kl"] = self.kl / self.tokens
        return out


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [batch, len-1, vocab], normalized in place one sequence at a
    time so the temporaries stay at one sequence's logits."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    for row in logits:
        row -= torch.logsumexp(row, dim=-1, keepdim=True)
    return logits


def _kl(base_lp: torch.Tensor, lp: torch.Tensor) -> float:
    """Sum over tokens of KL(base ‖ model), one sequence at a time."""
    total = 0.0
    for b, m in zip(base_lp, lp):
        total += float((b.exp() * (b - m)).sum())
    return total


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], tokens: TokenSet, base: nn.Module | None = None,
                    batch_size: int = 4, device: str = "cpu", progress: Progress | None = None) -> dict[str, dict]:
    """Perplexity of each model (and of the base), and each model's KL to the base.

    The base's distribution is computed once per batch and shared by every model, so
    comparing several candidates costs one base forward, not one per candidate.
    """
    progress = progress or Progress()
    acc = {name: _Accumulator() for name in models}
    base_acc = _Accumulator()
    seconds = {name: 0.0 for name in [*models, "base"]}
    ids_all = tokens.input_ids
    with progress.task("evaluating windows", total=ids_all.shape[0]) as bar:
        for start in range(0, ids_all.shape[0], batch_size):
            ids = ids_all[start:start + batch_size].to(device)
            targets = ids[:, 1:].unsqueeze(-1)
            base_lp = None
            if base is not None:
                t0 = time.perf_counter()
                base_lp = _log_probs(base, ids)
                seconds["base"] += time.perf_counter() - t0
                base_acc.nll += float(-base_lp.gather(-1, targets).sum())
                base_acc.tokens += targets.numel()
            for name, model in models.items():
                t0 = time.perf_counter()
                lp = _log_probs(model, ids)
                seconds[name] += time.perf_counter() - t0
                a = acc[name]
                a.nll += float(-lp.gather(-1, targets).sum())
                a.tokens += targets.numel()
                if base_lp is not None:
                    a.kl += _kl(base_lp, lp)
                del lp
            bar.advance(ids.shape[0])
    results = {name: {**a.metrics(base is not None), "forward_s": seconds[name]} for name, a in acc.items()}
    if base is not None:
        results["base"] = {**base_acc.metrics(False), "forward_s": seconds["base"]}
    return results
