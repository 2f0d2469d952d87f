"""Mixture-of-experts blocks with one nn.Linear per expert projection.

transformers keeps a sparse block's experts as fused 3D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and converts the per-expert checkpoint layout (`experts.{e}.gate_proj`,
`up_proj`, `down_proj`) into them on load. Calibration and quantization work per linear, and the
artifact should keep the per-expert layout that checkpoints, compressed-tensors and vLLM use, so
the adapter swaps the fused module for this one: the same routing arithmetic, one module per
expert, parameters named as in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of a sparse block as a list of ExpertMLP; called like the fused module."""

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj, fused.down_proj
        experts, two_i, hidden = gate_up.shape
        inter = two_i // 2
        meta = gate_up.device.type == "meta"
        modules = []
        for e in range(experts):
            expert = ExpertMLP(hidden, inter, fused.act_fn, gate_up.dtype, device="meta" if meta else "cpu")
            if not meta:
                with torch.no_grad():
                    expert.gate_proj.weight.copy_(gate_up[e, :inter])
                    expert.up_proj.weight.copy_(gate_up[e, inter:])
                    expert.down_proj.weight.copy_(down[e])
            modules.append(expert)
        super().__init__(modules)
        self.num_experts = experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == self.num_experts:
                continue
            position, token = torch.where(mask[e])
            out = self[e](hidden_states[token]) * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def unfuse(block: nn.Module, experts_path: str) -> int:
    """Swap a block's fused experts for UnfusedExperts in place; returns the number of experts (0
    when the block is dense)."""
    parent_path, _, name = experts_path.rpartition(".")
    try:
        parent = block.get_submodule(parent_path)
    except AttributeError:
        return 0
    experts = getattr(parent, name, None)
    if isinstance(experts, UnfusedExperts):
        return experts.num_experts
    if experts is None or not hasattr(experts, "gate_up_proj"):
        return 0
    setattr(parent, name, UnfusedExperts(experts))
    return getattr(parent, name).num_experts
