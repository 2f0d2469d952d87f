"""The sequential layer-wise engine: one pass over the decoder blocks for an ordered list of
methods (see methods.base for the hooks and their order).

Embed the calibration set once (only if a method wants it), then for each block: move it to
the compute device, let every method see it (on_block_start), then each of its linear groups in
execution order (on_group; statistics are gathered when a method asks, with every earlier
group final), propagate the block's outputs to the next block, move it back and checkpoint it
with the methods' records, metadata and carried state (the next block's inputs now and then:
checkpoint.InputsSchedule). A killed run resumes after the last block whose inputs were saved and
gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import nn

from compressor.calib.data import TokenSet
from compressor.errors import CompressorError
from compressor.methods.base import Method, Record
from compressor.models.adapters import Adapter
from compressor.models.lazy import release
from compressor.pipeline.checkpoint import DamagedCheckpoint, InputsSchedule, RunDirectory
from compressor.pipeline.context import BlockSession, Calibration, ModelSession
from compressor.pipeline.distributed import World
from compressor.pipeline.passes import (BlockRunner, capture_block_kwargs, capture_inputs, check_stored_weights,
                                       check_weights)
from compressor.pipeline.progress import Progress
from compressor.pipeline.resources import HostCopier, PhaseClock, activation_bytes, plan_activations
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


class CheckpointWriter:
    """Writes finished blocks' checkpoints in one background thread while the next block computes
    (at most one write pending; a failed write is raised at the next call). Data-parallel runs
    write in the foreground: their barriers order the processes' writes."""

    def __init__(self, background: bool):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background else None
        # A second thread for work of the same block that needs no order with its checkpoint (the
        # early export), so the two writes overlap.
        self.beside_pool = ThreadPoolExecutor(1, thread_name_prefix="export") if background else None
        self.pending: Future | None = None

    def beside(self, job: Callable[[], float]) -> Callable[[], float]:
        """Start `job` beside the checkpoint (in the foreground without a background thread);
        returns what waits for it and gives its result."""
        if self.beside_pool is None:
            value = job()
            return lambda: value
        return self.beside_pool.submit(job).result

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self.pool is None:
            job()
        else:
            self.pending = self.pool.submit(job)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for pool in (self.pool, self.beside_pool):
                if pool is not None:
                    pool.shutdown(wait=True)


