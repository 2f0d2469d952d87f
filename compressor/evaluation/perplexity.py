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
from compressor.pipeline.progress import Progress


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
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1)


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
                base_p = base_lp.exp()
            for name, model in models.items():
                t0 = time.perf_counter()
                lp = _log_probs(model, ids)
                seconds[name] += time.perf_counter() - t0
                a = acc[name]
                a.nll += float(-lp.gather(-1, targets).sum())
                a.tokens += targets.numel()
                if base_lp is not None:
                    a.kl += float((base_p * (base_lp - lp)).sum())
                del lp
            bar.advance(ids.shape[0])
    results = {name: {**a.metrics(base is not None), "forward_s": seconds[name]} for name, a in acc.items()}
    if base is not None:
        results["base"] = {**base_acc.metrics(False), "forward_s": seconds["base"]}
    return results
