"""Architecture adapters: an architecture-neutral view of a causal LM's decoder blocks.

An adapter names, for one family of architectures, the decoder blocks and, inside each
block, the linear layers grouped by shared input in execution order, with the norm that
feeds each group. Methods and the pipeline see only this view; a new architecture is a new
adapter, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from compressor.errors import CompressorError
from compressor.registry import Registry


@dataclass(frozen=True)
class LinearGroup:
    """Linears inside a block that read the same input, e.g. q/k/v after the input norm."""

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    # A linear whose output channels are this group's input channels, scaled through linearly
    # (up_proj feeds down_proj through act(gate) * up): where a per-channel scale can be folded
    # when there is no norm in front.
    source: str | None = None


@dataclass(frozen=True)
class Shortcut:
    """A block submodule whose output is exactly its last linear applied to that linear's input.

    Once everything inside the submodule before `last_linear` is final, the pipeline can cache
    `last_linear`'s inputs and replace the submodule by `last_linear(cached input)` in later
    passes over the block, instead of recomputing, e.g., attention three more times.
    """

    module: str
    last_linear: str
    returns_tuple: bool = False  # attention modules return (output, attention weights)


@dataclass(frozen=True)
class BlockLayout:
    """Where a pre-norm decoder block reads and writes its residual stream (names relative to
    the block). Structured pruning needs it: slicing rotates every linear that reads or writes
    the stream, and every norm that sits on it. `*_post_norm` name norms applied to a module's
    output before the residual add (Gemma's sandwich norms); None where there are none."""

    attn_norm: str
    attn_inputs: tuple[str, ...]
    attn_output: str
    mlp_norm: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    attention: str = "self_attn"
    mlp: str = "mlp"


class Adapter:
    """Base class. Subclasses declare the model types they handle and their block layout."""

    model_types: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[tuple[LinearGroup, ...]] = ()
    shortcuts: ClassVar[tuple[Shortcut, ...]] = ()
    # RMSNorm flavour: Gemma scales by (1 + weight), Llama by weight. Smoothing needs it.
    norm_weight_offset: ClassVar[float] = 0.0
    # Gemma multiplies token embeddings by sqrt(hidden_size); Llama does not.
    embedding_scaled_by_hidden: ClassVar[bool] = False

    @property
    def layout(self) -> BlockLayout:
        attn_in, attn_out, mlp_in, mlp_out = self.groups
        return BlockLayout(attn_norm=attn_in.norm, attn_inputs=attn_in.linears, attn_output=attn_out.linears[0],
                           mlp_norm=mlp_in.norm, mlp_inputs=mlp_in.linears, mlp_output=mlp_out.linears[0],
                           attn_post_norm=self.post_norms[0], mlp_post_norm=self.post_norms[1])

    # Norms on a module's output before the residual add: (after attention, after MLP).
    post_norms: ClassVar[tuple[str | None, str | None]] = (None, None)
    # Norms over each query and key head, inside attention (Qwen3, Gemma 3), where present.
    query_key_norms: ClassVar[tuple[str, str]] = ("self_attn.q_norm", "self_attn.k_norm")
    # The output head, relative to the model; artifacts keep it unquantized.
    head_name: ClassVar[str] = "lm_head"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put the model in the form the engine works on (in place), e.g. one nn.Linear per expert;
        the state dict keeps the checkpoint's names. Called by the loader on every model it builds."""
        return model

    def has_experts(self, model: nn.Module) -> bool:
        return False

    def text_config(self, config):
        """The decoder's config (a multimodal config nests it as text_config)."""
        return getattr(config, "text_config", None) or config

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def remove_blocks(self, model: nn.Module, indices: list[int]) -> None:
        """Delete decoder blocks (depth pruning), in place: the rest are renumbered, each keeps its
        own attention type, and the config's layer count and per-layer types follow."""
        drop = set(indices)
        decoder = self.decoder(model)
        kept = [block for i, block in enumerate(self.blocks(model)) if i not in drop]
        decoder.layers = nn.ModuleList(kept)
        for position, block in enumerate(kept):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = position  # the KV cache's slot
        config = self.text_config(model.config)
        types = getattr(config, "layer_types", None)
        if types is not None and len(types) == len(kept) + len(drop):
            config.layer_types = [t for i, t in enumerate(types) if i not in drop]
        config.num_hidden_layers = len(kept)

    def block_prefix(self, model: nn.Module, index: int) -> str:
        """State-dict prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{_module_path(model, self.blocks(model))}.{index}."

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.head_name)

    def tied_embeddings(self, model: nn.Module) -> bool:
        return self.head(model).weight is self.embedding(model).weight

    def tied_weight_names(self, model: nn.Module) -> list[str]:
        """State-dict names that alias another weight (the head, when tied to the embedding)."""
        return [f"{self.head_name}.weight"] if self.tied_embeddings(model) else []

    def normalizes_query_key(self, model: nn.Module) -> bool:
        block = self.blocks(model)[0]
        return any(_has_submodule(block, name) for name in self.query_key_norms)

    def attention_has_bias(self, model: nn.Module) -> bool:
        block = self.blocks(model)[0]
        return any(block.get_submodule(n).bias is not None for n in self.layout.attn_inputs)

    def shortcut_of(self, linear: str) -> Shortcut | None:
        """The shortcut submodule (attention, MLP) that contains a linear."""
        for shortcut in self.shortcuts:
            if linear.startswith(shortcut.module + "."):
                return shortcut
        return None

    def shortcut_ending_at(self, linear: str) -> Shortcut | None:
        """The shortcut whose last linear this is (o_proj ends attention, down_proj the MLP)."""
        return next((s for s in self.shortcuts if s.last_linear == linear), None)

    def block_groups(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        """The block's linear groups in execution order (a block of a mixture of experts has one
        group pair per expert, so the groups may depend on the block)."""
        return self.groups

    def linear_names(self, block: nn.Module | None = None) -> list[str]:
        """Names of the block's linears, relative to the block, in execution order."""
        groups = self.groups if block is None else self.block_groups(block)
        return [name for group in groups for name in group.linears]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.linear_names(block)}


