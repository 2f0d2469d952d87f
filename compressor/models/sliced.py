"""Sliced decoders: a registered transformers model class for structurally pruned models whose
widths differ from block to block (SliceGPT's per-block rotations with shortcut matrices between
blocks, MoDeGPT's per-layer head and MLP widths).

The config keeps every field of the original architecture's config plus a `slicing` spec:

    {"embedding": d0, "head": dh, "layers": [{"in": d, "mid": d, "out": d,
      "attn_shortcut": bool, "mlp_shortcut": bool, "attn_probe": r?, "mlp_probe": r?,
      "intermediate": I?, "qk_head_dim": k?, "v_head_dim": v?}, ...]}

`in`/`mid`/`out` are the residual-stream widths entering the block, between attention and MLP,
and leaving it; a shortcut is a (d_from x d_to) linear on the residual path where the two sides
are in different bases. A probe (Gemma's post-norms, see ProbedRMSNorm) is r extra output
channels of o_proj / down_proj from which the post-norm estimates the original RMS. The model is the original architecture's own modules, resized, with the
decoder layers' forward replaced by one that applies the shortcuts. Registering with the Auto
classes (see `compressor/__init__.py`) lets `AutoModelForCausalLM.from_pretrained` load it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from compressor.models.adapters import Adapter, BlockLayout, adapter_for_config

MODEL_TYPE = "compressor_sliced"


# ---------------------------------------------------------------- layer forward

class SlicedLayerMixin:
    """Forward of a pre-norm decoder layer with optional shortcut matrices on the residuals."""

    _slicing_layout: BlockLayout
    attn_shortcut: nn.Linear | None
    mlp_shortcut: nn.Linear | None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("sliced decoder layers take keyword arguments after hidden_states")
        layout = self._slicing_layout
        h = self.get_submodule(layout.attn_norm)(hidden_states)
        h, _ = self.get_submodule(layout.attention)(hidden_states=h, **kwargs)
        return self.mlp_residual(self.attention_residual(hidden_states, h))

    def attention_residual(self, residual, h):
        """The stream after attention, from the block input and the attention's output projection."""
        layout = self._slicing_layout
        if layout.attn_post_norm:
            h = self.get_submodule(layout.attn_post_norm)(h)
        if self.attn_shortcut is not None:
            residual = self.attn_shortcut(residual)
        return residual + h

    def mlp_residual(self, hidden_states):
        """The block output from the stream after attention."""
        layout = self._slicing_layout
        h = self.get_submodule(layout.mlp)(self.get_submodule(layout.mlp_norm)(hidden_states))
        if layout.mlp_post_norm:
            h = self.get_submodule(layout.mlp_post_norm)(h)
        residual = hidden_states if self.mlp_shortcut is None else self.mlp_shortcut(hidden_states)
        return residual + h


class ProbedRMSNorm(nn.Module):
    """A post-norm (Gemma's sandwich norm) after rotation and slicing. The module before it
    writes `width` channels already in the residual stream's basis, with the norm's scale folded
    in, followed by `probe` channels whose squared sum estimates |y|^2 of the original full-width
    output y; the RMS divides by sqrt(|y|^2 / full). Parameter-free: widths come from the spec."""

    def __init__(self, width: int, probe: int, full: int, eps: float):
        super().__init__()
        self.width, self.probe, self.full, self.eps = width, probe, full, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        mean_square = x[..., self.width:].pow(2).sum(-1, keepdim=True) / self.full
        return (x[..., :self.width] * torch.rsqrt(mean_square + self.eps)).to(h.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, probe={self.probe}, full={self.full}, eps={self.eps}"


def set_probed_norm(layer: nn.Module, name: str, width: int, probe: int, full: int) -> None:
    """Replace the post-norm `name` of `layer` by a ProbedRMSNorm."""
    old = layer.get_submodule(name)
    eps = getattr(old, "eps", getattr(old, "variance_epsilon", 1e-6))
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, ProbedRMSNorm(width, probe, full, eps))


_LAYER_CLASSES: dict[type, type] = {}


def make_sliced_layer(layer: nn.Module, layout: BlockLayout) -> nn.Module:
    """Give `layer` the shortcut-aware forward (in place); its parameters keep their names."""
    if not isinstance(layer, SlicedLayerMixin):
        cls = type(layer)
        if cls not in _LAYER_CLASSES:
            _LAYER_CLASSES[cls] = type(f"Sliced{cls.__name__}", (SlicedLayerMixin, cls), {})
        layer.__class__ = _LAYER_CLASSES[cls]
        layer.attn_shortcut = None
        layer.mlp_shortcut = None
    layer._slicing_layout = layout
    return layer


# ---------------------------------------------------------------- resizing

def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None or linear.bias is not None:
        linear.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)


