"""The method interface: lifecycle hooks that one sequential engine calls for an ordered list of
methods (AWQ then GPTQ, SmoothQuant then int8, SliceGPT then GPTQ). A method never walks the
model: the engine hands it one block at a time, then each of the block's linear groups in
execution order, and gathers whatever statistics the method asks for through the context.

The order of calls for a list [m1, m2, ...]:

    on_start(model)            every method, once, before block 0: may edit what is outside the
                               blocks (embeddings, head, final norm) and the inputs of block 0
    for each block:
        on_block_start(block)  every method: may edit the whole block (scale folding, slicing)
        for each group:
            on_group(block, group, linears)   every method: edits only the group's linears,
                                              returns a record per linear it quantized
        on_block_end(block)    every method
    (blocks a method dropped with ctx.drop() are deleted from the model here)
    on_end(model)              every method, once: may edit what is outside the blocks

Every hook is optional. What a method keeps from one block to the next (a basis, a plan) lives
in `carry()`/`restore()`, so the engine can checkpoint it with each block and resume a killed
run with identical results; a method that changes a block's module structure rebuilds it in
`restore_block` from the metadata it put in `ctx.meta`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compressor.models.adapters import Adapter, LinearGroup
from compressor.registry import Registry

# What a method returns for one linear: named tensors that a format knows how to store.
Record = dict[str, torch.Tensor]


class Replay(Protocol):
    def error(self) -> float:
        """Mean squared change of the recorded outputs when replayed with the module as it is now."""


class Replays(Protocol):
    """Recorded calls of a block and its submodules on a calibration subset, and statistics of
    each group's input there ({group: {kind: tensor}})."""

    block: Replay
    stats: dict[str, dict[str, torch.Tensor]]

    def for_group(self, group: LinearGroup) -> Replay:
        """The smallest recorded module whose output the group's linears reach."""


class Runner(Protocol):
    """Runs one block over calibration inputs, batch by batch on the compute device."""

    def __call__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                 stop: type[BaseException] | None = None) -> torch.Tensor | None: ...

    def map(self, block: nn.Module, fn, *inputs: torch.Tensor) -> torch.Tensor | None: ...


class BlockContext(Protocol):
    """What the engine hands a method for one decoder block."""

    block: nn.Module
    index: int
    prefix: str  # state-dict prefix, e.g. 'model.layers.3.'
    adapter: Adapter
    groups: tuple[LinearGroup, ...]
    hidden: torch.Tensor | None  # the block's calibration inputs on the CPU (None without calibration)
    kwargs: dict[str, Any] | None  # what the block receives besides hidden states (masks, rotary tables)
    run: Runner
    meta: dict[str, Any]  # JSON-able facts about the finished block, saved with its checkpoint

    def linears(self) -> dict[str, nn.Linear]: ...

    def block_stats(self, kinds: set[str], keep_outputs: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Every group's input statistics, in one pass over the block as it is now; with
        `keep_outputs` the pass runs the whole block and its outputs become the next block's
        inputs unless a group changes afterwards (a method that only measures saves a pass)."""

    def group_stats(self, group: LinearGroup, kinds: set[str]) -> dict[str, torch.Tensor]:
        """The group's input statistics with every earlier group of the block already final
        (true-sequential); "cross" pairs them with the float model's inputs."""

    def replays(self, samples: int, kinds: set[str]) -> Replays:
        """Recorded calls of the block and its submodules on the first `samples` calibration samples."""

    def set_outputs(self, outputs: torch.Tensor) -> None:
        """The next block's calibration inputs, when they are not this block's plain outputs
        (a slicing method projects them); ignored if a later method changes the block."""

    def drop(self) -> None:
        """Remove this whole block from the model (depth pruning): no later hook sees it, the next
        block reads this block's inputs, and the engine deletes it after the last block."""


class ModelContext(Protocol):
    """What the engine hands a method before the first block and after the last."""

    model: nn.Module
    adapter: Adapter
    hidden: torch.Tensor | None  # calibration inputs of block 0
    block_kwargs: list[dict[str, Any]] | None
    run: Runner
    progress: Any  # .log(message), .warn(message), .task(description, total)
    calibration_tokens: int  # in the whole calibration set, across processes
    input_ids: torch.Tensor | None  # this process's calibration tokens [samples, seq_len] (None without)

    def set_inputs(self, hidden: torch.Tensor) -> None:
        """Replace the calibration inputs of block 0 (after the embedding was rotated, say)."""


class MethodConfig(BaseModel):
    """Base of every method's settings; unknown keys are errors, so recipe typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    name: ClassVar[str]  # set by METHODS.register
    Config: ClassVar[type[MethodConfig]]
    # What the method contributes to the artifact: quantized weights ("weights", a record per
    # linear that a format stores), a new structure ("structure", pruned shapes), or nothing of
    # its own ("transform": it edits float weights, e.g. folds scales).
    produces: ClassVar[Literal["weights", "structure", "transform"]] = "transform"
    # A transform alone makes no artifact; these quantize after it when the list names none.
    default_quantizer: ClassVar[str | None] = None
    # Calibration data: the engine embeds it only when some method in the list wants it.
    needs_calibration: ClassVar[bool] = False
    # The float model's hidden states, propagated beside the quantized ones ("cross" statistics).
    needs_float_path: bool = False
    # Records are measurements of candidates (a sensitivity pass), not edits: the block is left as it was.
    measures: ClassVar[bool] = False

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def from_options(cls, **options: Any) -> "Method":
        return cls(cls.Config(**options))

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        """Validate the model against the settings before any work starts."""

    def on_start(self, ctx: ModelContext) -> None:
        pass

    def on_block_start(self, ctx: BlockContext) -> None:
        pass

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        return {}

    def on_block_end(self, ctx: BlockContext) -> None:
        pass

    def on_end(self, ctx: ModelContext) -> None:
        pass

    def carry(self) -> dict[str, Any]:
        """State kept across blocks (tensors and JSON-able values), checkpointed with each block."""
        return {}

    def restore(self, carry: dict[str, Any]) -> None:
        pass

    def restore_block(self, block: nn.Module, meta: dict[str, Any], adapter: Adapter, model: nn.Module) -> None:
        """Rebuild a finished block's module structure (before its saved parameters load)."""

    def structure(self, block_meta: list[dict[str, Any]], model: nn.Module, adapter: Adapter) -> dict:
        """A "structure" method's spec of the pruned model (widths per block) for the artifact."""
        raise NotImplementedError

    def export(self) -> dict:
        """How a format stores the records of a "weights" method: {'kind': ..., plus settings}."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}


METHODS: Registry[type[Method]] = Registry("method", names_items=True)
# Names for lists of methods, e.g. "awq+gptq" → ("awq", "gptq").
METHOD_LISTS: Registry[tuple[str, ...]] = Registry("method list")
