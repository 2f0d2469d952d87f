"""The sequential layer-wise engine: one pass over the decoder blocks for an ordered list of
methods (see methods.base for the hooks and their order).

Embed the calibration set once (only if a method wants it), then for each block: move it to
the compute device, let every method see it (on_block_start), then each of its linear groups in
execution order (on_group; statistics are gathered when a method asks, with every earlier
group final), propagate the block's outputs to the next block, move it back and checkpoint it
with the methods' records, metadata and carried state. A killed run resumes from the last
finished block and gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.calib.data import TokenSet
from compressor.errors import CompressorError
from compressor.methods.base import Method, Record
from compressor.models.adapters import Adapter
from compressor.pipeline.checkpoint import DamagedCheckpoint, RunDirectory
from compressor.pipeline.context import BlockSession, Calibration, ModelSession
from compressor.pipeline.distributed import World
from compressor.pipeline.passes import BlockRunner, capture_block_kwargs, capture_inputs, check_weights
from compressor.pipeline.progress import Progress
from compressor.util import release_memory

ORDER = {"structure": 0, "transform": 1, "weights": 2}


def check_order(methods: list[Method]) -> None:
    """A list runs in one pass only as: at most one pruner, then transforms, then at most one
    quantizer, which comes last (a later method would edit what an earlier one already fixed)."""
    names = [m.name for m in methods]
    for earlier, later in zip(methods, methods[1:]):
        if ORDER[later.produces] < ORDER[earlier.produces]:
            raise CompressorError(
                f"method list {' → '.join(names)} cannot run in one pass: {later.name} ({later.produces}) would "
                f"change what {earlier.name} ({earlier.produces}) has already fixed",
                "order them as pruner, then transforms (awq, smoothquant), then one quantizer")
    for kind in ("structure", "weights"):
        several = [m.name for m in methods if m.produces == kind]
        if len(several) > 1:
            raise CompressorError(f"method list {' → '.join(names)} has more than one "
                                  f"{'pruner' if kind == 'structure' else 'quantizer'} ({', '.join(several)})",
                                  "keep one; chain further stages in a recipe")


class SequentialPipeline:
    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], run: RunDirectory,
                 calibration: TokenSet | None, device: torch.device | str = "cpu", batch_size: int = 8,
                 hessian_dtype: torch.dtype = torch.float32, progress: Progress | None = None,
                 world: World = World()):
        check_order(methods)
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.run = run
        self.calibration = calibration
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.hessian_dtype = hessian_dtype
        self.progress = progress or Progress()
        self.world = world
        self.needs_calibration = any(m.needs_calibration for m in methods)
        self.float_path = any(m.needs_float_path for m in methods)
        self.block_meta: list[dict[str, Any]] = []
        if self.needs_calibration and calibration is None:
            raise ValueError(f"{', '.join(m.name for m in methods)} needs calibration data")

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.methods)

    def execute(self, resume: bool) -> None:
        """Process every block not yet recorded in the run directory."""
        blocks = self.adapter.blocks(self.model)
        start = self._resume_point() if resume else 0
        for index in range(start, len(blocks)):  # before any expensive work
            check_weights(self.adapter, blocks[index], self.adapter.block_prefix(self.model, index))
        if not start and self.world.is_main:
            self.run.start()
        self.world.barrier()

        block_kwargs, hidden, first_sample, ids = None, None, 0, None
        if self.needs_calibration:
            ids = self.calibration.input_ids
            shard = self.world.shard(ids.shape[0], self.batch_size)
            first_sample = shard.start
            ids = ids[shard]
            block_kwargs = capture_block_kwargs(self.model, self.adapter, ids, self.device)
            self.progress.log(f"embedding {ids.shape[0]} calibration samples of {ids.shape[1]} tokens")
            hidden = capture_inputs(self.model, self.adapter, ids, self.batch_size, self.device)
        runner = BlockRunner(self.batch_size, self.device)
        calibration = Calibration(self.batch_size, self.device, self.hessian_dtype, self.world, first_sample)

        if start:  # what the methods carried and the finished blocks, exactly as they were saved
            for method, carry in zip(self.methods, self.run.load_carry(start - 1)):
                method.restore(carry)
        tokens = self.calibration.input_ids.numel() if self.needs_calibration else 0
        session = ModelSession(self.model, self.adapter, hidden, block_kwargs, runner, self.progress, tokens, ids)
        for method in self.methods:
            method.on_start(session)
        hidden = session.hidden
        for index in range(start):
            params, _, meta = self.run.load_block(index)
            for method in self.methods:
                method.restore_block(blocks[index], meta, self.adapter, self.model)
            blocks[index].load_state_dict(params, strict=True)
            self.block_meta.append(meta)
        fp_hidden = hidden if self.float_path else None
        if start:
            self.progress.log(f"resuming after block {start}/{len(blocks)}")
            if self.needs_calibration:
                saved = self.run.load_inputs(start)
                if saved is None:
                    raise RuntimeError(f"run directory lacks the inputs of block {start}")
                hidden, fp_hidden = saved["hidden"], saved.get("fp_hidden")

        with self.progress.task(f"{self.label}: blocks", total=len(blocks)) as bar:
            bar.advance(start)
            for index in range(start, len(blocks)):
                block = blocks[index]
                block.to(self.device)
                last = index + 1 == len(blocks)
                ctx = BlockSession(block, index, self.adapter.block_prefix(self.model, index), self.adapter, hidden,
                                   block_kwargs[index] if block_kwargs else None, calibration, fp_hidden)
                try:
                    records = self._process_block(ctx, want_outputs=not last)
                    next_hidden = ctx.outputs() if hidden is not None and not last else None
                    fp_next = ctx.fp_outputs if not last else None
                finally:
                    ctx.close()
                block.to("cpu")
                if next_hidden is not None:
                    self.run.save_inputs(index + 1, next_hidden, fp_next)
                self.world.barrier()  # every process's inputs are saved before the block counts as done
                if self.world.is_main:
                    self.run.save_block(index, block.state_dict(), records, ctx.meta,
                                        [m.carry() for m in self.methods])
                self.world.barrier()
                self.run.drop_inputs(index)
                self.block_meta.append(ctx.meta)
                hidden, fp_hidden = next_hidden, fp_next
                del ctx
                release_memory()
                bar.advance()
        dropped = [index for index, meta in enumerate(self.block_meta) if meta.get("dropped")]
        if dropped:
            self.progress.log(f"removing {len(dropped)} dropped blocks: {dropped}")
            self.adapter.remove_blocks(self.model, dropped)
        for method in self.methods:
            method.on_end(session)

    def _resume_point(self) -> int:
        """Blocks to skip on resume: those recorded, if every file a resume reads is intact; after
        damage none (the run is recomputed from its first block, which gives the same result)."""
        try:
            start = self.run.completed()
            self.run.check(start, self.needs_calibration)
        except DamagedCheckpoint as damage:
            self.progress.warn(f"{damage.message}: recomputing from the first block")
            return 0
        return start

    def _process_block(self, ctx: BlockSession, want_outputs: bool) -> dict[str, Record]:
        for method in self.methods:
            method.on_block_start(ctx)
            ctx.block.to(self.device)  # a method may have computed on the CPU (pruners factorize there)
            if ctx.dropped:  # removed from the model: nothing later works on it
                return {}
        ctx.begin_groups(self.float_path, want_outputs)
        records: dict[str, Record] = {}
        linears = ctx.linears()
        for group in ctx.groups:
            members = {n: linears[n] for n in group.linears}
            changed = False
            for method in self.methods:
                produced = method.on_group(ctx, group, members)
                records.update(produced)
                changed = changed or (bool(produced) and not method.measures)
            ctx.end_group(changed)
        for method in self.methods:
            method.on_block_end(ctx)
        return records