def set_norm(norm: nn.Module, weight: torch.Tensor) -> None:
    norm.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = tuple(weight.shape)


def set_embedding(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    embedding.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    embedding.embedding_dim = weight.shape[1]


def _empty_like(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def shortcut(d_from: int, d_to: int, like: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(d_from, d_to, bias=False, device=like.device, dtype=like.dtype)
    lin.requires_grad_(False)
    return lin


def resize_to_spec(model: nn.Module, adapter: Adapter, spec: dict) -> None:
    """Reshape a freshly built model of the original architecture to a slicing spec (weights
    are left uninitialized: loading fills them)."""
    emb = adapter.embedding(model)
    set_embedding(emb, _empty_like(emb.weight, emb.weight.shape[0], spec["embedding"]))
    for layer, dims in zip(adapter.blocks(model), spec["layers"], strict=True):
        resize_block(layer, dims, model, adapter)
    norm = adapter.final_norm(model)
    set_norm(norm, _empty_like(norm.weight, spec["head"]))
    head = adapter.head(model)
    if head.weight is not emb.weight:
        set_linear(head, _empty_like(head.weight, head.weight.shape[0], spec["head"]))


def resize_block(layer: nn.Module, dims: dict, model: nn.Module, adapter: Adapter) -> None:
    """Reshape one decoder layer to its entry of a slicing spec (uninitialized weights)."""
    layout = adapter.layout
    make_sliced_layer(layer, layout)
    d_in, d_mid, d_out = dims["in"], dims["mid"], dims["out"]
    for name in layout.attn_inputs:
        lin = layer.get_submodule(name)
        out_features = lin.out_features
        if dims.get("qk_head_dim") and name != layout.attn_inputs[-1]:
            out_features = out_features // _head_dim(model, adapter) * dims["qk_head_dim"]
        if dims.get("v_head_dim") and name == layout.attn_inputs[-1]:
            out_features = out_features // _head_dim(model, adapter) * dims["v_head_dim"]
        set_linear(lin, _empty_like(lin.weight, out_features, d_in))
    o = layer.get_submodule(layout.attn_output)
    o_in = o.in_features
    if dims.get("v_head_dim"):
        o_in = o_in // _head_dim(model, adapter) * dims["v_head_dim"]
    attn_probe, mlp_probe = dims.get("attn_probe", 0), dims.get("mlp_probe", 0)
    set_linear(o, _empty_like(o.weight, d_mid + attn_probe, o_in))
    inter = dims.get("intermediate")
    for name in layout.mlp_inputs:
        lin = layer.get_submodule(name)
        set_linear(lin, _empty_like(lin.weight, inter or lin.out_features, d_mid))
    down = layer.get_submodule(layout.mlp_output)
    set_linear(down, _empty_like(down.weight, d_out + mlp_probe, inter or down.in_features))
    full = adapter.text_config(model.config).hidden_size
    for norm_name, width, probe in ((layout.attn_norm, d_in, 0), (layout.mlp_norm, d_mid, 0),
                                    (layout.attn_post_norm, d_mid, attn_probe),
                                    (layout.mlp_post_norm, d_out, mlp_probe)):
        if norm_name and probe:
            set_probed_norm(layer, norm_name, width, probe, full)
        elif norm_name:
            norm = layer.get_submodule(norm_name)
            set_norm(norm, _empty_like(norm.weight, width))
    like = o.weight
    layer.attn_shortcut = shortcut(d_in, d_mid, like) if dims.get("attn_shortcut") else None
    layer.mlp_shortcut = shortcut(d_mid, d_out, like) if dims.get("mlp_shortcut") else None
    if dims.get("qk_head_dim") or dims.get("v_head_dim"):
        from compressor.models.attention import make_reduced_attention

        config = adapter.text_config(model.config)
        make_reduced_attention(layer.get_submodule(layout.attention), dims.get("qk_head_dim"),
                               dims.get("v_head_dim"), config.num_key_value_heads)


def _head_dim(model: nn.Module, adapter: Adapter) -> int:
    config = adapter.text_config(model.config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------- config and model class

def base_config_dict(config) -> dict:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in ("slicing", "base_model_type", "architectures", "auto_map", "transformers_version"):
        data.pop(key, None)
    return data


_CLASSES: dict[str, type] = {}


def sliced_classes() -> tuple[type, type]:
    """(SlicedConfig, SlicedForCausalLM), defined on first use so that importing compressor
    does not import transformers."""
    return sliced_config_class(), sliced_model_class()


def sliced_config_class() -> type:
    if "config" in _CLASSES:
        return _CLASSES["config"]
    from transformers.configuration_utils import PretrainedConfig

    class SlicedConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        def __init__(self, base_model_type: str = "llama", slicing: dict | None = None, **kwargs):
            self.base_model_type = base_model_type
            self.slicing = slicing or {}
            super().__init__(**kwargs)

        def base_config(self):
            from transformers import AutoConfig

            data = base_config_dict(self)
            data.pop("model_type", None)
            return AutoConfig.for_model(self.base_model_type, **data)

    _CLASSES["config"] = SlicedConfig
    return SlicedConfig


def sliced_model_class() -> type:
    if "model" in _CLASSES:
        return _CLASSES["model"]
    from transformers.generation import GenerationMixin
    from transformers.modeling_utils import PreTrainedModel

    SlicedConfig = sliced_config_class()

    class SlicedForCausalLM(PreTrainedModel, GenerationMixin):
        config_class = SlicedConfig
        base_model_prefix = "model"
        _supports_sdpa = True
        _supports_attention_backend = True
        _no_split_modules: list[str] = []

        def __init__(self, config):
            super().__init__(config)
            from transformers import AutoModelForCausalLM

            base_config = config.base_config()
            base_config.tie_word_embeddings = config.tie_word_embeddings
            base = AutoModelForCausalLM.from_config(base_config)
            adapter = adapter_for_config(base_config)
            resize_to_spec(base, adapter, config.slicing)
            self.model = base.model
            self.lm_head = base.lm_head
            self._final_softcap = getattr(base_config, "final_logit_softcapping", None)
            if config.tie_word_embeddings:
                self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
            self.post_init()

        def _init_weights(self, module):  # every weight comes from the checkpoint
            pass

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
            from transformers.modeling_outputs import CausalLMOutputWithPast

            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
            hidden = out.last_hidden_state
            if isinstance(logits_to_keep, int) and logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            elif not isinstance(logits_to_keep, int):
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
            if self._final_softcap:
                logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                          hidden_states=out.hidden_states, attentions=out.attentions)

    _CLASSES["model"] = SlicedForCausalLM
    return SlicedForCausalLM


def register_config() -> None:
    """Make AutoConfig know the sliced model type (idempotent). Called by compressor/__init__
    when transformers' auto-config module has loaded."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, sliced_config_class())


def register_model() -> None:
    """Make AutoModelForCausalLM know the sliced model class (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    register_config()
    config_cls, model_cls = sliced_classes()
    if config_cls not in AutoModelForCausalLM._model_mapping._extra_content:
        AutoModelForCausalLM.register(config_cls, model_cls)


def register_with_transformers() -> None:
    register_model()


def sliced_config_dict(original_config, spec: dict, tie_word_embeddings: bool, dropped: list[int] = ()) -> dict:
    """config.json of a sliced artifact: the original fields, the spec, our model type."""
    data = base_config_dict(original_config)
    base_type = data.pop("model_type")
    data.update(model_type=MODEL_TYPE, base_model_type=base_type, slicing=copy.deepcopy(spec),
                tie_word_embeddings=tie_word_embeddings, architectures=["SlicedForCausalLM"])
    return drop_layers(data, dropped)


def ordinary_config_dict(original_config, hidden_size: int | None = None, intermediate_size: int | None = None,
                         tie_word_embeddings: bool | None = None, heads: int | None = None,
                         kv_heads: int | None = None, dropped: list[int] = ()) -> dict:
    """config.json of an artifact that fits the original architecture with smaller widths (and
    fewer heads or layers)."""
    data = original_config.to_dict()
    data.pop("transformers_version", None)
    if hidden_size is not None or heads is not None:
        data["head_dim"] = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
    if hidden_size is not None:
        data["hidden_size"] = hidden_size
    if intermediate_size is not None:
        data["intermediate_size"] = intermediate_size
    if heads is not None:
        data["num_attention_heads"] = heads
    if kv_heads is not None:
        data["num_key_value_heads"] = kv_heads
    if tie_word_embeddings is not None:
        data["tie_word_embeddings"] = tie_word_embeddings
    return drop_layers(data, dropped)


def drop_layers(data: dict, dropped: list[int]) -> dict:
    """A config dict without the decoder layers at `dropped` (their count and per-layer types)."""
    if not dropped:
        return data
    layers = data["num_hidden_layers"]
    if isinstance(data.get("layer_types"), list) and len(data["layer_types"]) == layers:
        data["layer_types"] = [t for i, t in enumerate(data["layer_types"]) if i not in set(dropped)]
    data["num_hidden_layers"] = layers - len(set(dropped))
    return data


def rms_scale(full: int, width: int) -> float:
    """An RMSNorm over `width` channels of a rotated stream divides by sqrt(|x|^2/width); the
    original divided by sqrt(|x|^2/full). The norm's weight carries the ratio."""
    return math.sqrt(full / width)
