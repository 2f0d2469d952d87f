"""Simulated input-activation quantization of an artifact, for evaluating it in plain torch.

When an artifact's quantization_config quantizes the inputs of its linears, our loader attaches
a forward pre-hook to each targeted linear that quantizes and dequantizes the input with
compressed-tensors' own functions, as transformers does for the same config (where the library is
not installed, with our torch version of the same rule, which gives the same bytes):

- dynamic per-token (strategy "token"): the range is reduced over every dimension after the first
  two (for a 2-D input, compressed-tensors reduces over the whole tensor, and so do we); min is
  clamped to ≤ 0, max to ≥ 0; scale = max(|min|, |max|) / ((qmax − qmin) / 2) in the input's dtype
  (int8: /127.5, E4M3: /448), and a zero scale becomes the dtype's eps;
- static per-tensor (strategy "tensor"): the stored `input_scale`;
- then q = clamp(x / scale, qmin, qmax), rounded half-to-even (int) or cast to float8_e4m3fn
  (float), and x̂ = q · scale in the scale's dtype.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn

from compressor.errors import CompressorError

RANGES = {("int", 8): (-128.0, 127.0), ("float", 8): (-448.0, 448.0)}


def input_args(qconfig: dict | None) -> dict | None:
    """The input-activation settings of an artifact's config, or None for weight-only artifacts."""
    if not qconfig:
        return None
    groups = list((qconfig.get("config_groups") or {}).values())
    inputs = [g.get("input_activations") for g in groups]
    if not any(inputs):
        return None
    if len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
        raise CompressorError("activation quantization is simulated for one config group targeting Linear",
                              "evaluate this artifact with transformers or vLLM instead")
    args = inputs[0]
    key = (args.get("type"), args.get("num_bits"))
    strategy = args.get("strategy")
    if key not in RANGES or not args.get("symmetric") or strategy not in ("token", "tensor") \
            or bool(args.get("dynamic")) != (strategy == "token"):
        raise CompressorError(
            f"unsupported input activation quantization {key[0]}{key[1]} {strategy} "
            f"(dynamic={args.get('dynamic')}, symmetric={args.get('symmetric')})",
            "supported: symmetric int8/fp8 inputs, dynamic per token or static per tensor")
    return args


@functools.cache
def _library():
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize as library_fake_quantize
        from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    except ImportError:
        return None

    @functools.cache
    def args(kind: str, bits: int, dynamic: bool):
        return QuantizationArgs(num_bits=bits, type=kind, symmetric=True, dynamic=dynamic,
                                strategy="token" if dynamic else "tensor")

    def quantize(x, kind, bits, scale):
        a = args(kind, bits, scale is None)
        if scale is None:
            scale, _ = compute_dynamic_scales_and_zp(x, a, module=nn.Identity())
        # Symmetric: no zero point. Adding the library's zero one would turn -0.0 into +0.0.
        return library_fake_quantize(x, scale, None, a)

    return quantize


@torch.no_grad()
def fake_quantize(x: torch.Tensor, kind: str, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize x; per-token dynamic scales when `scale` is None (compressed-tensors'
    own functions where it is installed, else `fake_quantize_torch`, which gives the same bytes)."""
    library = _library()
    if library is None:
        return fake_quantize_torch(x, kind, bits, scale)
    return library(x, kind, bits, scale)


@torch.no_grad()
def fake_quantize_torch(x: torch.Tensor, kind: str, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Our reader's activation quantization where compressed-tensors is not installed
    (evaluation hosts may lack it); tested equal to the library's, byte for byte."""
    qmin, qmax = RANGES[(kind, bits)]
    if scale is None:
        if x.dim() > 2:
            lo, hi = torch.aminmax(x.flatten(2), dim=-1, keepdim=True)
            lo, hi = lo.reshape(*x.shape[:2], *[1] * (x.dim() - 2)), hi.reshape(*x.shape[:2], *[1] * (x.dim() - 2))
        else:
            lo, hi = torch.aminmax(x)
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
        scale = torch.maximum(lo.abs(), hi.abs()) / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype,
                                                     device=scale.device), scale)
    q = torch.div(x, scale).clamp_(qmin, qmax)
    q = q.round_() if kind == "int" else q.to(torch.float8_e4m3fn).to(q.dtype)
    return q.to(scale.dtype).mul_(scale)


def _ignored(name: str, ignore: list[str]) -> bool:
    return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def pop_input_scales(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the static activation scales from a decoded state dict: {module: input_scale}."""
    keys = [k for k in state if k.endswith((".input_scale", ".input_zero_point"))]
    popped = {k: state.pop(k) for k in keys}
    return {k.rsplit(".", 1)[0]: v for k, v in popped.items() if k.endswith(".input_scale")}


def attach(model: nn.Module, qconfig: dict | None, scales: dict[str, torch.Tensor]) -> int:
    """Hook input quantization onto every targeted linear; returns how many were hooked."""
    args = input_args(qconfig)
    if args is None:
        return 0
    ignore = list(qconfig.get("ignore") or [])
    kind, bits, static = args["type"], int(args["num_bits"]), not args.get("dynamic")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _ignored(name, ignore):
            continue
        if static:
            if name not in scales:
                raise CompressorError(f"{name} has no input_scale but the config quantizes its inputs statically",
                                      "the artifact is damaged or its config.json was edited; rebuild it")
            module.register_buffer("input_scale", scales[name].reshape(1), persistent=False)

        def hook(mod, inputs, kind=kind, bits=bits, static=static):
            scale = mod.input_scale.to(inputs[0].device) if static else None
            return (fake_quantize(inputs[0], kind, bits, scale),) + tuple(inputs[1:])

        module.register_forward_pre_hook(hook)
        count += 1
    unused = set(scales) - {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if unused:
        raise CompressorError(f"input_scale for unknown module {sorted(unused)[0]}",
                              "the artifact is damaged; rebuild it")
    return count
