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
                      run: RunDirectory, original_config, params_before: int, early: "EarlyExport | None" = None,
                      ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(config.json contents, tensors, metrics) of the artifact; `early` holds blocks already
    encoded while the engine ran."""
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
    export = quantizer.export() if quantizer is not None else None
    writer = quantized.writer_for(export) if quantizer is not None else None
    quantized_params = quantized_bytes = 0
    early = early if early is not None and early.export == export else None
    # Records are saved under the block's original index (a depth pruner may have dropped blocks).
    for position, index in enumerate(kept if pruner is None or writer is not None else []):
        if pruner is None and early is not None and index in early.blocks:  # encoded while the engine ran
            stored, counts = early.blocks[index]
            tensors.update(stored)
            quantized_params, quantized_bytes = quantized_params + counts[0], quantized_bytes + counts[1]
            continue
        params, records, _ = run.load_block(index)
        if pruner is None:
            stored, counts = _encode_block(loaded, writer, position, params, records)
            tensors.update(_spill(stored, run, index))
        else:
            counts = _encode_records(loaded, writer, position, records, tensors, tensors)
        quantized_params, quantized_bytes = quantized_params + counts[0], quantized_bytes + counts[1]
        del params, records
        release_memory()
    if writer is not None:
        qconfig = writer.quantization_config([adapter.head_name])
        if qconfig is not None:  # None: every linear kept in 16 bits (a mixed plan's loosest budget)
            config["quantization_config"] = qconfig
        metrics.update({"quantized_params": quantized_params,
                        "bits_per_weight": round(8 * quantized_bytes / max(quantized_params, 1), 4)})
    return config, dict(sorted(tensors.items())), metrics


def _encode_records(loaded: LoadedModel, writer, position: int, records: dict, block: dict,
                    source: dict) -> tuple[int, int]:
    """Put the encoded records of block `position` into `block`, dropping their float weights from
    `source`; returns (quantized parameters, their stored bytes)."""
    prefix = loaded.adapter.block_prefix(loaded.model, position)
    params = stored_bytes = 0
    for name, record in (records.items() if writer is not None else ()):
        module = prefix + name
        original = source.pop(module + ".weight", None)  # lazy runs drop it
        encoded = writer.encode(module, record)
        block.update(encoded)
        params += (original if original is not None else loaded.model.get_submodule(module).weight).numel()
        stored_bytes += sum(t.numel() * t.element_size() for k, t in encoded.items() if not k.endswith("weight_shape"))
    return params, stored_bytes


def _encode_block(loaded: LoadedModel, writer, position: int, params: dict, records: dict,
                  ) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """A block's artifact tensors without a pruner: its checkpointed parameters in the stored dtype
    and its encoded records."""
    prefix = loaded.adapter.block_prefix(loaded.model, position)
    block = {prefix + k: _stored(v, loaded.stored_dtype) for k, v in params.items()}
    return block, _encode_records(loaded, writer, position, records, block, block)


class EarlyExport:
    """Blocks encoded and spilled while the engine runs (the engine calls `block` beside the
    writing of each block's checkpoint), so the export after the last block only
    collects them. Only blocks encoded by this process are used: a resumed run re-encodes the
    earlier ones from their checked checkpoints, and the quantizer's export settings must be the
    same at the end as when the blocks were encoded."""

    def __init__(self, loaded: LoadedModel, methods: list[Method], run: RunDirectory):
        quantizer = next((m for m in methods if m.produces == "weights"), None)
        self.loaded, self.run = loaded, run
        self.export = quantizer.export() if quantizer is not None else None
        self.writer = quantized.writer_for(self.export) if quantizer is not None else None
        self.blocks: dict[int, tuple[dict[str, StoredTensor], tuple[int, int]]] = {}

    @staticmethod
    def applies(loaded: LoadedModel, methods: list[Method]) -> bool:
        """Without a pruner, on a lazily loaded model (block position = block index)."""
        return loaded.lazy is not None and not any(m.produces == "structure" for m in methods)

    def block(self, index: int, params: dict[str, torch.Tensor], records: dict[str, dict[str, torch.Tensor]]) -> None:
        params = {k: v.detach().cpu() for k, v in params.items()}
        records = {name: {k: v.cpu() for k, v in record.items()} for name, record in records.items()}
        stored, counts = _encode_block(self.loaded, self.writer, index, params, records)
        self.blocks[index] = (_spill(stored, self.run, index), counts)


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _outside_blocks(model, adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors outside its decoder blocks (embedding, final norm, untied head)."""
    prefixes = tuple(adapter.block_prefix(model, i) for i in range(len(adapter.blocks(model))))
    tied = set(adapter.tied_weight_names(model))
    return {k: _stored(v, dtype) for k, v in model.state_dict().items() if not k.startswith(prefixes) and k not in tied}


def _spill(tensors: dict[str, torch.Tensor], run: RunDirectory, index: int) -> dict[str, StoredTensor]:
    """Write one block's artifact tensors beside its checkpoint (complete before it gets its name);
    the artifact copies them from there."""
    path = run.path / f"export-{index:04d}.safetensors"
    part = path.with_name(path.name + ".part")
    write_tensors(part, tensors)
    part.replace(path)
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
