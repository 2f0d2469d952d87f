"""Forward passes over decoder blocks: capturing what enters the first block, running one block
over every calibration sample in batches, and caching a submodule's last linear input so later
passes skip recomputing it. The engine (pipeline.sequential) and its contexts build on these."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from compressor.calib.stats import InputsCollected
from compressor.errors import CompressorError
from compressor.models.adapters import Adapter, Shortcut


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
                   device: torch.device, home: torch.device | str = "cpu") -> torch.Tensor:
    """Hidden states entering the first block for every sample: [samples, seq_len, hidden], kept
    on `home` (the CPU, or the compute device when the activations fit there)."""
    first = adapter.blocks(model)[0]
    chunks: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        chunks.append(hidden.detach().to(home))
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
        outputs.append(out.to(hidden.device))  # where the activations live
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

    def __init__(self, block: nn.Module, shortcut: Shortcut, cursor: BatchCursor, home: torch.device | str = "cpu"):
        self.home = home  # where the cached inputs live (with the block's other activations)
        self.module = block.get_submodule(shortcut.module)
        self.linear = block.get_submodule(shortcut.last_linear)
        self.returns_tuple = shortcut.returns_tuple
        self.cursor = cursor
        self.inputs: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        def hook(_module, args):
            self.inputs.append(args[0].detach().to(self.home))

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


def check_weights(adapter: Adapter, block: nn.Module, prefix: str) -> None:
    for name, linear in adapter.block_linears(block).items():
        if not torch.isfinite(linear.weight).all():
            raise CompressorError(f"{prefix}{name} has NaN or Inf in its weights",
                                  "the checkpoint is damaged: re-export or re-download it")


def check_stored_weights(lazy, adapter: Adapter, blocks: list[tuple[nn.Module, str]], threads: int = 4) -> None:
    """check_weights for blocks still on disk (models.lazy: (block, prefix) pairs), read in chunks
    by a few threads at once (file reads and the check release the GIL): every linear weight of a
    large model is checked before any work in a fraction of the time one reader takes."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"{prefix}{name}" for block, prefix in blocks for name in adapter.block_linears(block)]
    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        for module, finite in zip(names, pool.map(lambda m: lazy.finite(f"{m}.weight"), names)):
            if not finite:
                raise CompressorError(f"{module} has NaN or Inf in its weights",
                                      "the checkpoint is damaged: re-export or re-download it")


@torch.no_grad()
def record_group_inputs(block: nn.Module, adapter: Adapter, hidden: torch.Tensor, kwargs: dict[str, Any],
                        batch_size: int, device: torch.device, want_outputs: bool,
                        ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor | None]:
    """Each group's input for every batch (on CPU), and the block's outputs, in one pass."""
    linears = adapter.block_linears(block)
    groups = adapter.block_groups(block)
    inputs: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    with ExitStack() as stack:
        for group in groups:
            handle = linears[group.linears[0]].register_forward_pre_hook(
                lambda _m, args, name=group.name: inputs[name].append(args[0].detach().to(hidden.device)))
            stack.callback(handle.remove)
        outputs = run_block(block, hidden, kwargs, batch_size, device)
    return inputs, outputs if want_outputs else None


class BlockRunner:
    """Runs one block over every calibration sample in batches; the outputs stay on the CPU."""

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                 stop: type[BaseException] | None = None) -> torch.Tensor | None:
        """The block's outputs; with `stop`, a hook ends each pass early and nothing is returned."""
        block.to(self.device)
        outputs = []
        try:
            for start in range(0, hidden.shape[0], self.batch_size):
                x = hidden[start:start + self.batch_size].to(self.device)
                if stop is not None:
                    try:
                        block(x, **kwargs)
                    except stop:
                        pass
                    continue
                out = block(x, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outputs.append(out.to("cpu"))
        finally:
            block.to("cpu")
        return torch.cat(outputs) if outputs else None

    @torch.no_grad()
    def map(self, block: nn.Module, fn, *inputs: torch.Tensor) -> torch.Tensor | None:
        """fn(*batch) over aligned batches of `inputs` with the block on the compute device;
        concatenated tensor results on the CPU (None if fn returns nothing)."""
        block.to(self.device)
        outputs = []
        try:
            for start in range(0, inputs[0].shape[0], self.batch_size):
                out = fn(*(t[start:start + self.batch_size].to(self.device) for t in inputs))
                if out is not None:
                    outputs.append(out.to("cpu"))
        finally:
            block.to("cpu")
        return torch.cat(outputs) if outputs else None
