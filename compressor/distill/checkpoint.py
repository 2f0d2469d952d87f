"""Checkpoints of a distillation run, beside its output in `.OUT.distill/latest`: the student's
(and projection's) parameters, the optimizer's moments, the RNG states and a JSON state (step,
loss curve, evaluations, the run's fingerprint). Everything is safetensors or JSON, written into
a temporary directory that replaces the previous checkpoint in one atomic exchange, so a kill at
any moment leaves a complete checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from compressor.errors import CompressorError
from compressor.outputs import atomic_dir
from compressor.safetensors_file import read_tensors

STATE, MODEL, OPTIMIZER, RNG = "state.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"


def checkpoint_dir(out: Path) -> Path:
    return Path(out).with_name(f".{Path(out).name}.distill")


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state dict's tensors, flat, and its param groups as JSON-able dicts."""
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, entries in state["state"].items() for key, value in entries.items()}
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


class TrainingCheckpoint:
    def __init__(self, out: Path, fingerprint: str):
        self.root = checkpoint_dir(out)
        self.path = self.root / "latest"
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return (self.path / STATE).is_file()

    def save(self, state: dict[str, Any], model: dict[str, torch.Tensor], optimizer: dict) -> None:
        """`optimizer`: an optimizer state dict with full tensors."""
        tensors, groups = optimizer_tensors(optimizer)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.path, overwrite=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / MODEL))
            save_file(tensors, str(tmp / OPTIMIZER))
            save_file(rng_tensors(), str(tmp / RNG))
            (tmp / STATE).write_text(json.dumps({**state, "fingerprint": self.fingerprint, "param_groups": groups},
                                                indent=1))

    def state(self) -> dict[str, Any]:
        """The saved state, after checking the run was started with the same settings and inputs."""
        state = json.loads((self.path / STATE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise CompressorError(
                f"the interrupted distillation in {self.root} was started with other settings, models or data",
                "rerun with the original settings, or pass --restart to discard it")
        return state

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
        """(state, model tensors, optimizer state dict); the RNGs are restored in place."""
        state = self.state()
        optimizer = optimizer_state(read_tensors(self.path / OPTIMIZER), state["param_groups"])
        restore_rng(read_tensors(self.path / RNG))
        return state, read_tensors(self.path / MODEL), optimizer
