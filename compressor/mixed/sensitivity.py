"""The sensitivity directory: the run directory of one sensitivity pass, kept as the cache of every
later search and build (each block's parameters after the pass's transforms, every candidate's
record), and `sensitivity.json`: per linear and candidate format, the Hessian loss estimate and the
bits per weight as stored, plus the probe measurements of inter-block dependencies.

It is keyed by everything that changes its numbers (model, transforms, quantizer settings,
candidates, calibration tokens, dtypes), so a second budget on the same settings reuses it and a
changed setting never reads a stale one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor import __version__
from compressor.calib.data import TokenSet
from compressor.errors import CompressorError
from compressor.methods.base import Method, Record
from compressor.methods.quant.candidates import parse_format
from compressor.methods.quant.mixed import (CANDIDATE_SEPARATOR, CandidateConfig, Sensitivity, kept_record,
                                            restored)
from compressor.models.assets import cache_dir
from compressor.models.loading import LoadedModel
from compressor.pipeline.checkpoint import RunDirectory
from compressor.pipeline.distributed import World
from compressor.pipeline.progress import Progress
from compressor.pipeline.sequential import SequentialPipeline
from compressor.util import fingerprint, write_atomic

TABLE = "sensitivity.json"
TABLE_VERSION = 1


@dataclass
class LinearScores:
    name: str  # module name in the model, e.g. model.layers.3.mlp.down_proj
    block: int
    module: str  # name inside the block, e.g. mlp.down_proj
    group: str
    out_features: int
    in_features: int
    scores: dict[str, float]  # format → ½·tr(ΔW H ΔWᵀ)
    bits: dict[str, float]  # format → bits per weight as the artifact stores it

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class SensitivityTable:
    linears: list[LinearScores]
    settings: dict[str, Any]  # model, methods, calibration, fingerprint
    notes: list[str] = field(default_factory=list)
    interactions: dict[str, Any] | None = None  # compressor.mixed.interactions.Interactions.to_json()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return max(l.block for l in self.linears) + 1

    def save(self, directory: Path) -> None:
        data = {"version": TABLE_VERSION, "settings": self.settings, "notes": self.notes,
                "timings": self.timings, "interactions": self.interactions,
                "linears": [asdict(l) for l in self.linears]}
        write_atomic(Path(directory) / TABLE, (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, directory: Path) -> "SensitivityTable":
        path = Path(directory) / TABLE
        try:
            data = json.loads(path.read_text())
            return cls([LinearScores(**l) for l in data["linears"]], data["settings"], data.get("notes", []),
                       data.get("interactions"), data.get("timings", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CompressorError(f"cannot read {path} ({exc})", "delete the directory and run the pass again") \
                from None


def sensitivity_fingerprint(loaded: LoadedModel, transforms: list[Method], config: CandidateConfig,
                            tokens: TokenSet, dtype: torch.dtype, hessian_dtype: torch.dtype, batch_size: int,
                            device: str) -> str:
    described = [m.describe() for m in transforms] + [{"name": Sensitivity.name, "config": config.model_dump(mode="json")}]
    return fingerprint(__version__, loaded.source_hash, described, tokens.sha256, str(dtype), str(hessian_dtype),
                       batch_size, torch.device(device).type)


def check_directory(directory: Path) -> None:
    """A --sensitivity directory is new, or one a sensitivity pass wrote: never a file, and never a
    directory of other files (a model, an artifact) that the pass would write its blocks into."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CompressorError(f"--sensitivity {directory} is a file, not a directory",
                              "pass a new directory, or one that `compress sensitivity` wrote")
    if directory.is_dir() and any(directory.iterdir()) and not any(
            (directory / name).is_file() for name in (TABLE, "run.json")):
        raise CompressorError(f"--sensitivity {directory} holds files that no sensitivity pass wrote",
                              "pass a new directory, or one that `compress sensitivity` wrote")


