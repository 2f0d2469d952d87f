"""Run a causal LM straight from a packed artifact.

Weights outside the decoder blocks (embeddings, final norm, head) and tensors kept raw are
decoded once. Each block's coded weights stay packed on the device; a forward pre-hook
decodes them into one buffer shared by all blocks just before the block runs, so device
memory holds the packed model plus one block in bf16. The weights a block sees are bit for
bit the original ones, so outputs are identical to the unpacked model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.formats import packed as packed_format
from compressor.kernels import entropy_decode
from compressor.codecs import lanes, native
from compressor.codecs.dfloat import PackedTensor, unpack_tensor
from compressor.models.adapters import adapter_for_config


@dataclass
class BlockWeights:
    """One block's coded tensors: where each goes in the shared buffer, and how to decode them."""
    entries: list[tuple[str, PackedTensor, int]]  # (parameter name inside the block, tensor, buffer offset)
    numel: int
    plan: entropy_decode.DecodePlan | None = None


@dataclass
class PackedRunner:
    model: nn.Module
    buffer: torch.Tensor
    blocks: list[BlockWeights]
    backend: str
    stats: dict = field(default_factory=dict)

    def decode_block(self, index: int) -> None:
        block = self.blocks[index]
        out = self.buffer.view(torch.int16)
        if block.plan is not None:  # triton, cuda or torch
            entropy_decode.decode(block.plan, out, self.backend)
            return
        if self.backend != "native":
            return
        for _, p, offset in block.entries:  # native: the C decoder, tensor by tensor
            m, a = p.meta, p.arrays
            layout = lanes.Layout(int(m["lanes"]), int(m["steps"]), int(m["table_log"]))
            stream = lanes.CodedStream(a["words"].view(np.uint32), a["lane_bits"].view(np.uint16),
                                       a["norm"].view(np.uint16), int(m["count"]))
            v = lanes.decode_fast(stream, layout, a["values"].view(np.uint16), int(m["mode"]), a.get("raw"),
                                  a.get("signs"))
            out[offset:offset + v.size].copy_(torch.from_numpy(v.view(np.int16)))


def choose_backend(device: torch.device, backend: str) -> str:
    if backend != "auto":
        if backend == "cuda":
            from compressor.kernels import entropy_decode_cuda

            if not (device.type == "cuda" and entropy_decode_cuda.available()):
                raise CompressorError("the cuda decoder needs a CUDA device and cupy", "use --backend triton")
        if backend == "triton" and not (device.type == "cuda" and entropy_decode.triton_available()):
            raise CompressorError("the triton decoder needs a CUDA device and triton", "use --backend torch")
        if backend == "native" and (device.type != "cpu" or native.library() is None):
            raise CompressorError("the native decoder runs on CPU with a C compiler", "use --backend torch")
        return backend
    if device.type == "cuda":
        return "triton" if entropy_decode.triton_available() else "torch"
    return "native" if native.library() is not None else "torch"


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def attach_packed_blocks(model: nn.Module, blocks: list[nn.Module], block_tensors: list[dict[str, PackedTensor]],
                         device: torch.device, backend: str, dtype: torch.dtype = torch.bfloat16) -> PackedRunner:
    """Point each block's coded parameters at a shared buffer and decode them in a pre-hook."""
    weights, plans_by_source = [], {}
    for tensors in block_tensors:
        entries, offset = [], 0
        for name, p in sorted(tensors.items()):
            entries.append((name, p, offset))
            offset += int(np.prod(p.meta["shape"]))
        weights.append(BlockWeights(entries, offset))
    size = max((w.numel for w in weights), default=0)
    buffer = torch.empty(size, dtype=dtype, device=device)
    runner = PackedRunner(model, buffer, weights, backend)
    for index, (block, w) in enumerate(zip(blocks, weights)):
        if backend in ("triton", "cuda", "torch") and w.entries:
            key = id(block_tensors[index])  # blocks given the very same packed tensors share one plan
            if key not in plans_by_source:
                specs = [packed_format.stream_spec(p, offset) for _, p, offset in w.entries]
                plans_by_source[key] = entropy_decode.build_plan(specs, device)
            w.plan = plans_by_source[key]
        for name, p, offset in w.entries:
            n = int(np.prod(p.meta["shape"]))
            _set_parameter(block, name, buffer[offset:offset + n].view(p.meta["shape"]))
        block.register_forward_pre_hook(lambda module, args, i=index: runner.decode_block(i))
    plans = list(plans_by_source.values())
    runner.stats = {"blocks": len(weights), "buffer_bytes": buffer.numel() * buffer.element_size(),
                    "packed_block_bytes": sum(p.nbytes() for w in weights for _, p, _ in w.entries),
                    "plan_bytes": sum(p.nbytes() for p in plans)}
    return runner


def _decodable(p: PackedTensor) -> bool:
    m = p.meta
    return m["kind"] == "coded" and m["dtype"] in ("bfloat16", "float16") and int(m.get("mode", 0)) in (1, 2)


def load_packed(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> PackedRunner:
    """A causal LM whose decoder blocks decode their packed weights just before running."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compressor.models.loading import read_config

    path, device = Path(path), torch.device(device)
    packed_format.check_artifact(path)
    backend = choose_backend(device, backend)
    config = read_config(path)
    adapter = adapter_for_config(config)
    tensors: dict[str, PackedTensor] = {}
    for f in sorted(path.glob("*" + packed_format.SUFFIX)):
        tensors.update(packed_format.read_packed_file(f)[1])
    dtypes = {p.meta["dtype"] for p in tensors.values() if _decodable(p)}
    if len(dtypes) != 1:
        raise CompressorError(f"{path} has no single 16-bit float weight dtype to run in ({sorted(dtypes)})",
                              "pack the model with --dtype bfloat16")
    dtype = getattr(torch, dtypes.pop())
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    blocks = list(adapter.blocks(model))
    prefixes = [adapter.block_prefix(model, i) for i in range(len(blocks))]
    block_tensors: list[dict[str, PackedTensor]] = [{} for _ in blocks]
    resident = {}
    for name, p in tensors.items():
        index = next((i for i, pre in enumerate(prefixes) if name.startswith(pre)), None)
        if index is not None and _decodable(p):
            block_tensors[index][name[len(prefixes[index]):]] = p
        else:
            try:
                resident[name] = unpack_tensor(p).to(device)
            except lanes.CorruptStream as exc:
                raise CompressorError(f"{path}: tensor {name!r} is corrupted ({exc})",
                                      "restore the artifact from a good copy") from None
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        resident.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(resident, strict=False, assign=True)
    coded = {prefixes[i] + n for i, t in enumerate(block_tensors) for n in t}
    missing = [k for k in missing if k not in coded and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CompressorError(f"packed tensors do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", "the artifact was packed from another model")
    runner = attach_packed_blocks(model, blocks, block_tensors, device, backend, dtype)
    if tied:
        model.tie_weights()
    model.to(device)
    model.eval()
    runner.stats["resident_bytes"] = sum(t.numel() * t.element_size() for t in resident.values())
    return runner
