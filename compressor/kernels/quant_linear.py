"""QuantLinear: a linear layer whose weights stay quantized in device memory.

Backends, chosen once when the layer is built (`build`):
- "triton": our kernels (for integer weight-only: the CUDA decode GEMV wq_gemv up to GEMV_MAX_M
  activation rows when CuPy is there, the Triton GEMM wq_triton above; w8_triton for W8A8 int8
  and FP8, with torch._scaled_mm for FP8 at prefill sizes), on CUDA with Triton and bf16/fp16 inputs;
- "torch": the reference, dequantize-then-matmul in plain torch, on any device. Layers the
  kernels do not cover fall back to it, and `build` says why, naming the layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from compressor.schemes import dequantize

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
COUNTERS = 4096  # split-K tile counters per layer (kernels use at most ~4 per multiprocessor)
GEMV_MAX_M = 8  # the decode GEMV runs up to this many rows: its crossover with wq_triton on the H200


@dataclass
class WeightOnly:
    """Integer weight-only quantization: w = (code − zero) · scale per group."""
    codes: torch.Tensor              # int8 [out, in], signed
    scale: torch.Tensor              # [out, groups]
    zero: torch.Tensor | None        # int8 [out, groups], signed
    g_idx: torch.Tensor | None       # [in] act-order group of each column
    bits: int
    group_size: int                  # <= 0: per channel


@dataclass
class EightBit:
    """8-bit weights per output channel with 8-bit inputs (W8A8 int8 or FP8 E4M3)."""
    codes: torch.Tensor              # int8 or float8_e4m3fn [out, in]
    scale: torch.Tensor              # fp32 [out, 1]
    input_scale: torch.Tensor | None  # fp32 [1]: static per-tensor input scale; None: dynamic per token
    # Quantize-dequantize of the inputs for the reference path (formats.activations semantics).
    fake_quantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

    @property
    def fp8(self) -> bool:
        return self.codes.dtype == torch.float8_e4m3fn


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_possible(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and triton_available() and dtype in KERNEL_DTYPES


class QuantLinear(nn.Module):
    def __init__(self, name: str, in_features: int, out_features: int, bias: torch.Tensor | None, backend: str):
        super().__init__()
        self.name, self.in_features, self.out_features, self.backend = name, in_features, out_features, backend
        self.register_buffer("bias", bias, persistent=False)
        self.kind = ""

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, backend={self.backend}"

    def _set(self, **tensors: torch.Tensor | None) -> None:
        for key, value in tensors.items():
            self.register_buffer(key, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return self._reference(x)
        if self.kind == "weight-only":
            return weight_only_matmul(x, self._layout(), self.bias, self.counters)
        from compressor.kernels import w8_triton

        if self.kind == "fp8" and x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] > 16 and self.scaled_mm_ok:
            return w8_triton.fp8_scaled_mm(x, self.codes, self.scale, self.bias, self.out_features,
                                           self.input_scale)
        return w8_triton.w8_matmul(x, self.codes, self.scale, self.bias, self.counters, self.out_features,
                                   self.input_scale)

    # ------------------------------------------------------------ reference path

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight-only":
            w = dequantize(self.codes, self.scale, self.zero, self.g_idx, x.dtype)
            return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
        w = (self.codes.to(self.scale.dtype) * self.scale).to(x.dtype)
        x = self.fake_quantize(x, self.input_scale)
        return F.linear(x.to(w.dtype), w, self.bias.to(w.dtype) if self.bias is not None else None)

    def _layout(self):
        from compressor.kernels.wq_layout import WqWeights

        return WqWeights(self.bits, self.in_features, self.out_features, self.block_k,
                         [self.plane0] + ([self.plane1] if self.plane1 is not None else []), self.scales, self.zeros,
                         self.perm)


def weight_only_matmul(x: torch.Tensor, w, bias: torch.Tensor | None, counters: torch.Tensor) -> torch.Tensor:
    """y = x · Wᵀ for a WqWeights layout on CUDA: the decode GEMV for few rows, else the GEMM."""
    from compressor.kernels import wq_gemv, wq_triton

    if x.numel() <= GEMV_MAX_M * x.shape[-1] and wq_gemv.available() and wq_gemv.supports(x, w):
        return wq_gemv.gemv(x, w, bias, counters)
    return wq_triton.wq_matmul(x, w, bias, counters)


def build(name: str, spec: WeightOnly | EightBit, bias: torch.Tensor | None, device: torch.device,
          dtype: torch.dtype) -> tuple[QuantLinear, str | None]:
    """A QuantLinear on `device` for inputs of `dtype`, and why it runs the reference path (None
    when it runs the kernels, or when no kernel was possible on this device at all)."""
    out_features, in_features = spec.codes.shape
    reason = None
    backend = "triton" if kernels_possible(device, dtype) else "torch"
    layer = QuantLinear(name, in_features, out_features, bias.to(device) if bias is not None else None, backend)
    if isinstance(spec, WeightOnly):
        layer.kind = "weight-only"
        if backend == "triton":
            reason = _weight_only_kernel(layer, spec, device)
            if reason is None:
                return layer, None
            layer.backend = "torch"
        layer._set(codes=spec.codes.to(device), scale=spec.scale.to(device),
                   zero=spec.zero.to(device) if spec.zero is not None else None,
                   g_idx=spec.g_idx.to(device) if spec.g_idx is not None else None)
        return layer, reason
    layer.kind = "fp8" if spec.fp8 else "w8a8-int8"
    layer.fake_quantize = spec.fake_quantize
    codes, scale = spec.codes.to(device), spec.scale.to(device)
    if backend == "triton":
        n_pad = -(-out_features // 128) * 128
        padded = torch.zeros(n_pad, in_features, dtype=codes.dtype, device=device)
        padded[:out_features] = codes
        flat_scale = torch.zeros(n_pad, dtype=torch.float32, device=device)
        flat_scale[:out_features] = scale.reshape(-1).float()
        codes, scale = padded, flat_scale
        layer.scaled_mm_ok = in_features % 16 == 0 and out_features % 16 == 0
        layer._set(counters=torch.zeros(COUNTERS, dtype=torch.int32, device=device))
    input_scale = spec.input_scale.to(device).float().reshape(1) if spec.input_scale is not None else None
    layer._set(codes=codes, scale=scale, input_scale=input_scale)
    return layer, None


def _weight_only_kernel(layer: QuantLinear, spec: WeightOnly, device: torch.device) -> str | None:
    """Repack into the kernel layout; the reason it cannot, if so."""
    from compressor.kernels import wq_layout

    try:
        w = wq_layout.repack(spec.codes.to(device), spec.scale.to(device),
                             spec.zero.to(device) if spec.zero is not None else None, spec.bits, spec.group_size,
                             spec.g_idx.to(device) if spec.g_idx is not None else None)
    except wq_layout.Unsupported as exc:
        return str(exc)
    layer.bits, layer.block_k = w.bits, w.block_k
    layer._set(plane0=w.planes[0], plane1=w.planes[1] if len(w.planes) > 1 else None, scales=w.scales,
               zeros=w.zeros, perm=w.perm, counters=torch.zeros(COUNTERS, dtype=torch.int32, device=device))
    return None
