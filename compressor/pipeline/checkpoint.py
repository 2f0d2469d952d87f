"""The run directory of a pipeline: one file per finished block (its parameters, the methods'
records, its metadata and what each method carries to the next block), the inputs of the next
block, and a small state file, all written atomically so a killed run resumes exactly.

Every checkpoint file carries the sha256 of its own contents (tensor names, dtypes, shapes and
bytes, and its metadata) in its header; a file that no longer matches it, or a state file that
cannot be read, is damage (a bad disk, a stray edit): the run is then recomputed from its first
block, said on the progress line, rather than resumed from data that is not what was saved."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CompressorError
from compressor.safetensors_file import read_header, read_tensors, write_tensors
from compressor.util import write_atomic

STATE = "run.json"
RECORD_PREFIX = "__record__."
CARRY_PREFIX = "__carry__."
DIGEST = "sha256"


class DamagedCheckpoint(CompressorError):
    """A checkpoint file of the run directory is not what was saved."""


class RunDirectory:
    def __init__(self, path: Path, fingerprint: str, num_blocks: int, rank: int | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.num_blocks = num_blocks
        self.rank = rank  # data-parallel runs keep one inputs file per process

    # -- state
    def exists(self) -> bool:
        return (self.path / STATE).is_file()

    def completed(self) -> int:
        """Number of finished blocks recorded; checks the run was started with the same settings."""
        try:
            state = json.loads((self.path / STATE).read_text())
            completed = state["completed"]
            fingerprint = state["fingerprint"]
        except (OSError, ValueError, TypeError, KeyError):
            raise DamagedCheckpoint(f"the state file of the run in {self.path} is damaged",
                                    "pass --restart to discard the run") from None
        if not isinstance(completed, int) or isinstance(completed, bool) or not 0 <= completed <= self.num_blocks:
            raise DamagedCheckpoint(f"the state file of the run in {self.path} is damaged",
                                    "pass --restart to discard the run")
        if fingerprint != self.fingerprint:
            raise CompressorError(
                f"the interrupted run in {self.path} was started with other settings, model or data",
                "rerun with the original settings, or pass --restart to discard it")
        return completed

    def resume_point(self, completed: int, needs_inputs: bool) -> int:
        """The block a resume starts at: after `completed` blocks, or, where the inputs are checkpointed
        only now and then (InputsSchedule), at the last block whose inputs were saved (the blocks after
        it are computed again). Every file the resume reads is checked (DamagedCheckpoint if not intact)."""
        start = completed
        if needs_inputs:
            while start and not self.hidden_file(start).is_file():
                start -= 1
        for index in range(start):
            self._read(index)
        if start and needs_inputs:
            _read_checked(self.hidden_file(start))
        return start

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_state(0)

    def _write_state(self, completed: int) -> None:
        data = {"fingerprint": self.fingerprint, "num_blocks": self.num_blocks, "completed": completed}
        write_atomic(self.path / STATE, json.dumps(data, indent=2).encode())

    # -- blocks
    def block_file(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def hidden_file(self, index: int) -> Path:
        suffix = "" if self.rank is None else f"-rank{self.rank}"
        return self.path / f"inputs-{index:04d}{suffix}.safetensors"

    def save_block(self, index: int, params: dict[str, torch.Tensor], records: dict[str, dict[str, torch.Tensor]],
                   meta: dict[str, Any] | None = None, carries: list[dict[str, Any]] | None = None) -> None:
        """Persist block `index` and mark it done (after its successor's inputs are saved)."""
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
        for linear, record in records.items():
            for key, value in record.items():
                tensors[f"{RECORD_PREFIX}{linear}::{key}"] = value.cpu().contiguous()
        plain_carries = []
        for i, carry in enumerate(carries or []):
            plain = {}
            for key, value in carry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{CARRY_PREFIX}{i}::{key}"] = value.detach().cpu().contiguous()
                else:
                    plain[key] = value
            plain_carries.append(plain)
        metadata = {"meta": json.dumps(meta or {}, sort_keys=True), "carries": json.dumps(plain_carries, sort_keys=True)}
        _save_atomic(tensors, self.block_file(index), metadata)
        self._write_state(index + 1)
    def save_inputs(self, index: int, hidden: torch.Tensor, fp_hidden: torch.Tensor | None = None) -> None:
        tensors = {"hidden": hidden.cpu().contiguous()}
        if fp_hidden is not None:
            tensors["fp_hidden"] = fp_hidden.cpu().contiguous()
        _save_atomic(tensors, self.hidden_file(index))

    def drop_inputs(self, index: int) -> None:
        self.hidden_file(index).unlink(missing_ok=True)

    def drop_other_inputs(self, keep: int) -> None:
        """This process's inputs files but block `keep`'s: those an earlier attempt left past the point
        a run starts from again (so a kept directory never ends with stale activations)."""
        for index in range(self.num_blocks + 1):
            if index != keep:
                self.drop_inputs(index)

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]],
                                                 dict[str, Any]]:
        """(parameters, records, metadata) of a finished block."""
        tensors, metadata = self._read(index)
        params, records = {}, {}
        for k, v in tensors.items():
            if k.startswith(RECORD_PREFIX):
                linear, key = k[len(RECORD_PREFIX):].split("::")
                records.setdefault(linear, {})[key] = v
            elif k.startswith("param."):
                params[k[len("param."):]] = v
        return params, records, json.loads(metadata.get("meta", "{}"))

    def load_carry(self, index: int) -> list[dict[str, Any]]:
        """What each method carried on after block `index`."""
        tensors, metadata = self._read(index)
        carries = json.loads(metadata.get("carries", "[]"))
        for k, v in tensors.items():
            if k.startswith(CARRY_PREFIX):
                i, key = k[len(CARRY_PREFIX):].split("::")
                carries[int(i)][key] = v
        return carries

    def _read(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return _read_checked(self.block_file(index))

    def load_inputs(self, index: int) -> dict[str, torch.Tensor] | None:
        """{"hidden": ..., and "fp_hidden" where the float model's path is tracked too}."""
        f = self.hidden_file(index)
        return _read_checked(f)[0] if f.exists() else None


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of what a checkpoint file holds: its metadata and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():  # hashed in place: no copy of the bytes (a 512 × 2048 block input is 8.6 GB)
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    damaged = DamagedCheckpoint(f"checkpoint {path.name} in {path.parent} is damaged (its contents do not match "
                                "the hash saved with them)", "pass --restart to discard the run")
    try:
        _, metadata = read_header(path)
        tensors = read_tensors(path)
    except (CompressorError, OSError):
        raise damaged from None
    metadata = dict(metadata)
    saved = metadata.pop(DIGEST, None)
    if saved is None or saved != digest(tensors, metadata):
        raise damaged
    return tensors, metadata


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    metadata = dict(metadata or {})
    metadata[DIGEST] = digest(tensors, metadata)
    tmp = path.with_name(path.name + ".part")
    write_tensors(tmp, tensors, metadata)  # plain writes: a full disk is an OSError like any other
    tmp.replace(path)


class InputsSchedule:
    """When a finished block's successor's inputs are checkpointed. Block files are small and written
    after every block; the inputs are the calibration activations (8.6 GB per block for 512 × 2048
    tokens of an 8B model: 15 s per block of copying, hashing and writing on the H200 machine, five
    times the block's own work). Up to SMALL_BYTES they go with every block; past it, once the blocks
    since the last save took RATIO times as long as that save: the writes then cost about 1/RATIO of
    the run, and a killed run computes again at most that stretch of blocks. Data-parallel runs save
    every block (every process must make the same choice)."""

    SMALL_BYTES = 256 << 20
    RATIO = 10.0

    def __init__(self, every_block: bool):
        self.every_block = every_block
        self.last_save_s: float | None = None  # set by the checkpoint thread
        self.since = time.perf_counter()

    def due(self, nbytes: int) -> bool:
        now = time.perf_counter()
        if (self.every_block or nbytes <= self.SMALL_BYTES or self.last_save_s is None
                or now - self.since >= self.RATIO * self.last_save_s):
            self.since = now
            return True
        return False

    def saved(self, seconds: float) -> None:
        self.last_save_s = seconds
