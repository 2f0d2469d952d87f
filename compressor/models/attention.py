"""Attention with reduced head widths (MoDeGPT): fewer value channels per head (VO compression)
and fewer query/key channels per head (QK compression). Kept query/key channels are whole
rotary pairs, listed per key/value group in the buffer `qk_index` ([kv_heads, k], first halves
then their partners), so the rotary tables are gathered per group and rotate_half pairs channel
j with j + k/2 exactly as it paired them before. The attention scale stays the original
1/sqrt(head_dim): the kept channels approximate the full dot product."""

from __future__ import annotations

import sys

import torch
from torch import nn


class ReducedAttentionMixin:
    v_head_dim: int

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        module = sys.modules[type(self).__mro__[2].__module__]
        input_shape = hidden_states.shape[:-1]
        qk_dim = self.qk_head_dim
        q = self.q_proj(hidden_states).view(*input_shape, -1, qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        if qk_dim == self.head_dim:
            q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        else:
            q, k = _rotary_per_group(q, k, cos, sin, self.qk_index, module.rotate_half)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          module.eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
        # Fused attention kernels (torch's CPU flash SDPA among them) want one head width for q, k
        # and v; zero channels make them equal without changing any dot product or output.
        pad = q.shape[-1] - v.shape[-1]
        if pad > 0:
            v = nn.functional.pad(v, (0, pad))
        elif pad < 0:
            q, k = nn.functional.pad(q, (0, -pad)), nn.functional.pad(k, (0, -pad))
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
        if pad > 0:
            out = out[..., :self.v_head_dim]
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def _rotary_per_group(q, k, cos, sin, index, rotate_half):
    """Rotary embedding on the kept channels: cos/sin [B, T, hd] gathered per key/value group."""
    kv, width = index.shape
    rep = q.shape[1] // kv
    cos_g = cos[:, None, :, :].expand(-1, kv, -1, -1).gather(-1, index[None, :, None, :].expand(
        cos.shape[0], kv, cos.shape[1], width))
    sin_g = sin[:, None, :, :].expand(-1, kv, -1, -1).gather(-1, index[None, :, None, :].expand(
        sin.shape[0], kv, sin.shape[1], width))
    k = k * cos_g + rotate_half(k) * sin_g
    cos_q, sin_q = cos_g.repeat_interleave(rep, dim=1), sin_g.repeat_interleave(rep, dim=1)
    q = q * cos_q + rotate_half(q) * sin_q
    return q, k


_CLASSES: dict[type, type] = {}


def make_reduced_attention(attention: nn.Module, qk_head_dim: int | None, v_head_dim: int | None,
                           kv_heads: int | None = None) -> nn.Module:
    """Give an attention module reduced value and/or query-key head widths (in place); with a
    reduced query/key width it gets an (uninitialized unless already present) `qk_index` buffer."""
    if not isinstance(attention, ReducedAttentionMixin):
        cls = type(attention)
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedAttentionMixin, cls), {})
        attention.__class__ = _CLASSES[cls]
    attention.v_head_dim = v_head_dim or attention.head_dim
    attention.qk_head_dim = qk_head_dim or attention.head_dim
    if qk_head_dim and qk_head_dim != attention.head_dim and getattr(attention, "qk_index", None) is None:
        device = attention.q_proj.weight.device
        attention.register_buffer("qk_index", torch.zeros(kv_heads, qk_head_dim, dtype=torch.long, device=device))
    return attention
