"""Training text for distillation: every non-overlapping window of the sources, and an order over
them that is a pure function of (seed, position), so a resumed run reads exactly what the killed
one would have read next, and any number of processes split each batch the same way.

Sequence position p (counted over the whole run) lives in epoch p // N at place p % N of that
epoch's permutation of the N windows; step s, micro-batch m of process r reads positions
((s * accum + m) * world + r) * batch + [0, batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compressor.calib.data import resolve_data, tensor_hash, token_stream
from compressor.errors import CompressorError
from compressor.progress import Progress


@dataclass
class TrainingWindows:
    windows: torch.Tensor  # [N, seq_len] int64
    sources: list[dict]  # per source: ref, tokens, windows
    seed: int

    @property
    def sha256(self) -> str:
        return tensor_hash(self.windows)

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    def describe(self) -> dict:
        return {"sources": self.sources, "windows": self.windows.shape[0], "seq_len": self.windows.shape[1],
                "tokens": self.tokens, "sha256": self.sha256, "seed": self.seed}

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.windows.shape[0], generator=generator)

    def batch(self, step: int, micro: int, rank: int, batch: int, accum: int, world: int) -> torch.Tensor:
        start = ((step * accum + micro) * world + rank) * batch
        n = self.windows.shape[0]
        rows, epoch, order = [], None, None
        for position in range(start, start + batch):
            if position // n != epoch:
                epoch = position // n
                order = self.permutation(epoch)
            rows.append(order[position % n])
        return self.windows[torch.stack(rows)]


def training_windows(refs: list[str], tokenizer, seq_len: int, seed: int, text_field: str = "text",
                     log: Callable[[str], None] = lambda _: None) -> TrainingWindows:
    """The windows of every source (a reference text's calibration split, or a file), in order."""
    if seq_len < 2:
        raise CompressorError(f"--seq-len must be at least 2 (got {seq_len})", "raise --seq-len")
    parts, sources = [], []
    for ref in refs:
        stream = _stream(resolve_data(ref, "calib", log), tokenizer, text_field)
        count = stream.numel() // seq_len
        parts.append(stream[:count * seq_len].view(count, seq_len))
        sources.append({"ref": ref, "tokens": int(stream.numel()), "windows": count})
    windows = torch.cat(parts)
    return TrainingWindows(windows, sources, seed)


_STREAMS: dict[tuple, torch.Tensor] = {}


def _stream(path: Path, tokenizer, text_field: str) -> torch.Tensor:
    """A source's tokens, remembered for this process (runs that distill several students from
    one text tokenize it once)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, text_field, type(tokenizer).__name__,
           hash(frozenset(tokenizer.get_vocab().items())))
    if key not in _STREAMS:
        _STREAMS[key] = token_stream(path, tokenizer, text_field)
    return _STREAMS[key]


SAMPLE_TOP_K = 50  # teacher samples: top-k sampling at temperature 1
SAMPLE_BATCH = {"cpu": 16, "cuda": 512}  # sequences sampled at once (a GPU is idle below hundreds)


@torch.no_grad()
def teacher_samples(model: torch.nn.Module, bos: int, tokens: int, seq_len: int, seed: int,
                    progress: Progress | None = None) -> torch.Tensor:
    """About `tokens` tokens of text sampled from the teacher (`--generate-data`), as windows of
    `seq_len` that each start at BOS: top-k sampling (transformers' generate) under a seed of its
    own, so the same teacher, device and seed give the same windows (a resumed run reads the same data)."""
    from transformers import GenerationConfig

    count = -(-tokens // seq_len)
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=True, top_k=SAMPLE_TOP_K, top_p=1.0, temperature=1.0,
                              max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=bos,
                              eos_token_id=None, bos_token_id=bos)
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 7919 + 17)
        batch = SAMPLE_BATCH.get(device.type, SAMPLE_BATCH["cpu"])
        with (progress or Progress()).task("sampling teacher text: batches", total=-(-count // batch)) as bar:
            for start in range(0, count, batch):
                rows = torch.full((min(batch, count - start), 1), bos, dtype=torch.long, device=device)
                out.append(model.generate(rows, attention_mask=torch.ones_like(rows), generation_config=config).cpu())
                bar.advance()
    return torch.cat(out)


def with_teacher_samples(data: TrainingWindows, samples: torch.Tensor) -> TrainingWindows:
    """The training windows with the teacher's samples as one more source."""
    source = {"ref": "teacher samples (--generate-data)", "tokens": int(samples.numel()),
              "windows": int(samples.shape[0]), "top_k": SAMPLE_TOP_K, "temperature": 1.0}
    return TrainingWindows(torch.cat([data.windows, samples]), [*data.sources, source], data.seed)
