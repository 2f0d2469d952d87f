"""The method interface. A method declares the statistics it needs; the pipeline collects
them with hooks and hands the method one input-sharing group of linears at a time.
Methods never walk the model themselves."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compressor.models.adapters import Adapter, LinearGroup
from compressor.registry import Registry

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

    def export(self) -> dict:
        """How a format should store the records: {'kind': ..., plus kind-specific settings}."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}


METHODS: Registry[type[Method]] = Registry("method")
