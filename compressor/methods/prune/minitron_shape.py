"""Target architectures for Minitron: the shape of a pruned model (hidden size, MLP width, heads,
key/value heads, layers), its exact parameter count, and the shapes that reach a parameter
budget by width, depth or both.

Counts come from the architecture itself: the ordinary config of a shape is built on the meta
device (no memory) with one and with two layers, so any family the adapters know is counted
exactly, tied embeddings, norms and biases included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from compressor.models.adapters import count_parameters
from compressor.models.sliced import ordinary_config_dict

@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int

    def describe(self) -> dict:
        return asdict(self)


def shape_of(config) -> Shape:
    return Shape(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                 config.num_key_value_heads, config.num_hidden_layers)


class ParameterCounter:
    """Exact parameter count of any shape of one model's architecture."""

    def __init__(self, text_config, tied: bool):
        self.config, self.tied = text_config, tied
        self._cache: dict[tuple, tuple[int, int]] = {}

    def __call__(self, shape: Shape) -> int:
        base, per_layer = self._linear_in_layers(shape)
        return base + per_layer * shape.layers

    def _linear_in_layers(self, shape: Shape) -> tuple[int, int]:
        key = (shape.hidden, shape.ffn, shape.heads, shape.kv_heads)
        if key not in self._cache:
            one, two = (self._count(shape, layers) for layers in (1, 2))
            self._cache[key] = (2 * one - two, two - one)
        return self._cache[key]

    def _count(self, shape: Shape, layers: int) -> int:
        from transformers import AutoConfig, AutoModelForCausalLM

        data = ordinary_config_dict(self.config, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                                    tie_word_embeddings=self.tied, heads=shape.heads, kv_heads=shape.kv_heads)
        data["num_hidden_layers"] = layers
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = data["layer_types"][:layers]
        model_type = data.pop("model_type")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **data))
        return count_parameters(model)


def largest_fitting(values: list[int], fits) -> int | None:
    """The largest of ascending `values` for which `fits` holds (it holds for a prefix), or None."""
    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(values[mid]):
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return best


def multiples(limit: int, step: int) -> list[int]:
    """Widths a dimension may take: multiples of `step` up to `limit`, and `limit` itself."""
    return sorted({*range(step, limit + 1, step), limit})


def depth_shape(start: Shape, target: int, count: ParameterCounter) -> Shape | None:
    """`start` with the most layers that fit the budget."""
    layers = largest_fitting(list(range(1, start.layers + 1)), lambda n: count(replace(start, layers=n)) <= target)
    return None if layers is None else replace(start, layers=layers)


def hidden_step(round_to: int, heads: int) -> int:
    """Hidden sizes go in steps of this: configs want hidden_size a multiple of the head count."""
    return math.lcm(round_to, heads)


def width_shapes(start: Shape, target: int, count: ParameterCounter, free: set[str], round_to: int,
                 limit: int) -> list[Shape]:
    """Up to `limit` shapes within the budget that change only the free widths (hidden, ffn),
    each as large as the budget allows, spread from the widest hidden size down."""
    if "hidden" not in free:
        ffn = largest_fitting(multiples(start.ffn, round_to), lambda f: count(replace(start, ffn=f)) <= target)
        return [] if ffn is None else [replace(start, ffn=ffn)]
    shapes = []
    for hidden in reversed(multiples(start.hidden, hidden_step(round_to, start.heads))):
        candidate = replace(start, hidden=hidden)
        if "ffn" in free:
            ffn = largest_fitting(multiples(start.ffn, round_to), lambda f: count(replace(candidate, ffn=f)) <= target)
            if ffn is None:
                continue
            candidate = replace(candidate, ffn=ffn)
        if count(candidate) <= target:
            shapes.append(candidate)
            if "ffn" not in free or candidate.ffn == start.ffn:
                break  # narrower hidden sizes would only leave budget unused
    if len(shapes) <= limit:
        return shapes
    picks = sorted({round(i * (len(shapes) - 1) / (limit - 1)) for i in range(limit)}) if limit > 1 else [0]
    return [shapes[i] for i in picks]