class SequentialPipeline:
    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], run: RunDirectory,
                 calibration: TokenSet | None, device: torch.device | str = "cpu", batch_size: int = 8,
                 hessian_dtype: torch.dtype = torch.float32, progress: Progress | None = None,
                 world: World = World(), lazy=None,
                 on_block_saved: Callable[[int, dict[str, torch.Tensor], dict[str, Record]], None] | None = None):
        check_order(methods)
        # Called beside the checkpoint thread with a block's parameters and records, while its
        # checkpoint is written (the export encodes the block there while the next one computes);
        # the block counts as done once both are.
        self.on_block_saved = on_block_saved
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
        self.lazy = lazy  # models.lazy.LazyWeights: blocks read from the checkpoint one at a time
        self.clock = PhaseClock(self.device)
        self.block_times: list[dict[str, float]] = []  # per block: seconds per phase
        self.host_copies = HostCopier(self.device)
        self.checkpoint_times: list[dict[str, float]] = []  # per block: seconds per part, in the checkpoint thread
        self.activations = "cpu"
        self.embed_s = 0.0
        self.window: list[float | None] = [None, None]
        self.inputs_schedule = InputsSchedule(every_block=world.size > 1)
        self.inputs_saved_at: int | None = None  # the block whose inputs are the run's latest checkpoint
        if self.needs_calibration and calibration is None:
            raise ValueError(f"{', '.join(m.name for m in methods)} needs calibration data")

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.methods)

    def execute(self, resume: bool) -> None:
        """Process every block not yet recorded in the run directory."""
        blocks = self.adapter.blocks(self.model)
        start = self._resume_point() if resume else 0
        if self.lazy is None:  # before any expensive work
            for index in range(start, len(blocks)):
                check_weights(self.adapter, blocks[index], self.adapter.block_prefix(self.model, index))
        else:  # a few chunks in memory at a time: a damaged checkpoint is refused before any work
            check_stored_weights(self.lazy, self.adapter, [(blocks[index], self.adapter.block_prefix(self.model, index))
                                                           for index in range(start, len(blocks))])
        if self.lazy is not None and start < len(blocks):
            self.lazy.prefetch(self.adapter.block_prefix(self.model, start), self.device.type == "cuda")
        if not start and self.world.is_main:
            self.run.start()
        if self.run.path.is_dir():
            self.run.drop_other_inputs(start)
        self.world.barrier()

        block_kwargs, hidden, first_sample, ids = None, None, 0, None
        home = torch.device("cpu")
        if self.needs_calibration:
            ids = self.calibration.input_ids
            shard = self.world.shard(ids.shape[0], self.batch_size)
            first_sample = shard.start
            ids = ids[shard]
            home = self._plan_activations(blocks[0], ids.numel())
            with self.clock.phase("embed"):
                block_kwargs = capture_block_kwargs(self.model, self.adapter, ids, self.device)
                self.progress.log(f"embedding {ids.shape[0]} calibration samples of {ids.shape[1]} tokens")
                hidden = capture_inputs(self.model, self.adapter, ids, self.batch_size, self.device, home)
        self.embed_s = self.clock.take().get("embed", 0.0)
        runner = BlockRunner(self.batch_size, self.device)
        calibration = Calibration(self.batch_size, self.device, self.hessian_dtype, self.world, first_sample,
                                  self.clock)

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
            if self.lazy is None:  # lazy blocks stay on disk: the export reads them from the run directory
                blocks[index].load_state_dict(params, strict=True)
            self.block_meta.append(meta)
        fp_hidden = hidden if self.float_path else None
        if start:
            self.progress.log(f"resuming after block {start}/{len(blocks)}")
            if self.needs_calibration:
                saved = self.run.load_inputs(start)
                if saved is None:
                    raise RuntimeError(f"run directory lacks the inputs of block {start}")
                self.inputs_saved_at = start
                hidden, fp_hidden = (None if v is None else v.to(home) for v in (saved["hidden"], saved.get("fp_hidden")))

        writer = CheckpointWriter(background=self.world.size == 1)
        self.window = [time.time(), None]  # wall-clock span of the block loop (benchmarks align samples to it)
        try:
            with self.progress.task(f"{self.label}: blocks", total=len(blocks)) as bar:
                bar.advance(start)
                for index in range(start, len(blocks)):
                    hidden, fp_hidden = self._block(blocks, index, hidden, fp_hidden, block_kwargs, calibration, writer)
                    bar.advance()
        finally:
            writer.close()
            self.window[1] = time.time()
            if self.lazy is not None:
                self.lazy.close()
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
            completed = self.run.completed()
            start = self.run.resume_point(completed, self.needs_calibration)
        except DamagedCheckpoint as damage:
            self.progress.warn(f"{damage.message}: recomputing from the first block")
            return 0
        if start < completed:
            why = f"the inputs of block {start + 1} are the last ones saved" if start else "no block inputs were saved"
            again = f"block {completed}" if start + 1 == completed else f"blocks {start + 1}-{completed}"
            self.progress.log(f"{again} computed again ({why})")
        return start

    def _plan_activations(self, first: nn.Module, tokens: int) -> torch.device:
        """Where the calibration activations live: on the GPU when they fit (no copies per batch),
        in host memory otherwise (said in the progress), refused when neither holds them."""
        widest = max(l.in_features for l in self.adapter.block_linears(first).values())
        hidden = self.model.config.hidden_size
        element = torch.finfo(next(iter(self.adapter.block_linears(first).values())).weight.dtype).bits // 8
        need = activation_bytes(tokens, hidden, widest, element, self.float_path)
        home, phrase = plan_activations(need, self.device)
        self.activations = phrase
        self.progress.log(phrase)
        return home

    def _block(self, blocks, index: int, hidden, fp_hidden, block_kwargs, calibration: Calibration,
               writer: CheckpointWriter):
        """Process one block; returns the next block's inputs (and the float path's)."""
        block = blocks[index]
        prefix = self.adapter.block_prefix(self.model, index)
        with self.clock.phase("load"):
            if self.lazy is not None:
                self.lazy.materialize(block, prefix, self.device)
                if index + 1 < len(blocks):  # read the next block while this one computes
                    self.lazy.prefetch(self.adapter.block_prefix(self.model, index + 1), self.device.type == "cuda")
                check_weights(self.adapter, block, prefix)
            else:
                block.to(self.device)
        last = index + 1 == len(blocks)
        ctx = BlockSession(block, index, prefix, self.adapter, hidden,
                           block_kwargs[index] if block_kwargs else None, calibration, fp_hidden)
        try:
            with self.clock.phase("groups"):
                records = self._process_block(ctx, want_outputs=not last)
            with self.clock.phase("propagate"):
                next_hidden = ctx.outputs() if hidden is not None and not last else None
            fp_next = ctx.fp_outputs if not last else None
        finally:
            ctx.close()
        with self.clock.phase("save"):
            if self.lazy is not None:
                # Quantized linears are exported from their records; their float weights would only
                # be needed to rebuild the block in memory, which a lazy run never does.
                stored = {f"{name}.weight" for name in records}
                params = {k: v.detach() for k, v in block.state_dict().items() if k not in stored}
                release(block)  # its memory goes once the checkpoint is written
            else:
                block.to("cpu")
                params = block.state_dict()
            (params, records, carries), on_host = self.host_copies((params, records, [m.carry() for m in self.methods]))
            meta = ctx.meta
            save_inputs = next_hidden is not None and self.inputs_schedule.due(
                sum(t.numel() * t.element_size() for t in (next_hidden, fp_next) if t is not None))
            older_inputs = self.inputs_saved_at
            if save_inputs:
                self.inputs_saved_at = index + 1

            def export() -> float:
                began = time.perf_counter()
                self.on_block_saved(index, params, records)
                return time.perf_counter() - began

            def save() -> None:
                parts, began = {}, time.perf_counter()
                if on_host is not None:
                    on_host.synchronize()
                    parts["to_host"] = time.perf_counter() - began
                exported = writer.beside(export) if self.world.is_main and self.on_block_saved is not None else None
                if save_inputs:
                    began = time.perf_counter()
                    with self.host_copies.side():
                        self.run.save_inputs(index + 1, next_hidden, fp_next)
                    parts["inputs"] = time.perf_counter() - began
                    self.inputs_schedule.saved(parts["inputs"])
                self.world.barrier()  # every process's inputs are saved before the block counts as done
                if self.world.is_main:
                    began = time.perf_counter()
                    self.run.save_block(index, params, records, meta, carries)
                    parts["block_file"] = time.perf_counter() - began
                if exported is not None:
                    parts["export"] = exported()
                self.world.barrier()
                if older_inputs is not None and (save_inputs or last):  # a kept directory (sensitivities) ends clean
                    self.run.drop_inputs(older_inputs)
                self.checkpoint_times.append(parts)

            writer.submit(save)
        self.block_meta.append(meta)
        del ctx
        release_memory()
        self._report(index, len(blocks))
        return next_hidden, fp_next

    def _report(self, index: int, total: int) -> None:
        """One line per block where progress goes to a log: its seconds per phase."""
        times = self.clock.take()
        times["solve"] = max(times.pop("groups", 0.0) - times.get("stats", 0.0), 0.0)
        self.block_times.append(times)
        parts = ", ".join(f"{name} {times.get(name, 0.0):.2f}s" for name in ("load", "stats", "solve", "propagate", "save"))
        offloaded = " · activations on host" if self.activations.startswith("activations offloaded") else ""
        self.progress.detail(f"block {index + 1}/{total}: {sum(times.values()):.2f}s ({parts}){offloaded}")

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
