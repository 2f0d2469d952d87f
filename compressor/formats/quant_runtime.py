"""Loading a quantized artifact with its linears kept quantized, as QuantLinear modules.

On a CUDA device the layers run our kernels (kernels/quant_linear.py); a layer the kernels do not
cover runs the reference path, and the loader says so once, naming it. Everything else in the
artifact (embeddings, norms, ignored linears such as lm_head) loads as ordinary float tensors.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.formats import activations, compressed_tensors, naive_quantized
from compressor.formats import artifact as artifacts
from compressor.kernels import bitstream
from compressor.kernels.quant_linear import KERNEL_DTYPES, EightBit, QuantLinear, WeightOnly, build, triton_available
from compressor.models.loading import stored_float_dtype


def _damaged(module: str, exc: Exception) -> CompressorError:
    return CompressorError(f"tensors of {module} do not match the artifact's quantization config ({exc})",
                           "the artifact is damaged or its config.json was edited; rebuild it")


def _weight_only_specs(tensors: dict[str, torch.Tensor], qconfig: dict,
                       device: torch.device) -> dict[str, WeightOnly]:
    schemes = compressed_tensors.group_schemes(qconfig)
    specs = {}
    for m in sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")):
        scheme = compressed_tensors.scheme_for(m, schemes)
        try:
            out_features, in_features = (int(v) for v in tensors[f"{m}.weight_shape"].tolist())
            scale = tensors[f"{m}.weight_scale"]
            groups = 1 if scheme.per_channel else in_features // scheme.group_size
            if tuple(scale.shape) != (out_features, groups):
                raise ValueError(f"scale shape {tuple(scale.shape)} != {(out_features, groups)}")
            codes = bitstream.unpack_rows(tensors[f"{m}.weight_packed"].to(device), scheme.bits, in_features)
            zero = None
            if not scheme.symmetric:
                packed = tensors[f"{m}.weight_zero_point"].to(device)
                zero = bitstream.unpack_rows(packed.T.contiguous(), scheme.bits, out_features).T.contiguous()
        except (KeyError, ValueError, RuntimeError) as exc:
            raise _damaged(m, exc) from None
        specs[m] = WeightOnly(codes, scale, zero, tensors.get(f"{m}.weight_g_idx"), scheme.bits, scheme.group_size)
    return specs


def _fake_quantize(kind: str, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return activations.fake_quantize(x, kind, 8, scale)


def _eight_bit_specs(tensors: dict[str, torch.Tensor], qconfig: dict) -> dict[str, EightBit]:
    scheme = naive_quantized.scheme_from_config(qconfig)
    args = activations.input_args(qconfig)
    quantizer = partial(_fake_quantize, args["type"] if args else scheme.type)
    specs = {}
    for m in sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")):
        try:
            codes, scale = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]
            if codes.dtype != naive_quantized.CODE_DTYPES[scheme.type]:
                raise ValueError(f"weight dtype {codes.dtype} is not {naive_quantized.CODE_DTYPES[scheme.type]}")
            if codes.dim() != 2 or tuple(scale.shape) != (codes.shape[0], 1):
                raise ValueError(f"scale shape {tuple(scale.shape)} != {(codes.shape[0], 1)}")
            input_scale = None if scheme.act_dynamic else tensors[f"{m}.input_scale"]
        except (KeyError, ValueError, RuntimeError) as exc:
            raise _damaged(m, exc) from None
        specs[m] = EightBit(codes, scale.float(), input_scale, quantizer)
    return specs


def quantized_linears(tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, device: torch.device,
                      warn: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """Split an artifact's tensors into float tensors and QuantLinear modules (by module name)."""
    fmt = qconfig.get("format")
    if qconfig.get("quant_method") != "compressed-tensors" or fmt not in (
            compressed_tensors.FORMAT, naive_quantized.INT_FORMAT, naive_quantized.FLOAT_FORMAT):
        raise CompressorError(f"unsupported quantization format {qconfig.get('quant_method')}/{fmt}",
                              "this loader handles compressed-tensors pack-quantized, int-quantized, float-quantized")
    if fmt == compressed_tensors.FORMAT:
        specs: dict = _weight_only_specs(tensors, qconfig, device)
        leaves = compressed_tensors.SUFFIXES
    else:
        specs = _eight_bit_specs(tensors, qconfig)
        leaves = ("weight", *naive_quantized.SUFFIXES)
    state = {k: v for k, v in tensors.items()
             if not (k.rsplit(".", 1)[0] in specs and k.rsplit(".", 1)[1] in leaves + ("bias",))}
    if device.type == "cuda" and not triton_available():
        warn("Triton is not installed: quantized layers run the reference path (dequantize, then matmul)")
    layers: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        bias = tensors.get(f"{name}.bias")
        layers[name], reason = build(name, spec, bias.to(dtype) if bias is not None else None, device, dtype)
        if reason:
            warn(f"{name}: no kernel for {reason}; this layer runs the reference path")
        if fmt == compressed_tensors.FORMAT:
            try:
                factors = compressed_tensors.lowrank(tensors, name)
            except ValueError as exc:
                raise _damaged(name, exc) from None
            if factors is not None:
                layers[name] = LowRankCorrected(layers[name], *(f.to(device) for f in factors))
    return state, layers


class LowRankCorrected(nn.Module):
    """A quantized linear plus its low-rank error correction: y = Q x + B (A x)."""

    def __init__(self, inner: nn.Module, b: torch.Tensor, a: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("a", a, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + nn.functional.linear(nn.functional.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))


def runtime_dtype(dtype: torch.dtype, stored: torch.dtype | None) -> torch.dtype:
    """The kernels take 16-bit activations: fp16 when the artifact stores fp16, else bf16."""
    if dtype in KERNEL_DTYPES:
        return dtype
    return torch.float16 if stored == torch.float16 else torch.bfloat16


def build_quantized_model(config, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype,
                          device: torch.device, warn: Callable[[str], None]) -> nn.Module:
    """An HF model from a config (without quantization_config) and an artifact's tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    state, layers = quantized_linears(tensors, qconfig, dtype, device, warn)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise CompressorError(f"quantized module {name} is not a linear layer of this architecture",
                                  "the artifact was written for another architecture")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    if tied:
        model.tie_weights()
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in layers and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CompressorError(
            f"checkpoint tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "the artifact is damaged or was written for another architecture")
    return model.to(device).eval()


def load_quantized(path: Path, dtype: torch.dtype, device: torch.device,
                   warn: Callable[[str], None]) -> tuple[nn.Module, torch.dtype]:
    """The model of an artifact directory with its linears as QuantLinear on `device`, and the
    dtype it computes in."""
    from transformers import AutoConfig

    config_dict = artifacts.read_config(path)
    qconfig = config_dict.pop("quantization_config")
    config_dict = {k: v for k, v in config_dict.items() if k != "transformers_version"}
    config = AutoConfig.for_model(config_dict.pop("model_type", None), **config_dict)
    tensors = artifacts.load_tensors(path)
    dtype = runtime_dtype(dtype, stored_float_dtype(artifacts.weight_files(path)))
    return build_quantized_model(config, tensors, qconfig, dtype, device, warn), dtype


def kernel_summary(model: nn.Module) -> dict:
    """How many quantized linears run each backend, e.g. {"triton": 210, "torch": 2}."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            counts[module.backend] = counts.get(module.backend, 0) + 1
    return counts
