"""How much an error in each linear's output costs at the model's output, to second order.

KL(p ‖ p + δp) ≈ ½ δyᵀ F δy for a change δy of a linear's output y, where F is the Fisher
information of the model's own next-token distribution with respect to y: E[g gᵀ] with
g = ∇_y log p(ŷ) and ŷ drawn from p. The layer-wise Hessian score ½·tr(ΔW H ΔWᵀ) is the error's
squared size at the layer; weighted by the mean of F's diagonal over the layer's outputs it becomes a
predicted KL, in the same units for every layer: what happens to the error in all the blocks after
the layer (amplified, squashed by a softmax, absorbed by a norm) is in F.

One backward pass per label draw over a probe set; gradients reach activations only.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from compressor.models.adapters import Adapter


def output_fisher(model: nn.Module, adapter: Adapter, ids: torch.Tensor, batch_size: int, draws: int = 2,
                  seed: int = 0) -> dict[str, float]:
    """Per linear (module name): mean over tokens and output features of E[(∂ log p(ŷ)/∂y)²]."""
    linears = {}
    for index, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_prefix(model, index)
        linears.update({prefix + n: l for n, l in adapter.block_linears(block).items()})
    sums = dict.fromkeys(linears, 0.0)
    generator = torch.Generator().manual_seed(seed)
    embedding = adapter.embedding(model)
    trainable = {p: p.requires_grad for p in model.parameters()}
    tokens = 0
    with ExitStack() as stack:
        for p in trainable:
            p.requires_grad_(False)
        stack.callback(lambda: [p.requires_grad_(flag) for p, flag in trainable.items()])
        for name, linear in linears.items():
            def keep(_module, _args, output, name=name):
                output.register_hook(lambda grad, name=name: _add(sums, name, grad))
            stack.callback(linear.register_forward_hook(keep).remove)
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size]
            for _ in range(draws):
                embeds = embedding(batch).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1].float()
                log_probs = torch.log_softmax(logits, dim=-1)
                drawn = torch.multinomial(log_probs.detach().exp().reshape(-1, logits.shape[-1]), 1,
                                          generator=generator).reshape(*logits.shape[:2], 1)
                log_probs.gather(-1, drawn).sum().backward()
                tokens += logits.shape[0] * logits.shape[1]
    return {name: value / tokens for name, value in sums.items()}


def _add(sums: dict[str, float], name: str, grad: torch.Tensor) -> None:
    sums[name] += float(grad.detach().double().pow(2).sum()) / grad.shape[-1]
