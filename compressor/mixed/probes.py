"""KL to the base model (and perplexity) of the model with some linears replaced, on fixed token windows, computed
from the first changed block on: every block's float input is cached once, so changing block b
costs the blocks after it and the head, not the whole model."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from compressor.models.adapters import Adapter


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def _from_block(adapter: Adapter, model: nn.Module, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """The next forward skips blocks before `start` and feeds `hidden` into block `start`."""
    blocks = adapter.blocks(model)

    def feed(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with ExitStack() as stack:
        for block in blocks[:start]:
            block.forward = _passthrough
            stack.callback(delattr, block, "forward")
        stack.callback(blocks[start].register_forward_pre_hook(feed, with_kwargs=True).remove)
        yield


@contextmanager
def replaced(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Linears computing with other weights for a while."""
    saved = {name: linears[name].weight.data for name in weights}
    try:
        for name, w in weights.items():
            linears[name].weight.data = w.to(saved[name].dtype)
        yield
    finally:
        for name, w in saved.items():
            linears[name].weight.data = w


def _nll(log_probs: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1].float()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


class KLProbe:
    """KL(base ‖ model with replaced linears) per token on `ids` [windows, length]."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, batch_size: int = 8,
                 cache_inputs: bool = True):
        self.model, self.adapter, self.ids, self.batch_size = model, adapter, ids, batch_size
        blocks = adapter.blocks(model)
        self.linears: dict[str, nn.Linear] = {}
        self.block_of: dict[str, int] = {}
        for index, block in enumerate(blocks):
            prefix = adapter.block_prefix(model, index)
            for name, linear in adapter.block_linears(block).items():
                self.linears[prefix + name] = linear
                self.block_of[prefix + name] = index
        self.inputs: list[list[torch.Tensor]] = [[] for _ in blocks]  # per block, per batch
        self.base: list[torch.Tensor] = []  # per batch, base log-probabilities (float16 to halve memory)
        base_nll = 0.0
        handles = []
        if cache_inputs:
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(
                    lambda _m, args, kwargs, i=index: self.inputs[i].append(
                        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in self._batches():
                    lp = _log_softmax(model(input_ids=batch, use_cache=False).logits)
                    base_nll += _nll(lp, batch)
                    self.base.append(lp.half())
        finally:
            for h in handles:
                h.remove()
        self.tokens = sum(lp.shape[0] * lp.shape[1] for lp in self.base)
        self.cached = cache_inputs
        self.base_ppl = math.exp(base_nll / self.tokens)

    def _batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.ids.shape[0], self.batch_size):
            yield self.ids[start:start + self.batch_size]

    def kl(self, weights: dict[str, torch.Tensor]) -> float:
        """Mean per-token KL with the named linears computing with `weights`."""
        return self.measure(weights)["kl"]

    def measure(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """KL to the base and perplexity with the named linears computing with `weights`."""
        start = min((self.block_of[n] for n in weights), default=0) if self.cached else 0
        with replaced(self.linears, weights):
            return self._run(self.model, start)

    def compare(self, model: nn.Module) -> dict[str, float]:
        """KL to the base and perplexity of another model of the same architecture."""
        return self._run(model, 0)

    @torch.no_grad()
    def _run(self, model: nn.Module, start: int) -> dict[str, float]:
        kl = nll = 0.0
        for number, batch in enumerate(self._batches()):
            with ExitStack() as stack:
                if start > 0:
                    stack.enter_context(_from_block(self.adapter, model, start, self.inputs[start][number]))
                lp = _log_softmax(model(input_ids=batch, use_cache=False).logits)
            base = self.base[number].float()
            kl += float((base.exp() * (base - lp)).sum())
            nll += _nll(lp, batch)
        return {"kl": kl / self.tokens, "ppl": math.exp(nll / self.tokens)}