def default_directory(key: str) -> Path:
    return cache_dir() / "sensitivity" / key[:20]


def candidate_source(directory: Path, blocks: int):
    """(parameters, candidate records) of block i, as the pass saved them."""
    run = RunDirectory(Path(directory), "", blocks)

    def source(index: int) -> tuple[dict[str, torch.Tensor], dict[str, Record]]:
        params, records, _ = run.load_block(index)
        return params, records

    return source


def finished(directory: Path, key: str) -> bool:
    """A complete table computed with these settings is there."""
    path = Path(directory) / TABLE
    if not path.is_file():
        return False
    table = SensitivityTable.load(directory)
    if table.settings.get("fingerprint") != key:
        raise CompressorError(f"{directory} holds sensitivities computed with other settings, model or data",
                              "pass another --sensitivity directory, or delete this one")
    return True


def run_pass(loaded: LoadedModel, transforms: list[Method], config: CandidateConfig, tokens: TokenSet,
             directory: Path, key: str, settings: dict[str, Any], *, device: str, batch_size: int,
             hessian_dtype: torch.dtype, progress: Progress) -> SensitivityTable:
    """Run (or resume) the sensitivity pass into `directory` and write its table."""
    started = time.perf_counter()
    blocks = loaded.adapter.blocks(loaded.model)
    run = RunDirectory(Path(directory), key, len(blocks))
    resume = run.exists() and run.completed() > 0  # completed() refuses a run of other settings
    method = Sensitivity(config)
    chain = [*transforms, method]
    for m in chain:
        m.check(loaded.model, loaded.adapter)
    pipeline = SequentialPipeline(loaded.model, loaded.adapter, chain, run, tokens, device=device,
                                  batch_size=batch_size, hessian_dtype=hessian_dtype, progress=progress,
                                  world=World())
    pipeline.execute(resume=resume)
    table = SensitivityTable(_scores(loaded, config, pipeline.block_meta), {**settings, "fingerprint": key},
                             timings={"sensitivity_pass_s": time.perf_counter() - started})
    table.save(directory)
    return table


def _scores(loaded: LoadedModel, config: CandidateConfig, block_meta: list[dict]) -> list[LinearScores]:
    model, adapter = loaded.model, loaded.adapter
    rows = []
    for index, (block, meta) in enumerate(zip(adapter.blocks(model), block_meta)):
        linears = adapter.block_linears(block)
        for group in adapter.block_groups(block):
            for name in group.linears:
                linear = linears[name]
                scores = meta["sensitivity"][name]
                bits = {f: parse_format(f).bits_per_weight(linear.out_features, linear.in_features, config.sym,
                                                           config.scale_dtype) for f in scores}
                rows.append(LinearScores(adapter.block_prefix(model, index) + name, index, name, group.name,
                                         linear.out_features, linear.in_features, scores, bits))
    return rows


class CandidateWeights:
    """The float weight of any linear in any candidate format, read from the pass's records
    (the blocks most recently asked for stay in memory)."""

    def __init__(self, directory: Path, table: SensitivityTable, keep_blocks: int = 2):
        self.source = candidate_source(directory, table.blocks)
        self.where = {l.name: (l.block, l.module) for l in table.linears}
        self.keep_blocks = keep_blocks
        self.loaded: dict[int, tuple[dict[str, torch.Tensor], dict[str, Record]]] = {}

    def block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Record]]:
        if index not in self.loaded:
            while len(self.loaded) >= self.keep_blocks:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[index] = self.source(index)
        return self.loaded[index]

    def __call__(self, linear: str, fmt: str) -> torch.Tensor:
        index, name = self.where[linear]
        params, records = self.block(index)
        if parse_format(fmt).kept:
            return restored(kept_record(params[f"{name}.weight"].float()), torch.float32)
        return restored(records[f"{name}{CANDIDATE_SEPARATOR}{fmt}"], torch.float32)
