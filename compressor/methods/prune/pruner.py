"""What the structured pruners share: they produce a structure from calibration data, rebuild a
finished block's shapes from its metadata on resume, and do not prune mixture-of-experts blocks."""

from __future__ import annotations

from typing import Any

from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import Method
from compressor.models.adapters import Adapter
from compressor.models.sliced import resize_block


class Pruner(Method):
    produces = "structure"
    needs_calibration = True

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        if adapter.has_experts(model):
            raise CompressorError(f"{self.name} does not prune mixture-of-experts blocks ({model.config.model_type})",
                                  "quantize this model instead (every expert is quantized on its own tokens)")

    def restore_block(self, block: nn.Module, meta: dict[str, Any], adapter: Adapter, model: nn.Module) -> None:
        resize_block(block, meta, model, adapter)
