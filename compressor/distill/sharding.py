"""Fully sharded data parallelism for `compress distill` (`--fsdp`, or `accelerate launch
--use_fsdp`): the student, its gradients and AdamW's moments are split over the processes, so a
student too big for one device trains on several.

torch's FSDP2 (`fully_shard`) shards one unit per decoder block and one root unit (the
`DistillModule`: embeddings, final norm, output head, hidden-state projection). The root is
gathered for its whole forward, which is where the fused KL reads the head's weight directly,
so the KL needs no change; its gradient reaches the root unit's reduce-scatter like any other.
We shard here rather than through `accelerator.prepare` because accelerate enables FSDP only for
GPU process groups (CPU/gloo stays DDP) and gives the output head a unit of its own that the
fused KL, which never calls the head's forward, would read while still sharded.

The teacher is not sharded: it holds no gradients or optimizer state (2 bytes a parameter in bf16
against the student's 16 in fp32 weights, gradients and two moments), so a teacher that runs on
one device leaves room for any student that fits sharded; sharding it would add an all-gather per
block to every teacher forward.

Checkpoints and the written student hold full tensors (gathered block by block, kept by the first
process only) in the same layout as unsharded runs; a resume reads them on every process and keeps
each process's shard.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def fsdp_requested(accelerator, wanted: bool) -> bool:
    """--fsdp, or an `accelerate launch --use_fsdp` configuration; needs several processes."""
    from accelerate.utils import DistributedType

    configured = accelerator.distributed_type == DistributedType.FSDP or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return (wanted or configured) and accelerator.num_processes > 1


def reshard_after_forward(accelerator) -> bool:
    """accelerate's setting (a `--fsdp_reshard_after_forward false` config keeps blocks gathered
    between forward and backward: faster, more memory); resharding by default."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    value = getattr(plugin, "reshard_after_forward", True)
    return value if isinstance(value, bool) else str(value).upper() not in ("NO_SHARD", "SHARD_GRAD_OP", "FALSE")


def shard(root: nn.Module, blocks: list[nn.Module], device: torch.device, reshard: bool = True) -> None:
    """Shards each block, then the root (everything left), over all processes, in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=mesh)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for a tensor and its aliases (tied weights), sharded or not."""
    local = tensor.to_local() if is_sharded(tensor) else tensor
    return local.data_ptr(), tuple(tensor.shape)


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of the tensors, one at a time (a collective for sharded ones: every process
    calls it in the same order); only processes with `keep` hold the result."""
    out = {}
    for name, tensor in tensors.items():
        full = tensor.full_tensor() if is_sharded(tensor) else tensor
        if keep:
            out[name] = full.detach().cpu()
        del full
    return out


def local_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` placed like `reference`: this process's shard when the reference is sharded."""
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements,
                             src_data_rank=None)