ADAPTERS: Registry[type[Adapter]] = Registry("architecture")

_LLAMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    LinearGroup("attn_out", ("self_attn.o_proj",)),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    LinearGroup("mlp_out", ("mlp.down_proj",), source="mlp.up_proj"),
)
# transformers' attention modules end in `return o_proj(x), weights`, their MLPs in `return down_proj(x)`.
_ATTENTION_AND_MLP = (Shortcut("self_attn", "self_attn.o_proj", returns_tuple=True),
                      Shortcut("mlp", "mlp.down_proj"))


@ADAPTERS.register("llama")
class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/Qwen3 and SmolLM: pre-norm blocks with q/k/v, o, gate/up, down."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    groups = _LLAMA_GROUPS
    shortcuts = _ATTENTION_AND_MLP


@ADAPTERS.register("moe")
class MixtureOfExpertsAdapter(LlamaAdapter):
    """Qwen3-MoE and Mixtral: Llama-style attention, then a router and a list of expert MLPs.

    Each expert is two groups, gate/up (reading the tokens routed to it) and down; the router
    (`mlp.gate`) stays in float. The post-attention norm feeds the router and every expert, so
    no scale is folded into it per expert (expert gate/up groups have no norm to scale); down's
    scale folds into its own expert's up. Dense layers of a partly sparse model keep the Llama
    groups. Structured pruning of experts is not supported.
    """

    model_types = ("qwen3_moe", "mixtral")
    experts_path = "mlp.experts"

    def prepare(self, model: nn.Module) -> nn.Module:
        from compressor.models.experts import unfuse

        for block in self.blocks(model):
            unfuse(block, self.experts_path)
        return model

    def experts(self, block: nn.Module) -> int:
        try:
            return len(block.get_submodule(self.experts_path))
        except (AttributeError, TypeError):
            return 0

    def has_experts(self, model: nn.Module) -> bool:
        return any(self.experts(block) for block in self.blocks(model))

    def block_groups(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        count = self.experts(block)
        if not count:
            return self.groups
        groups = list(self.groups[:2])
        for e in range(count):
            prefix = f"{self.experts_path}.{e}"
            groups.append(LinearGroup(f"expert{e}_in", (f"{prefix}.gate_proj", f"{prefix}.up_proj")))
            groups.append(LinearGroup(f"expert{e}_out", (f"{prefix}.down_proj",), source=f"{prefix}.up_proj"))
        return tuple(groups)


@ADAPTERS.register("gemma3")
class Gemma3Adapter(Adapter):
    """Gemma 3 text models: pre- and post-norms around attention and MLP, (1 + w) RMSNorm."""

    model_types = ("gemma3_text", "gemma3")
    groups = (
        LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        LinearGroup("attn_out", ("self_attn.o_proj",)),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
        LinearGroup("mlp_out", ("mlp.down_proj",), source="mlp.up_proj"),
    )
    shortcuts = _ATTENTION_AND_MLP
    norm_weight_offset = 1.0
    embedding_scaled_by_hidden = True
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def decoder(self, model: nn.Module) -> nn.Module:
        # Gemma3ForConditionalGeneration nests the text decoder one level deeper.
        inner = model.model
        return getattr(inner, "language_model", inner)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")


def supported_model_types() -> list[str]:
    return sorted(t for _, cls in ADAPTERS.items() for t in cls.model_types)


def adapter_for_config(config) -> Adapter:
    """The adapter for a transformers config, or a clear error listing what is supported."""
    # Sliced artifacts (compressor.models.sliced) are their base architecture, resized.
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None)
    for _, cls in ADAPTERS.items():
        if model_type in cls.model_types:
            return cls()
    if text_config is not None and getattr(text_config, "model_type", None):
        for _, cls in ADAPTERS.items():
            if text_config.model_type in cls.model_types:
                return cls()
    raise CompressorError(
        f"unsupported architecture {model_type!r}",
        f"supported model types: {', '.join(supported_model_types())}",
    )


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_config(model.config)


def count_parameters(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
