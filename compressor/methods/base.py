"""The method interface. A method declares the statistics it needs; the pipeline collects
them with hooks and hands the method one input-sharing group of linears at a time.
Methods never walk the model themselves."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compressor.models.adapters import Adapter, LinearGroup
from compressor.registry import Registry


class Replay(Protocol):
    def error(self) -> float:
        """Mean squared change of the recorded outputs when replayed with the module as it is now."""


class Replays(Protocol):
    """What the pipeline hands `transform_block`: recorded calls of the block and its submodules on a
    calibration subset, and statistics of each group's input there ({group: {kind: tensor}})."""

    block: Replay
    stats: dict[str, dict[str, torch.Tensor]]

    def for_group(self, group: LinearGroup) -> Replay:
        """The smallest recorded module whose output the group's linears reach."""

# What a method returns for one linear: named tensors that a format knows how to store.
Record = dict[str, torch.Tensor]


class MethodConfig(BaseModel):
    """Base of every method's settings; unknown keys are errors, so recipe typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    # Statistics of linear inputs the method needs, by collector kind ("hessian", "absmax", "mean").
    needs: ClassVar[frozenset[str]] = frozenset()
    # Re-collect statistics for each group after earlier groups in the block are modified.
    true_sequential: ClassVar[bool] = False
    # Modifies modules other than the group's linears (e.g. folds scales into a preceding norm
    # or linear); the pipeline then recomputes every pass instead of reusing cached outputs.
    edits_outside_group: ClassVar[bool] = False

    # Statistics of each group's input on the search subset, for `transform_block` (kinds as in `needs`).
    search_needs: ClassVar[frozenset[str]] = frozenset()
    # Calls `transform_block` on each block before its groups are applied (scale search, smoothing).
    transforms_block: ClassVar[bool] = False
    # Calibration samples the block transform replays.
    search_samples: int = 16

    # Also wants, per group, the cross statistic of its input with the float model's input there
    # (stats["cross"]); the pipeline then propagates the float model's hidden states too.
    needs_fp_inputs: bool = False

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs) or self.transforms_block

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def from_options(cls, **options: Any) -> "Method":
        return cls(cls.Config(**options))

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        """Validate the model against the settings before any work starts."""

    def apply_group(
        self, block: nn.Module, group: LinearGroup, linears: dict[str, nn.Linear],
        stats: dict[str, torch.Tensor],
    ) -> dict[str, Record]:
        """Modify the group's linears in place; return a record per linear name."""
        raise NotImplementedError

    def transform_block(self, block: nn.Module, adapter: Adapter, linears: dict[str, nn.Linear],
                        replays: Replays) -> None:
        """Edit the block in place before quantization, judging candidates by replaying it."""
        raise NotImplementedError

    def export(self) -> dict:
        """How a format should store the records: {'kind': ..., plus kind-specific settings}."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}


METHODS: Registry[type[Method]] = Registry("method")
