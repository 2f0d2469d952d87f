"""Generation speed of a causal LM: prefill and decode tokens/s and peak memory (`compress bench`).

For each batch size: a prefill of `prompt_len` random tokens into a static KV cache of
prompt_len + gen_len positions, then `gen_len` greedy decode steps of one token per sequence.
On CUDA one decode step (forward, argmax, position + 1) is captured in a CUDA graph and replayed,
so the figure is the GPU's time, not Python's; if capture fails the steps run eagerly and the row
says so. Times are medians over repeats, taken with device events on CUDA and wall clock on CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Generator:
    """Static-cache prefill and one-token decode steps of a model, with fixed buffers."""

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, gen_len: int, device: torch.device,
                 seed: int = 0):
        from transformers import StaticCache

        self.model, self.prompt_len = model, prompt_len
        vocab = model.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen_len)
        self.prompt_pos = torch.arange(prompt_len, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)

    def rewind(self, position: int) -> None:
        """Next write at `position`: the cache_position argument, and the write counter that newer
        transformers keep inside each static cache layer (a tensor, so graph replays advance it)."""
        self.pos.fill_(position)
        for layer in getattr(self.cache, "layers", []):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(position)
            elif isinstance(length, int):
                layer.cumulative_length = position

    def prefill(self) -> None:
        self.rewind(0)
        out = self.model(input_ids=self.ids, past_key_values=self.cache, cache_position=self.prompt_pos, use_cache=True)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.rewind(self.prompt_len)

    def step(self) -> None:
        out = self.model(input_ids=self.token, past_key_values=self.cache, cache_position=self.pos, use_cache=True)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)


def _capture(gen: _Generator) -> tuple[Callable[[], None], str | None]:
    """A replayable decode step in a CUDA graph, or the eager step and why capture failed."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                gen.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gen.step()
        return graph.replay, None
    except Exception as exc:  # reported in the row; the eager numbers stand alone then
        torch.cuda.synchronize()
        return gen.step, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


@torch.no_grad()
def measure(model: nn.Module, device: torch.device, batches: list[int], prompt_len: int, gen_len: int,
            repeats: int = 3, graphs: bool = True) -> list[dict]:
    """One row per batch size: prefill and decode tokens/s, peak device memory (CUDA)."""
    rows = []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        gen = _Generator(model, batch, prompt_len, gen_len, device)
        prefill_s = timed(gen.prefill, device, repeats)
        step, note = (_capture(gen) if graphs and device.type == "cuda" else (gen.step, None))

        def decode(gen=gen) -> None:
            gen.rewind(prompt_len)
            for _ in range(gen_len):
                step()

        decode_s = timed(decode, device, repeats) / gen_len
        row = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
               "prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
               "decode_ms_per_step": decode_s * 1e3, "decode_tokens_per_s": batch / decode_s,
               "cuda_graph": device.type == "cuda" and graphs and note is None}
        if note:
            row["cuda_graph_note"] = note
        if device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        del gen
    return rows
