"""Forward KL from teacher to student logits without ever holding [tokens, vocabulary].

Both models stop at their final hidden states; this computes each chunk of tokens' logits from
them (one GEMM per model), the KL and its gradient for that chunk, turns the gradient straight
into the student's hidden-state and head-weight gradients (two more GEMMs), and drops the chunk.
Full-vocabulary logits of a 64 x 512 batch would be 6.4 GB per model in float32; a chunk of 4096
tokens is 0.4 GB in bf16. The gradients are computed in the forward pass (as fused linear
cross-entropy kernels do) and only scaled in the backward pass.

KL(p_t || p_s) with temperature T, scaled by T^2 so gradients keep their size across T:
  loss = T^2 * mean_tokens sum_v p_t (log p_t - log p_s),  dloss/dz_s = T (p_s - p_t) / tokens.
With top_k, p_t is the teacher's k most likely tokens renormalized (the student's distribution
stays full): what sparse-logit distillation stores, at a fraction of the teacher-side work.
Logit soft-capping (Gemma) is applied to each model as its architecture does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KLSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: the full vocabulary
    chunk: int = 4096  # tokens per chunk
    student_softcap: float | None = None
    teacher_softcap: float | None = None


def _capped(z: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, 1 - t * t  # logits and their derivative


def kl_chunk(zs: torch.Tensor, zt: torch.Tensor, temperature: float, top_k: int, student_cap: float | None,
             teacher_cap: float | None, grad_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the chunk's tokens of T^2 KL, dKL/dz_s per token in `grad_dtype`) for raw logits
    [c, V]. The gradient leaves in the dtype of the GEMMs that consume it, so the compiled form
    writes it once (no separate cast pass over [c, V])."""
    zs, dcap = _capped(zs.float(), student_cap)
    zt, _ = _capped(zt.float(), teacher_cap)
    log_ps = F.log_softmax(zs / temperature, dim=-1)
    if top_k:
        values, index = zt.topk(top_k, dim=-1)
        log_pt = F.log_softmax(values / temperature, dim=-1)
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps.gather(-1, index))).sum(-1)
        grad = log_ps.exp().scatter_add(-1, index, -pt)
    else:
        log_pt = F.log_softmax(zt / temperature, dim=-1)
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum(-1)
        grad = log_ps.exp() - pt
    grad = grad * temperature
    if dcap is not None:
        grad = grad * dcap
    return (temperature ** 2) * kl.sum(), grad.to(grad_dtype)


_COMPILED: dict[str, object] = {}


def chunk_function(compiled: bool):
    """kl_chunk, or its torch.compile'd form (one fused pass over the chunk's logits on a GPU)."""
    if not compiled:
        return kl_chunk
    if "kl" not in _COMPILED:
        _COMPILED["kl"] = torch.compile(kl_chunk, dynamic=False)
    return _COMPILED["kl"]


class FusedLinearKL(torch.autograd.Function):
    """Mean over tokens of T^2 KL(teacher || student), from hidden states [N, H] and head weights [V, H]."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, settings: KLSettings, dtype: torch.dtype, compiled: bool):
        fn = chunk_function(compiled)
        n = hs.shape[0]
        ws_c, wt_c = ws.to(dtype), wt.to(dtype)
        grad_hs = torch.empty_like(hs, dtype=torch.float32) if hs.requires_grad else None
        grad_ws = torch.zeros_like(ws, dtype=torch.float32) if ws.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hs.device)
        for start in range(0, n, settings.chunk):
            h_s = hs[start:start + settings.chunk].to(dtype)
            with torch.no_grad():
                z_t = ht[start:start + settings.chunk].to(dtype) @ wt_c.T
            z_s = h_s.detach() @ ws_c.T
            kl, grad = fn(z_s, z_t, settings.temperature, settings.top_k, settings.student_softcap,
                          settings.teacher_softcap, dtype)
            total += kl
            if grad_hs is not None:
                grad_hs[start:start + settings.chunk] = grad @ ws_c
            if grad_ws is not None:
                grad_ws += (grad.T @ h_s.detach()).float()
            del z_s, z_t, grad
        ctx.save_for_backward(*(g / n if g is not None else torch.empty(0) for g in (grad_hs, grad_ws)))
        ctx.has = (grad_hs is not None, grad_ws is not None)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_hs, grad_ws = ctx.saved_tensors
        out_hs = (grad_hs * grad_out).to(ctx.dtypes[0]) if ctx.has[0] else None
        out_ws = (grad_ws * grad_out).to(ctx.dtypes[1]) if ctx.has[1] else None
        return out_hs, out_ws, None, None, None, None, None


def fused_kl(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, settings: KLSettings,
             dtype: torch.dtype = torch.float32, compiled: bool = False) -> torch.Tensor:
    return FusedLinearKL.apply(hs, ws, ht, wt, settings, dtype, compiled)


def reference_kl(hs, ws, ht, wt, settings: KLSettings) -> torch.Tensor:
    """The same loss through full logits and autograd (tests compare against it)."""
    zs, _ = _capped(hs @ ws.T, settings.student_softcap)
    zt, _ = _capped(ht @ wt.T, settings.teacher_softcap)
    t = settings.temperature
    log_ps = F.log_softmax(zs / t, dim=-1)
    if settings.top_k:
        values, index = zt.topk(settings.top_k, dim=-1)
        log_pt = F.log_softmax(values / t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps.gather(-1, index))).sum(-1)
    else:
        log_pt = F.log_softmax(zt / t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return t * t * kl.mean()


@torch.no_grad()
def chunked_metrics(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, targets: torch.Tensor,
                    settings: KLSettings, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(summed next-token NLL of the student, summed KL(teacher || student) at temperature 1) over
    the tokens of hs/ht [N, H] with targets [N], chunk by chunk."""
    nll = kl = 0.0
    for start in range(0, hs.shape[0], settings.chunk):
        zs, _ = _capped((hs[start:start + settings.chunk].to(dtype) @ ws.to(dtype).T).float(), settings.student_softcap)
        zt, _ = _capped((ht[start:start + settings.chunk].to(dtype) @ wt.to(dtype).T).float(), settings.teacher_softcap)
        log_ps, log_pt = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
        nll += float(F.nll_loss(log_ps, targets[start:start + settings.chunk], reduction="sum"))
        kl += float((log_pt.exp() * (log_pt - log_ps)).sum())
    return nll, kl
