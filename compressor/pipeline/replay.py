"""Recorded calls of a block and of its submodules on a calibration subset, replayed to measure
how far an edit moves their outputs. Methods that search scales (AWQ, SmoothQuant+) judge each
candidate by this error, without re-running the rest of the model."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from compressor.calib.stats import collect_inputs
from compressor.models.adapters import Adapter, LinearGroup
from compressor.pipeline.distributed import World


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ModuleReplay:
    """A module's recorded calls and outputs; `error()` replays them with the module as it is now."""

    def __init__(self, module: nn.Module, world: World):
        self.module = module
        self.world = world
        self.calls: list[tuple[tuple, dict]] = []
        self.reference: list[torch.Tensor] = []

    def record(self, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls.append((args, kwargs))
        self.reference.append(_first(output).detach())

    @torch.no_grad()
    def error(self) -> float:
        """Mean squared difference between the module's outputs now and the recorded ones."""
        total, count = 0.0, 0
        for (args, kwargs), reference in zip(self.calls, self.reference):
            out = _first(self.module(*args, **kwargs))
            total += (out.float() - reference.float()).pow(2).sum().item()
            count += reference.numel()
        return self.world.sum(total) / max(self.world.sum(count), 1)


class BlockReplays:
    """Replays of a block and of its attention/MLP submodules, plus statistics of each group's input."""

    def __init__(self, block: ModuleReplay, modules: dict[str, ModuleReplay], adapter: Adapter,
                 stats: dict[str, dict[str, torch.Tensor]]):
        self.block = block
        self.modules = modules
        self.adapter = adapter
        self.stats = stats

    def for_group(self, group: LinearGroup) -> ModuleReplay:
        """The smallest recorded module whose output a change to the group's linears reaches."""
        shortcut = self.adapter.shortcut_of(group.linears[0])
        return self.modules[shortcut.module] if shortcut else self.block


@torch.no_grad()
def record_block(block: nn.Module, adapter: Adapter, hidden: torch.Tensor, kwargs: dict[str, Any],
                 batch_size: int, device: torch.device, kinds: set[str], world: World = World()) -> BlockReplays:
    """Run the block over `hidden`, recording its and its submodules' calls and the group-input statistics."""
    whole = ModuleReplay(block, world)
    modules = {s.module: ModuleReplay(block.get_submodule(s.module), world) for s in adapter.shortcuts}
    linears = adapter.block_linears(block)
    targets = {g.name: [linears[n] for n in g.linears] for g in adapter.block_groups(block)}
    with ExitStack() as stack:
        for replay in modules.values():
            handle = replay.module.register_forward_hook(
                lambda _m, args, kw, out, replay=replay: replay.record(args, kw, out), with_kwargs=True)
            stack.callback(handle.remove)
        collectors = stack.enter_context(collect_inputs(targets, kinds)) if kinds else {}
        for start in range(0, hidden.shape[0], batch_size):
            batch = hidden[start:start + batch_size].to(device)
            whole.record((batch,), kwargs, block(batch, **kwargs))
    world.merge(collectors)
    stats = {group: {kind: c.result() for kind, c in per_kind.items()} for group, per_kind in collectors.items()}
    return BlockReplays(whole, modules, adapter, stats)
