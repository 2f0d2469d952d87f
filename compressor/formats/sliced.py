"""Writing structurally pruned models: as the original architecture with smaller widths where
the shapes allow (an ordinary config: transformers and vLLM load it without compressor), or as
the registered sliced model class (per-block widths, shortcut matrices)."""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.models.adapters import Adapter
from compressor.models.sliced import ordinary_config_dict, sliced_config_dict


def is_ordinary(spec: dict, full_hidden: int) -> bool:
    """True when every block has one residual width, no shortcuts, and uniform head widths."""
    layers = spec["layers"]
    widths = {spec["embedding"], spec["head"]} | {d[k] for d in layers for k in ("in", "mid", "out")}
    uniform = {(d.get("intermediate"), d.get("qk_head_dim"), d.get("v_head_dim"), d.get("heads"), d.get("kv_heads"))
               for d in layers}
    return (len(widths) == 1
            and not any(d["attn_shortcut"] or d["mlp_shortcut"] or d.get("attn_probe") or d.get("mlp_probe")
                        for d in layers)
            and len(uniform) == 1 and next(iter(uniform))[1:3] == (None, None))


def export(model: nn.Module, adapter: Adapter, spec: dict, original_config, keep_dtype: torch.dtype,
           dropped: list[int] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json contents, tensors) of a pruned in-memory model; `dropped` are the original
    indices of decoder blocks removed from it."""
    text = adapter.text_config(original_config)
    full = text.hidden_size
    tied = adapter.tied_embeddings(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name in adapter.tied_weight_names(model):
        state.pop(name, None)
    if is_ordinary(spec, full):
        width = spec["embedding"]
        first = spec["layers"][0]
        config = ordinary_config_dict(text, hidden_size=width if width != full else None,
                                      intermediate_size=first.get("intermediate"), tie_word_embeddings=tied,
                                      heads=first.get("heads"), kv_heads=first.get("kv_heads"), dropped=dropped)
        if adapter.embedding_scaled_by_hidden and width != full:
            # The architecture scales embeddings by sqrt(hidden_size): fold the old scale in.
            key = _embedding_key(model, adapter)
            state[key] = state[key] * math.sqrt(full / width)
    else:
        config = sliced_config_dict(text, spec, tie_word_embeddings=tied, dropped=dropped)
    config["dtype"] = str(keep_dtype).removeprefix("torch.")
    tensors = {k: (v.to(keep_dtype) if v.is_floating_point() else v).contiguous() for k, v in sorted(state.items())}
    return config, tensors


def _embedding_key(model: nn.Module, adapter: Adapter) -> str:
    emb = adapter.embedding(model)
    for name, module in model.named_modules():
        if module is emb:
            return f"{name}.weight"
    raise ValueError("embedding not found")
