"""Attention with a value head width different from the query/key head width (MoDeGPT's
VO compression keeps fewer value channels per head). The original module's projections,
norms, rotary embedding and attention kernel are used unchanged; only the value reshape differs."""

from __future__ import annotations

import sys

from torch import nn


class ReducedAttentionMixin:
    v_head_dim: int

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        module = sys.modules[type(self).__mro__[2].__module__]
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          module.eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


_CLASSES: dict[type, type] = {}


def make_reduced_attention(attention: nn.Module, qk_head_dim: int | None, v_head_dim: int | None) -> nn.Module:
    """Give an attention module a value head width of `v_head_dim` (in place)."""
    if qk_head_dim:
        raise NotImplementedError("reduced query/key head widths are not implemented")
    if not isinstance(attention, ReducedAttentionMixin):
        cls = type(attention)
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedAttentionMixin, cls), {})
        attention.__class__ = _CLASSES[cls]
    attention.v_head_dim = v_head_dim or attention.head_dim
    return attention
