"""The sequential layer-wise engine.

Embed the calibration set once, then for each decoder block: collect the statistics the
method asks for, let the method modify the block, recompute the block's outputs with the
modified block (so the next block calibrates on the errors of the earlier ones), move the
block back off the compute device, and checkpoint it. A killed run resumes from the last
finished block with the same result as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from compressor.calib.data import TokenSet
from compressor.calib.stats import CrossCollector, InputsCollected, collect_inputs
from compressor.errors import CompressorError
from compressor.methods.base import Method, Record
from compressor.models.adapters import Adapter, Shortcut
from compressor.pipeline.checkpoint import RunDirectory
from compressor.pipeline.distributed import World
from compressor.pipeline.progress import Progress
from compressor.pipeline.replay import record_block
from compressor.util import release_memory

# Test hook: SIGKILL the process right after this block's checkpoint is written.


class _Captured(Exception):
    pass


def _without_hidden(args: tuple, kwargs: dict) -> dict[str, Any]:
    kwargs = dict(kwargs)
    kwargs.pop("hidden_states", None)
    for key in ("past_key_values", "past_key_value", "use_cache", "output_attentions"):
        kwargs.pop(key, None)
    return kwargs


def _decoder_parts_to(model: nn.Module, adapter: Adapter, device: torch.device) -> None:
    """Move everything of the decoder except its blocks (embeddings, rotary tables)."""
    decoder = adapter.decoder(model)
    blocks = adapter.blocks(model)
    for child in decoder.children():
        if child is not blocks:
            child.to(device)


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor,
                         device: torch.device) -> list[dict[str, Any]]:
    """The keyword arguments each block receives (masks, rotary tables), from one sequence.

    They depend only on positions, not on token values or batch size (batch dim 1
    broadcasts), so one capture serves every batch of the same sequence length.
    """
    blocks = adapter.blocks(model)
    captured: list[dict[str, Any] | None] = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def hook(_m, args, kwargs, i=i):
            captured[i] = _without_hidden(args, kwargs)
            if i == len(blocks) - 1:
                raise _Captured
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        # The blocks' own computation is not needed to see their arguments: pass hidden states through.
        block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        model(input_ids[:1], use_cache=False)  # on the CPU: no block compute, no device memory
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
        for block in blocks:
            del block.forward
    return [_to(k, device) for k in captured]


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Hidden states entering the first block for every sample: [samples, seq_len, hidden] on CPU."""
    first = adapter.blocks(model)[0]
    chunks: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        chunks.append(hidden.detach().to("cpu"))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    _decoder_parts_to(model, adapter, device)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                adapter.decoder(model)(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        _decoder_parts_to(model, adapter, torch.device("cpu"))
    return torch.cat(chunks)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class BatchCursor:
    """Which calibration batch a pass over a block is on, for modules replaced by cached outputs."""

    index = 0


def _batches(hidden: torch.Tensor, batch_size: int, cursor: BatchCursor | None) -> Iterator[torch.Tensor]:
    for number, start in enumerate(range(0, hidden.shape[0], batch_size)):
        if cursor is not None:
            cursor.index = number
        yield hidden[start:start + batch_size]


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
              device: torch.device, cursor: BatchCursor | None = None) -> torch.Tensor:
    outputs = []
    for batch in _batches(hidden, batch_size, cursor):
        out = block(batch.to(device), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(out.to("cpu"))
    return torch.cat(outputs)


@torch.no_grad()
def feed_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
               device: torch.device, cursor: BatchCursor | None = None) -> None:
    """Run the block over every sample for its hooks only; a hook may end a pass early."""
    for batch in _batches(hidden, batch_size, cursor):
        try:
            block(batch.to(device), **kwargs)
        except InputsCollected:
            pass


class ShortcutCache:
    """Per-batch inputs of a shortcut's last linear; once installed, the submodule returns
    `last_linear(cached input)` instead of recomputing everything before it."""

    def __init__(self, block: nn.Module, shortcut: Shortcut, cursor: BatchCursor):
        self.module = block.get_submodule(shortcut.module)
        self.linear = block.get_submodule(shortcut.last_linear)
        self.returns_tuple = shortcut.returns_tuple
        self.cursor = cursor
        self.inputs: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        def hook(_module, args):
            self.inputs.append(args[0].detach().to("cpu"))

        handle = self.linear.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def installed(self) -> Iterator[None]:
        def forward(*_args, **_kwargs):
            out = self.linear(self.inputs[self.cursor.index].to(self.linear.weight.device))
            return (out, None) if self.returns_tuple else out

        self.module.forward = forward
        try:
            yield
        finally:
            del self.module.forward


