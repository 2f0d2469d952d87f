"""A compressed-tensors checkpoint written by compressed-tensors itself (as llm-compressor saves
its output), not by compressor: for testing that we evaluate other tools' artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric min-max quantize-dequantize, as the scales written below define it."""
    cols = group_size or w.shape[1]
    g = w.reshape(w.shape[0], -1, cols)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.maximum(g.amin(-1).abs(), g.amax(-1).abs()) / ((2 * qmax + 1) / 2)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -qmax - 1, qmax)
    return (q * scale.unsqueeze(-1)).reshape(w.shape)


def write_foreign(base: Path, out: Path, groups: dict[str, tuple[str, int, int | None]],
                  fmt: str = "pack-quantized") -> Path:
    """Quantize `base` with compressed-tensors' own scheme machinery and compressor, and save
    it as llm-compressor does. `groups`: name -> (target regex, bits, group size or None)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config_groups = {
        name: QuantizationScheme(targets=[target], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group" if gs else "channel", group_size=gs))
        for name, (target, bits, gs) in groups.items()}
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups, ignore=["lm_head"],
                                                        format=fmt))
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not isinstance(module, torch.nn.Linear):
            continue
        args = scheme.weights
        w = module.weight.data
        g = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in Path(base).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out
