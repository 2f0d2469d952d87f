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
from compressor.safetensors_file import StoredTensor, stored_tensors, write_tensors
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
        tensors = _outside_blocks(model, adapter, loaded.stored_dtype)
    writer = quantized.writer_for(quantizer.export()) if quantizer is not None else None
    quantized_params = quantized_bytes = 0
    # Records are saved under the block's original index (a depth pruner may have dropped blocks).
    for position, index in enumerate(kept if pruner is None or writer is not None else []):
        prefix = adapter.block_prefix(model, position)
        params, records, _ = run.load_block(index)
        # Without a pruner the block's tensors come from its checkpoint (the model may hold only
        # meta tensors: models.lazy), one block in memory at a time, left on disk until written.
        block = {} if pruner is not None else {prefix + k: _stored(v, loaded.stored_dtype) for k, v in params.items()}
        for name, record in (records.items() if writer is not None else ()):
            module = prefix + name
            original = (tensors if pruner is not None else block).pop(module + ".weight", None)  # lazy runs drop it
            encoded = writer.encode(module, record)
            block.update(encoded)
            quantized_params += (original if original is not None else model.get_submodule(module).weight).numel()
            quantized_bytes += sum(t.numel() * t.element_size() for k, t in encoded.items()
                                   if not k.endswith("weight_shape"))
        tensors.update(_spill(block, run, index) if pruner is None else block)
        del params, records, block
        release_memory()
    if writer is not None:
        qconfig = writer.quantization_config([adapter.head_name])
        if qconfig is not None:  # None: every linear kept in 16 bits (a mixed plan's loosest budget)
            config["quantization_config"] = qconfig
        metrics.update({"quantized_params": quantized_params,
                        "bits_per_weight": round(8 * quantized_bytes / max(quantized_params, 1), 4)})
    return config, dict(sorted(tensors.items())), metrics


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _outside_blocks(model, adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors outside its decoder blocks (embedding, final norm, untied head)."""
    prefixes = tuple(adapter.block_prefix(model, i) for i in range(len(adapter.blocks(model))))
    tied = set(adapter.tied_weight_names(model))
    return {k: _stored(v, dtype) for k, v in model.state_dict().items() if not k.startswith(prefixes) and k not in tied}


def _spill(tensors: dict[str, torch.Tensor], run: RunDirectory, index: int) -> dict[str, StoredTensor]:
    """Write one block's artifact tensors beside its checkpoint; the artifact copies them from there."""
    path = run.path / f"export-{index:04d}.safetensors"
    write_tensors(path, tensors)
    return stored_tensors(path)


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