def _check_weights(adapter: Adapter, block: nn.Module, prefix: str) -> None:
    for name, linear in adapter.block_linears(block).items():
        if not torch.isfinite(linear.weight).all():
            raise CompressorError(f"{prefix}{name} has NaN or Inf in its weights",
                                  "the checkpoint is damaged: re-export or re-download it")


@torch.no_grad()
def record_group_inputs(block: nn.Module, adapter: Adapter, hidden: torch.Tensor, kwargs: dict[str, Any],
                        batch_size: int, device: torch.device, want_outputs: bool,
                        ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor | None]:
    """Each group's input for every batch (on CPU), and the block's outputs, in one pass."""
    linears = adapter.block_linears(block)
    inputs: dict[str, list[torch.Tensor]] = {g.name: [] for g in adapter.groups}
    with ExitStack() as stack:
        for group in adapter.groups:
            handle = linears[group.linears[0]].register_forward_pre_hook(
                lambda _m, args, name=group.name: inputs[name].append(args[0].detach().to("cpu")))
            stack.callback(handle.remove)
        outputs = run_block(block, hidden, kwargs, batch_size, device)
    return inputs, outputs if want_outputs else None


class SequentialPipeline:
    def __init__(self, model: nn.Module, adapter: Adapter, method: Method, run: RunDirectory,
                 calibration: TokenSet | None, device: torch.device | str = "cpu", batch_size: int = 8,
                 hessian_dtype: torch.dtype = torch.float32, progress: Progress | None = None,
                 world: World = World()):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.run = run
        self.calibration = calibration
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.hessian_dtype = hessian_dtype
        self.progress = progress or Progress()
        self.world = world
        if method.needs_calibration and calibration is None:
            raise ValueError(f"method {method.name} needs calibration data")

    def execute(self, resume: bool) -> None:
        """Process every block not yet recorded in the run directory."""
        blocks = self.adapter.blocks(self.model)
        start = self.run.completed() if resume else 0
        for index in range(start, len(blocks)):  # before any expensive work
            _check_weights(self.adapter, blocks[index], self.adapter.block_prefix(self.model, index))
        if not resume and self.world.is_main:
            self.run.start()
        self.world.barrier()
        for index in range(start):
            params, _ = self.run.load_block(index)
            blocks[index].load_state_dict(params, strict=True)
        if start:
            self.progress.log(f"resuming after block {start}/{len(blocks)}")

        hidden, fp_hidden, block_kwargs = None, None, None
        if self.method.needs_calibration and start < len(blocks):
            ids = self.calibration.input_ids
            self.shard = self.world.shard(ids.shape[0], self.batch_size)
            ids = ids[self.shard]
            block_kwargs = capture_block_kwargs(self.model, self.adapter, ids, self.device)
            saved = self.run.load_inputs(start) if start else None
            if saved is not None:
                hidden, fp_hidden = saved["hidden"], saved.get("fp_hidden")
            else:
                if start:
                    raise RuntimeError(f"run directory lacks the inputs of block {start}")
                self.progress.log(f"embedding {ids.shape[0]} calibration samples of {ids.shape[1]} tokens")
                hidden = capture_inputs(self.model, self.adapter, ids, self.batch_size, self.device)
                fp_hidden = hidden
            if not self.method.needs_fp_inputs:
                fp_hidden = None

        with self.progress.task(f"{self.method.name}: blocks", total=len(blocks)) as bar:
            bar.advance(start)
            for index in range(start, len(blocks)):
                block = blocks[index]
                block.to(self.device)
                kwargs = block_kwargs[index] if block_kwargs else None
                last = index + 1 == len(blocks)
                records, outputs, fp_next = self._process_block(block, hidden, fp_hidden, kwargs, want_outputs=not last)
                next_hidden = None
                if hidden is not None and not last:
                    next_hidden = outputs if outputs is not None else run_block(
                        block, hidden, kwargs, self.batch_size, self.device)
                block.to("cpu")
                if next_hidden is not None:
                    self.run.save_inputs(index + 1, next_hidden, fp_next)
                self.world.barrier()  # every process's inputs are saved before the block counts as done
                if self.world.is_main:
                    self.run.save_block(index, block.state_dict(), records)
                self.world.barrier()
                self.run.drop_inputs(index)
                hidden, fp_hidden = next_hidden, fp_next
                release_memory()
                bar.advance()

    def _process_block(self, block: nn.Module, hidden: torch.Tensor | None, fp_hidden: torch.Tensor | None,
                       kwargs: dict[str, Any] | None, want_outputs: bool,
                       ) -> tuple[dict[str, Record], torch.Tensor | None, torch.Tensor | None]:
        """The block's records, its outputs where computing them came for free, and the float
        model's outputs where the method tracks the float path."""
        linears = self.adapter.block_linears(block)
        groups = self.adapter.groups
        records: dict[str, Record] = {}
        if self.method.transforms_block:
            # The search replays the first samples of the whole calibration set, wherever they live.
            local = max(0, min(self.method.search_samples - self.shard.start, hidden.shape[0]))
            replays = record_block(block, self.adapter, hidden[:local], kwargs, self.batch_size, self.device,
                                   set(self.method.search_needs), self.world)
            self.method.transform_block(block, self.adapter, linears, replays)
            del replays
        if not self.method.needs:
            for group in groups:
                records.update(self.method.apply_group(block, group, {n: linears[n] for n in group.linears}, {}))
            return records, None, None
        if not self.method.true_sequential:
            # One forward pass collects statistics for every group.
            return self._apply_batch(block, list(groups), linears, hidden, kwargs, None), None, None
        fp_inputs, fp_outputs = None, None
        if fp_hidden is not None:  # the block is still float here (after any output-preserving transform)
            fp_inputs, fp_outputs = record_group_inputs(block, self.adapter, fp_hidden, kwargs, self.batch_size,
                                                        self.device, want_outputs)
        cursor = BatchCursor()
        # Shortcuts are valid only while a method edits nothing but the linears it is handed.
        shortcuts = {} if self.method.edits_outside_group else {
            s.last_linear: s for s in self.adapter.shortcuts}
        with ExitStack() as installed:
            for group in groups:
                shortcut = shortcuts.get(group.linears[0]) if len(group.linears) == 1 else None
                cache = ShortcutCache(block, shortcut, cursor) if shortcut else None
                with cache.recording() if cache else ExitStack():
                    records.update(self._apply_batch(block, [group], linears, hidden, kwargs, cursor, fp_inputs))
                if cache:
                    installed.enter_context(cache.installed())
            outputs = run_block(block, hidden, kwargs, self.batch_size, self.device, cursor) if want_outputs else None
        return records, outputs, fp_outputs

    def _where(self, block: nn.Module) -> str:
        blocks = self.adapter.blocks(self.model)
        index = next(i for i, b in enumerate(blocks) if b is block)
        return self.adapter.block_prefix(self.model, index)

    def _apply_batch(self, block: nn.Module, batch: list, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                     kwargs: dict[str, Any], cursor: BatchCursor | None,
                     fp_inputs: dict[str, list[torch.Tensor]] | None = None) -> dict[str, Record]:
        """Collect the statistics of a batch of groups in one pass over the block, then apply each."""
        records: dict[str, Record] = {}
        targets = {g.name: [linears[n] for n in g.linears] for g in batch}
        with ExitStack() as stack:
            crosses = {}
            if fp_inputs is not None:  # registered first: runs before a collector hook ends the pass
                for group in batch:
                    first = linears[group.linears[0]]
                    crosses[group.name] = cross = CrossCollector(first.in_features, self.hessian_dtype)
                    handle = first.register_forward_pre_hook(
                        lambda _m, args, cross=cross, name=group.name: cross.update_pair(
                            args[0].detach(), fp_inputs[name][cursor.index].to(args[0].device)))
                    stack.callback(handle.remove)
            collectors = stack.enter_context(collect_inputs(targets, set(self.method.needs), self.hessian_dtype,
                                                            stop_after_last=True))
            feed_block(block, hidden, kwargs, self.batch_size, self.device, cursor)
        for name, cross in crosses.items():
            collectors[name]["cross"] = cross
        self.world.merge(collectors)
        for group in batch:
            stats = {kind: c.result() for kind, c in collectors[group.name].items()}
            if not all(torch.isfinite(v).all() for v in stats.values()):
                raise CompressorError(
                    f"the calibration activations entering {self._where(block)}{'/'.join(group.linears)} "
                    "contain NaN or Inf", "the model overflows on this data: use --dtype float32, or check the "
                    "checkpoint and the calibration text")
            records.update(self.method.apply_group(block, group, {n: linears[n] for n in group.linears}, stats))
        return records
