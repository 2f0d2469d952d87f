"""What the engine hands methods: a block session (one decoder block, its calibration inputs, and
statistics gathered on request) and a model session (the whole model before the first block and
after the last). Methods see them through the protocols in methods.base."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.calib.stats import CrossCollector, collect_inputs
from compressor.errors import CompressorError
from compressor.models.adapters import Adapter, LinearGroup
from compressor.pipeline.distributed import World
from compressor.pipeline.passes import (BatchCursor, BlockRunner, ShortcutCache, feed_block, record_group_inputs,
                                        run_block)
from compressor.pipeline.replay import BlockReplays, record_block


@dataclass
class Calibration:
    """How the engine runs blocks over this process's calibration samples."""

    batch_size: int
    device: torch.device
    hessian_dtype: torch.dtype
    world: World
    first_sample: int = 0  # index of this process's first sample in the whole calibration set


@dataclass
class ModelSession:
    model: nn.Module
    adapter: Adapter
    hidden: torch.Tensor | None
    block_kwargs: list[dict[str, Any]] | None
    run: BlockRunner
    progress: Any
    calibration_tokens: int = 0  # across every process
    input_ids: torch.Tensor | None = None  # this process's calibration tokens

    def set_inputs(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@dataclass
class BlockSession:
    block: nn.Module
    index: int
    prefix: str
    adapter: Adapter
    hidden: torch.Tensor | None
    kwargs: dict[str, Any] | None
    calibration: Calibration
    fp_hidden: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    cursor: BatchCursor = field(default_factory=BatchCursor)
    # Inputs of each group on the float path, per batch (set when a method tracks the float model).
    fp_inputs: dict[str, list[torch.Tensor]] | None = None
    fp_outputs: torch.Tensor | None = None
    shortcuts: ExitStack = field(default_factory=ExitStack)
    _pending: ShortcutCache | None = None
    _outputs: torch.Tensor | None = None
    _outputs_version: int = -1
    version: int = 0  # bumped whenever a group's linears change

    def __post_init__(self) -> None:
        self.groups = self.adapter.block_groups(self.block)
        self.run = BlockRunner(self.calibration.batch_size, self.calibration.device)

    # ------------------------------------------------------------ what methods call

    def linears(self) -> dict[str, nn.Linear]:
        return self.adapter.block_linears(self.block)

    def block_stats(self, kinds: set[str], keep_outputs: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        if not keep_outputs:
            return self._collect(list(self.groups), kinds)
        # The whole block runs anyway: its outputs are the next block's inputs until a group changes.
        outputs = []
        stats = self._collect(list(self.groups), kinds, outputs=outputs)
        self.set_outputs(torch.cat(outputs))
        return stats

    def group_stats(self, group: LinearGroup, kinds: set[str]) -> dict[str, torch.Tensor]:
        # A group whose first linear ends a shortcut (o_proj, down_proj) records that linear's
        # inputs during this pass, so later passes replay the submodule from them.
        shortcut = self.adapter.shortcut_ending_at(group.linears[0]) if len(group.linears) == 1 else None
        record = None
        if shortcut is not None and self._pending is None:
            self._pending = record = ShortcutCache(self.block, shortcut, self.cursor)
        return self._collect([group], kinds, record=record)[group.name]

    def replays(self, samples: int, kinds: set[str]) -> BlockReplays:
        # The search replays the first samples of the whole calibration set, wherever they live.
        local = max(0, min(samples - self.calibration.first_sample, self.hidden.shape[0]))
        c = self.calibration
        return record_block(self.block, self.adapter, self.hidden[:local], self.kwargs, c.batch_size, c.device,
                            set(kinds), c.world)

    def set_outputs(self, outputs: torch.Tensor) -> None:
        self._outputs, self._outputs_version = outputs, self.version

    def drop(self) -> None:
        self.meta["dropped"] = True
        self.set_outputs(self.hidden)

    @property
    def dropped(self) -> bool:
        return bool(self.meta.get("dropped"))

    # ------------------------------------------------------------ what the engine calls

    def begin_groups(self, float_path: bool, want_outputs: bool) -> None:
        """Record the float path's group inputs (and outputs), before any group is quantized."""
        if float_path and self.fp_hidden is not None:
            c = self.calibration
            self.fp_inputs, self.fp_outputs = record_group_inputs(
                self.block, self.adapter, self.fp_hidden, self.kwargs, c.batch_size, c.device, want_outputs)

    def end_group(self, changed: bool) -> None:
        """The group is final: install the shortcut its statistics pass recorded."""
        if changed:
            self.version += 1
        if self._pending is not None:
            if self._pending.inputs:
                self.shortcuts.enter_context(self._pending.installed())
            self._pending = None

    def outputs(self) -> torch.Tensor:
        """The next block's calibration inputs."""
        if self._outputs is not None and self._outputs_version == self.version:
            return self._outputs
        c = self.calibration
        return run_block(self.block, self.hidden, self.kwargs, c.batch_size, c.device, self.cursor)

    def close(self) -> None:
        self.shortcuts.close()

    # ------------------------------------------------------------ internals

    def _collect(self, groups: list[LinearGroup], kinds: set[str], record: ShortcutCache | None = None,
                 outputs: list[torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        if self.hidden is None:
            raise RuntimeError("statistics need calibration data; the method must set needs_calibration")
        c = self.calibration
        linears = self.linears()
        targets = {g.name: [linears[n] for n in g.linears] for g in groups}
        plain = set(kinds) - {"cross"}
        with ExitStack() as stack:
            crosses = {}
            if "cross" in kinds:  # registered first: runs before a collector hook ends the pass
                if self.fp_inputs is None:
                    raise RuntimeError("cross statistics need the float path; the method must set needs_float_path")
                for group in groups:
                    first = linears[group.linears[0]]
                    crosses[group.name] = cross = CrossCollector(first.in_features, c.hessian_dtype)
                    handle = first.register_forward_pre_hook(
                        lambda _m, args, cross=cross, name=group.name: cross.update_pair(
                            args[0].detach(), self.fp_inputs[name][self.cursor.index].to(args[0].device)))
                    stack.callback(handle.remove)
            if record is not None:
                stack.enter_context(record.recording())
            collectors = stack.enter_context(collect_inputs(targets, plain, c.hessian_dtype,
                                                            stop_after_last=outputs is None))
            if outputs is None:
                feed_block(self.block, self.hidden, self.kwargs, c.batch_size, c.device, self.cursor)
            else:
                outputs.append(run_block(self.block, self.hidden, self.kwargs, c.batch_size, c.device, self.cursor))
        for name, cross in crosses.items():
            collectors[name]["cross"] = cross
        c.world.merge(collectors)
        stats = {}
        for group in groups:
            values = {kind: collector.result() for kind, collector in collectors[group.name].items()}
            # How many tokens reached the group (experts see only those routed to them).
            values["tokens"] = torch.tensor(max((c.count for c in collectors[group.name].values()), default=0))
            if not all(torch.isfinite(v).all() for v in values.values()):
                raise CompressorError(
                    f"the calibration activations entering {self.prefix}{'/'.join(group.linears)} contain NaN or "
                    "Inf", "the model overflows on this data: use --dtype float32, or check the checkpoint and the "
                    "calibration text")
            stats[group.name] = values
        return stats
