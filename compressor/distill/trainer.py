"""The distillation loop on accelerate: the same code runs on a CPU, one GPU, or several processes
(`accelerate launch` / `torchrun`: DDP, every process reads its own part of each batch; with
`--fsdp` the student is fully sharded instead, see distill.sharding).

Each micro-batch: the teacher's final hidden states (no gradient, bf16 weights on GPUs), the
student's, and the fused chunked KL between their logits (distill.kl) plus, optionally, an MSE
between the teacher's final hidden states and a learned projection of the student's. AdamW with
linear warm-up and cosine decay (the learning rate is a function of the step, so nothing but the
step needs saving for it), gradient accumulation, clipping, bf16 autocast on GPUs.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compressor.distill.data import TrainingWindows
from compressor.distill.kl import KLSettings, chunked_metrics, fused_kl
from compressor.distill.settings import DistillSettings
from compressor.distill.sharding import gathered, local_like, reshard_after_forward, shard, storage_key
from compressor.models.adapters import Adapter


def softcap(model: nn.Module, adapter: Adapter) -> float | None:
    return getattr(adapter.text_config(model.config), "final_logit_softcapping", None)


def final_hidden(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output after its final norm (what the head reads), [batch, seq, hidden]."""
    return adapter.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state


def enable_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in the backward pass (any block class, sliced ones too)."""
    for block in blocks:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False,
                                                                             **kwargs)


def learning_rate(step: int, total: int, settings: DistillSettings) -> float:
    warmup = int(settings.warmup * total)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


EVAL_BATCH = 8  # held-out windows per forward pass


class DistillModule(nn.Module):
    """The trainable part: the student and the optional hidden-state projection. Its forward
    returns the loss, so data-parallel wrappers see every parameter used inside one call."""

    def __init__(self, student: nn.Module, adapter: Adapter, kl: KLSettings, hidden_weight: float,
                 teacher_hidden: int, dtype: torch.dtype, compiled: bool):
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.kl, self.hidden_weight, self.dtype, self.compiled = kl, hidden_weight, dtype, compiled
        width = adapter.text_config(student.config).hidden_size
        self.projection = nn.Linear(width, teacher_hidden, bias=False) if hidden_weight else None
        if self.projection is not None and width == teacher_hidden:
            nn.init.eye_(self.projection.weight)

    def forward(self, ids: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                metrics: KLSettings | None = None):
        """(loss, KL, MSE) of a training batch; with `metrics`, (summed NLL of the next tokens,
        summed KL) of a held-out batch whose teacher states drop the last position. Evaluation
        goes through forward too, so a sharded student gathers its weights the same way."""
        if metrics is not None:
            hs = final_hidden(self.student, self.adapter, ids)[:, :-1].flatten(0, 1)
            return chunked_metrics(hs, self.adapter.head(self.student).weight, teacher_hidden, teacher_head,
                                   ids[:, 1:].flatten(), metrics, self.dtype)
        hs = final_hidden(self.student, self.adapter, ids).flatten(0, 1)
        ht = teacher_hidden.flatten(0, 1)
        with torch.autocast(hs.device.type, enabled=False):
            kl = fused_kl(hs, self.adapter.head(self.student).weight, ht, teacher_head, self.kl, self.dtype,
                          self.compiled)
            loss, mse = kl, torch.zeros((), device=hs.device)
            if self.projection is not None:
                target = ht.float()
                mse = (self.projection(hs.float()) - target).pow(2).mean() / target.pow(2).mean()
                loss = loss + self.hidden_weight * mse
        return loss, kl.detach(), mse.detach()


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over processes
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # time inside optimizer steps (no evaluation or checkpoints)


class Trainer:
    def __init__(self, accelerator, teacher: nn.Module, teacher_adapter: Adapter, student: nn.Module,
                 student_adapter: Adapter, data: TrainingWindows, settings: DistillSettings, eval_ids: torch.Tensor,
                 sharded: bool = False):
        self.accelerator, self.settings, self.data, self.sharded = accelerator, settings, data, sharded
        self.teacher, self.teacher_adapter = teacher, teacher_adapter
        self.student_adapter = student_adapter
        device = accelerator.device
        cuda = device.type == "cuda"
        self.dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        kl = KLSettings(settings.temperature, settings.top_k, settings.kl_chunk, softcap(student, student_adapter),
                        softcap(teacher, teacher_adapter))
        self.eval_kl = KLSettings(1.0, 0, settings.kl_chunk, kl.student_softcap, kl.teacher_softcap)
        student.requires_grad_(True)
        student.train()
        student.config.use_cache = False
        if settings.gradient_checkpointing:
            enable_checkpointing(student_adapter.blocks(student))
        teacher.requires_grad_(False)
        teacher.eval()
        compiled = settings.compile and cuda
        if compiled:
            mode = None if settings.compile_mode == "default" else settings.compile_mode
            blocks = [*student_adapter.blocks(student), *teacher_adapter.blocks(teacher)]
            allow_block_shapes(blocks)
            for block in blocks:
                block.compile(mode=mode)
        self.teacher_hidden = teacher_adapter.text_config(teacher.config).hidden_size
        module = DistillModule(student, student_adapter, kl, settings.hidden_weight, self.teacher_hidden, self.dtype,
                               compiled)
        if sharded:  # in place, before the optimizer sees the (now sharded) parameters
            shard(module, student_adapter.blocks(student), device, reshard_after_forward(accelerator))
        optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=settings.weight_decay, fused=cuda or None)
        self.module, self.optimizer = (module, optimizer) if sharded else accelerator.prepare(module, optimizer)
        self.teacher = teacher.to(device)
        self.eval_ids = eval_ids
        self._eval_teacher: list[torch.Tensor] | None = None
        self.total_steps = settings.tokens // self.tokens_per_step
        self.history = History()

    @property
    def tokens_per_step(self) -> int:
        s = self.settings
        return s.batch_size * s.grad_accum * self.accelerator.num_processes * s.seq_len

    @property
    def unwrapped(self) -> DistillModule:
        return self.accelerator.unwrap_model(self.module)

    def teacher_head(self) -> torch.Tensor:
        return self.teacher_adapter.head(self.teacher).weight

    def step(self, step: int) -> float:
        """One optimizer step; returns the loss averaged over micro-batches and processes."""
        s, acc = self.settings, self.accelerator
        lr = learning_rate(step, self.total_steps, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=acc.device)
        for micro in range(s.grad_accum):
            ids = self.data.batch(step, micro, acc.process_index, s.batch_size, s.grad_accum,
                                  acc.num_processes).to(acc.device)
            with torch.no_grad():
                teacher_hidden = final_hidden(self.teacher, self.teacher_adapter, ids)
            last = micro == s.grad_accum - 1
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.module.set_requires_gradient_sync(last)
            with acc.no_sync(self.module) if not last and not self.sharded else nullcontext(), acc.autocast():
                loss, kl, _ = self.module(ids, teacher_hidden, self.teacher_head())
                acc.backward(loss / s.grad_accum)
            total += loss.detach() / s.grad_accum
        if s.clip:  # sharded gradients: torch's norm over all shards
            (torch.nn.utils.clip_grad_norm_ if self.sharded else acc.clip_grad_norm_)(self.module.parameters(), s.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(total, reduction="mean"))

    def train(self, start: int, checkpoint_fn, progress) -> None:
        s = self.settings
        every = s.log_every or max(1, self.total_steps // 20)
        with progress.task("distill: steps", total=self.total_steps) as bar:
            bar.advance(start)
            for step in range(start, self.total_steps):
                began = time.perf_counter()
                self.history.losses.append(self.step(step))
                if self.accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                self.history.train_seconds += time.perf_counter() - began
                done = step + 1
                bar.advance()
                if done % every == 0 or done == self.total_steps:
                    rate = (done - start) * self.tokens_per_step / max(self.history.train_seconds, 1e-9)
                    eta = (self.total_steps - done) * self.tokens_per_step / max(rate, 1e-9)
                    progress.log(f"step {done}/{self.total_steps}  loss {self.history.losses[-1]:.4f}  "
                                 f"lr {learning_rate(step, self.total_steps, s):.2e}  {rate / 1000:.1f}k tok/s  "
                                 f"eta {eta:.0f}s")
                if s.eval_every and done % s.eval_every == 0 and done < self.total_steps:
                    self.evaluate(done, progress)
                if done % s.save_every == 0 and done < self.total_steps:
                    checkpoint_fn(done)

    @torch.no_grad()
    def evaluate(self, step: int, progress) -> dict[str, Any]:
        """Held-out perplexity of the student and its KL to the teacher (the first process
        computes and the others wait; a sharded student needs every process, so all compute);
        the teacher's hidden states are computed once."""
        acc = self.accelerator
        result: dict[str, Any] = {}
        if acc.is_main_process or self.sharded:
            module = self.unwrapped
            module.eval()
            batches = [self.eval_ids[i:i + EVAL_BATCH].to(acc.device) for i in range(0, len(self.eval_ids), EVAL_BATCH)]
            if self._eval_teacher is None:
                self._eval_teacher = [final_hidden(self.teacher, self.teacher_adapter, ids)[:, :-1].flatten(0, 1)
                                      for ids in batches]
            nll = kl = 0.0
            with acc.autocast():
                for ids, teacher in zip(batches, self._eval_teacher):
                    n, k = module(ids, teacher, self.teacher_head(), metrics=self.eval_kl)
                    nll, kl = nll + n, kl + k
            if self.sharded:
                module.reshard()  # the root stays gathered after a forward without backward
            module.train()
            tokens = self.eval_ids[:, 1:].numel()
            result = {"step": step, "tokens": step * self.tokens_per_step, "ppl": math.exp(nll / tokens),
                      "kl": kl / tokens}
            if acc.is_main_process:
                self.history.evals.append(result)
                progress.log(f"eval at step {step}: ppl {result['ppl']:.3f}  KL to teacher {result['kl']:.4f}")
        acc.wait_for_everyone()
        return result

    def model_state(self) -> dict[str, torch.Tensor]:
        """Everything trainable (student and projection) for checkpoints, tied weights once, as
        full tensors on the first process (every process must call it: sharded ones gather)."""
        return gathered(unique_state(self.unwrapped), self.accelerator.is_main_process)

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's full state dict, tied weights included (every process calls it; the
        first one gets the tensors)."""
        state = self.unwrapped.student.state_dict()
        full = gathered(unique_state(self.unwrapped.student), self.accelerator.is_main_process)
        if not full:
            return {}
        keys = {name: storage_key(t) for name, t in state.items()}
        by_key = {keys[name]: tensor for name, tensor in full.items()}
        return {name: by_key[key] for name, key in keys.items()}

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with full tensors (a collective when sharded)."""
        state = self.optimizer.state_dict()
        keep = self.accelerator.is_main_process
        full = {index: gathered(entries, keep) for index, entries in state["state"].items()}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, state: dict) -> None:
        """A full-tensor optimizer state dict; each process keeps its shards."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        local = {index: {key: local_like(value, params[int(index)]) if value.dim() else value
                         for key, value in entries.items()} for index, entries in state["state"].items()}
        self.optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})

    def load_model_state(self, tensors: dict[str, torch.Tensor]) -> None:
        module = self.unwrapped
        current = module.state_dict()
        tensors = {k: local_like(v, current[k]) if k in current else v for k, v in tensors.items()}
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        aliases = set(current) - set(unique_state(module))
        if set(missing) - aliases or unexpected:
            raise RuntimeError(f"checkpoint does not match the student (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")


def unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict without the aliases of tied weights (safetensors stores each storage once)."""
    seen, state = set(), {}
    for name, tensor in module.state_dict().items():
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def allow_block_shapes(blocks: list[torch.nn.Module]) -> int:
    """Raise dynamo's recompile limit to the blocks' distinct shapes (plus its default headroom).

    Every block shares one forward's code, so each distinct block shape is one more compiled variant:
    sliced students (SliceGPT, MoDeGPT) have a width per block, past the default limit of 8, after
    which dynamo stops compiling those blocks and every step re-checks guards in eager mode."""
    limit = len({tuple(p.shape for p in b.parameters()) for b in blocks}) + 8
    for option in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, max(getattr(torch._dynamo.config, option), limit))
    return limit
