"""What an engine run becomes on disk: the config and tensors of the artifact, from the model the
methods left behind, the records the quantizer checkpointed per block, and the structure a
pruner reports. A pruned model is the original architecture with smaller widths where the
shapes allow (formats.sliced), and quantized linears are stored in the format their quantizer
names (formats.quantized); a list with both gives a pruned, quantized artifact."""

from __future__ import annotations

from typing import Any

import torch

from compressor.formats import quantized
from compressor.formats import sliced as sliced_format
from compressor.methods.base import Method
from compressor.models.adapters import count_parameters
from compressor.models.loading import LoadedModel
from compressor.pipeline.checkpoint import RunDirectory
from compressor.util import release_memory


def artifact_contents(loaded: LoadedModel, methods: list[Method], block_meta: list[dict[str, Any]],
                      run: RunDirectory, original_config, params_before: int,
                      ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(config.json contents, tensors, metrics) of the artifact."""
    model, adapter = loaded.model, loaded.adapter
    pruner = next((m for m in methods if m.produces == "structure"), None)
    quantizer = next((m for m in methods if m.produces == "weights"), None)
    params = count_parameters(model)
    metrics: dict[str, Any] = {"params": params}
    fallbacks = {k: v for meta in block_meta for k, v in meta.get("fallbacks", {}).items()}
    if fallbacks:
        metrics["fallbacks"] = fallbacks
    kept = [index for index, meta in enumerate(block_meta) if not meta.get("dropped")]
    if pruner is not None:
        spec = pruner.structure(_structure_meta(block_meta), model, adapter)
        config, tensors = sliced_format.export(model, adapter, spec, original_config, loaded.stored_dtype,
                                               dropped=sorted(set(range(len(block_meta))) - set(kept)))
        metrics.update({"params_before": params_before, "param_reduction": 1 - params / params_before,
                        "ordinary_config": config.get("model_type") == original_config.model_type})
    else:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(loaded.stored_dtype).removeprefix("torch.")
        state = model.state_dict()
        for name in adapter.tied_weight_names(model):
            state.pop(name, None)
        tensors = {k: v.to(loaded.stored_dtype) if v.is_floating_point() else v for k, v in state.items()}
    if quantizer is not None:
        writer = quantized.writer_for(quantizer.export())
        quantized_params = quantized_bytes = 0
        for position, index in enumerate(kept):  # records are saved under the block's original index
            prefix = adapter.block_prefix(model, position)
            _, records, _ = run.load_block(index)
            for name, record in records.items():
                module = prefix + name
                original = tensors.pop(module + ".weight")
                encoded = writer.encode(module, record)
                tensors.update(encoded)
                quantized_params += original.numel()
                quantized_bytes += sum(t.numel() * t.element_size() for k, t in encoded.items()
                                       if not k.endswith("weight_shape"))
            release_memory()
        qconfig = writer.quantization_config([adapter.head_name])
        if qconfig is not None:  # None: every linear kept in 16 bits (a mixed plan's loosest budget)
            config["quantization_config"] = qconfig
        metrics.update({"quantized_params": quantized_params,
                        "bits_per_weight": round(8 * quantized_bytes / max(quantized_params, 1), 4)})
    return config, dict(sorted(tensors.items())), metrics


def check_formats(methods: list[Method]) -> None:
    """Before any work: the quantizer's format is known and its library is installed."""
    from compressor.formats import ct_config

    quantizer = next((m for m in methods if m.produces == "weights"), None)
    if quantizer is not None:
        quantized.writer_for(quantizer.export())
        ct_config.library()


def artifact_kind(methods: list[Method]) -> str:
    return "quantized" if any(m.produces == "weights" for m in methods) else "pruned"


def structure(methods: list[Method], block_meta: list[dict[str, Any]], loaded: LoadedModel) -> dict | None:
    pruner = next((m for m in methods if m.produces == "structure"), None)
    return pruner.structure(_structure_meta(block_meta), loaded.model, loaded.adapter) if pruner else None


def _structure_meta(block_meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each kept block's widths as its pruner recorded them (without the quantizer's fallback
    notes); dropped blocks are no longer part of the model."""
    return [{k: v for k, v in meta.items() if k != "fallbacks"} for meta in block_meta if not meta.get("dropped")]
