"""Calibration statistics of linear-layer inputs, collected by forward hooks.

Linears that share an input (q/k/v, gate/up) share one collector, so a Hessian is computed
once per input, not once per consumer. Sums accumulate in float64: then the total does not
depend on how the samples were split into batches or across processes (data-parallel runs
give the same statistics, hence the same artifact, as one process).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class Collector:
    kind = ""

    def __init__(self, features: int, dtype: torch.dtype = torch.float32):
        self.features = features
        self.dtype = dtype
        self.count = 0

    def update(self, x: torch.Tensor) -> None:  # x: [tokens, features]
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError

    # (attribute, shape, reduction, dtype) of the accumulated state, for merging across processes
    def _state(self) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
        raise NotImplementedError

    def merge(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor], device: str) -> None:
        """Combine this collector with its counterparts in the other processes."""
        for attr, shape, op, dtype in self._state():
            value = getattr(self, attr)
            if value is None:  # this process saw no samples
                value = torch.zeros(shape, dtype=dtype, device=device)
            setattr(self, attr, all_reduce(value.to(device), op))
        self.count = int(all_reduce(torch.tensor([self.count], dtype=torch.float64, device=device), "sum").item())


class _MeanOf(Collector):
    """A mean over tokens of a per-batch sum, accumulated in float64."""

    square = False  # the state is [features, features] rather than [features]

    def __init__(self, features: int, dtype: torch.dtype = torch.float32):
        super().__init__(features, dtype)
        self.sum: torch.Tensor | None = None

    def _add(self, batch_sum: torch.Tensor, tokens: int) -> None:
        batch_sum = batch_sum.double()
        self.sum = batch_sum if self.sum is None else self.sum.add_(batch_sum)
        self.count += tokens

    def result(self) -> torch.Tensor:
        if self.sum is None:  # no token reached it (an expert the router never chose)
            shape = (self.features, self.features) if self.square else (self.features,)
            return torch.zeros(shape, dtype=self.dtype)
        return (self.sum / max(self.count, 1)).to(self.dtype)

    def _state(self) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
        shape = (self.features, self.features) if self.square else (self.features,)
        return [("sum", shape, "sum", torch.float64)]


class HessianCollector(_MeanOf):
    """Mean of x xᵀ over tokens (XᵀX / n): the GPTQ Hessian up to a constant factor."""

    kind = "hessian"
    square = True

    def update(self, x: torch.Tensor) -> None:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.dtype == torch.float32:
            # Products of 16-bit inputs are exact in float32: the tensor cores give XᵀX with float32
            # accumulation, 10× faster than upcasting first (differs only in summation order).
            try:
                self._add(torch.mm(x.T, x, out_dtype=torch.float32), x.shape[0])
                return
            except (RuntimeError, TypeError):  # a torch without mm's out_dtype on this device
                pass
        x = x.to(self.dtype)
        self._add(x.T @ x, x.shape[0])


class CrossCollector(_MeanOf):
    """Mean of x yᵀ over tokens for paired inputs: x on the quantized path, y where the float model
    has it at the same place (GPTQ with a float target: fit the float model's outputs)."""

    kind = "cross"
    square = True

    def update_pair(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).to(self.dtype), y.reshape(-1, y.shape[-1]).to(self.dtype)
        self._add(x.T @ y, x.shape[0])


class AbsMaxCollector(Collector):
    """Per-channel maximum of |x| over tokens."""

    kind = "absmax"

    def __init__(self, features: int, dtype: torch.dtype = torch.float32):
        super().__init__(features, dtype)
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0).to(self.dtype)
        self.value = m if self.value is None else torch.maximum(self.value, m)
        self.count += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.value is None:
            return torch.zeros(self.features, dtype=self.dtype)
        return self.value.to(self.dtype)

    def _state(self) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
        return [("value", (self.features,), "max", self.dtype)]


class AbsMeanCollector(_MeanOf):
    """Per-channel mean of |x| over tokens (AWQ's activation salience)."""

    kind = "absmean"

    def update(self, x: torch.Tensor) -> None:
        self._add(x.abs().sum(dim=0, dtype=torch.float64), x.shape[0])


class MeanCollector(_MeanOf):
    """Per-channel mean of x over tokens."""

    kind = "mean"

    def update(self, x: torch.Tensor) -> None:
        self._add(x.sum(dim=0, dtype=torch.float64), x.shape[0])


COLLECTORS: dict[str, type[Collector]] = {
    c.kind: c for c in (HessianCollector, AbsMaxCollector, AbsMeanCollector, MeanCollector)}


class InputsCollected(Exception):
    """Raised after the last hooked group has seen its input, when asked to stop early."""


@contextmanager
def collect_inputs(
    groups: dict[str, list[nn.Linear]], kinds: set[str], hessian_dtype: torch.dtype = torch.float32,
    stop_after_last: bool = False,
) -> Iterator[dict[str, dict[str, Collector]]]:
    """Hook the first linear of each input-sharing group; yields {group: {kind: collector}}.

    The collectors fill while the caller runs forward passes inside the `with` block. With
    `stop_after_last`, the hook of the last group (in execution order) raises InputsCollected,
    so a forward pass that only gathers statistics skips the rest of the computation.
    """
    unknown = set(kinds) - set(COLLECTORS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    collectors: dict[str, dict[str, Collector]] = {}
    handles = []
    for name, linears in groups.items():
        first = linears[0]
        per_group = {
            kind: COLLECTORS[kind](first.in_features, hessian_dtype if kind == "hessian" else torch.float32)
            for kind in kinds
        }
        collectors[name] = per_group

        def hook(_module, inputs, per_group=per_group, last=name == list(groups)[-1]):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            for c in per_group.values():
                c.update(x)
            if last and stop_after_last:
                raise InputsCollected

        handles.append(first.register_forward_pre_hook(hook))
    try:
        yield collectors
    finally:
        for h in handles:
            h.remove()
