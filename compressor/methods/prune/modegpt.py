"""MoDeGPT (Lin et al., 2024): modular decomposition without recovery fine-tuning. Each pair
of matrices that meet inside a block with no residual in between is compressed jointly, with
the closed-form reconstruction that minimizes the pair's output error on calibration data:

- MLP (gate/up -> down): Nystrom approximation. Keep the intermediate channels with the largest
  ridge leverage scores of their activation correlation C; down' = W_down C[:, S] C[S, S]^-1.
- VO (v -> o, through the attention mix): SVD. Per key/value group, the product of W_v with the
  o-projection blocks of the query heads that read it, weighted by the input correlation, is
  truncated to rank k: v gets k channels per head, o reads k per head.
- QK (q -> k through the scores): CR decomposition. Per key/value group, keep the query/key
  channels with the largest product of correlation-weighted norms sqrt(w_q^T C w_q) *
  sqrt(w_k^T C w_k) (summed over the group's query heads); with rotary embeddings a channel and
  its rotary partner are kept or dropped together, and the kept channels' frequencies travel in
  a per-layer index. Skipped on architectures that normalize q and k over the whole head width
  (Gemma 3's q_norm/k_norm): dropping channels changes that norm, so the decomposition does not
  hold there; those models compress MLP and V/O only (the adapter says whether q/k are normed).

Sparsity is the fraction of decoder-block parameters removed. Per-layer allocation ('global')
follows the paper: layer l gets sparsity L * s * softmax(-importance_l / temperature), with
importance = 1 - cos(block input, block output) on the calibration set (an unimportant block,
one that changes its input little, is compressed more).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, BlockContext, MethodConfig, ModelContext, Runner
from compressor.methods.prune.pruner import Pruner
from compressor.methods.prune.slicegpt import Covariance, _capture_input, eigh
from compressor.models.adapters import Adapter
from compressor.models.attention import make_reduced_attention
from compressor.models.sliced import set_linear
from compressor.util import one_thread, release_memory


class MoDeGPTConfig(MethodConfig):
    sparsity: float = Field(0.25, description="fraction of decoder-block parameters to remove, in (0, 1)")
    modules: Literal["all", "mlp"] = Field("all", description="compress MLP, V/O and Q/K, or the MLP alone "
                                                              "(an ordinary config)")
    allocation: Literal["uniform", "global"] = Field("global", description="per-layer sparsity: the same "
                                                                           "everywhere, or by block importance")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the global allocation")
    ridge: float = Field(1e-2, gt=0, description="ridge of leverage scores and the Nystrom solve, relative to "
                                                 "the mean correlation diagonal")
    round_to: int = Field(8, ge=1, description="round kept widths down to a multiple of this")
    max_layer_sparsity: float = Field(0.9, gt=0, lt=1, description="cap on any one layer's sparsity")
    # Block importance (for the global allocation) is a mean cosine: this many calibration
    # samples estimate it well, and the pass over all of them was a fifth of the run time.
    importance_samples: int = Field(32, ge=1, description="calibration samples that estimate block importance")


def _kept(total: int, sparsity: float, round_to: int, what: str) -> int:
    keep = int(round((1 - sparsity) * total))
    if round_to > 1 and total >= round_to:
        keep = max(round_to, keep - keep % round_to)
    if keep < 1:
        raise CompressorError(f"sparsity {sparsity:.3f} leaves zero width of the {total}-wide {what}",
                              "lower --sparsity")
    return min(keep, total)


@torch.no_grad()
def nystrom_mlp(gate_up: list[nn.Linear], down: nn.Linear, corr: torch.Tensor, keep: int, ridge: float) -> None:
    """Keep `keep` intermediate channels by ridge leverage; refit down by the Nystrom solve."""
    c = corr.double()
    lam = ridge * c.diagonal().mean()
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    with one_thread():
        leverage = torch.linalg.solve(c + lam * eye, c).diagonal()  # diag(C (C + lam I)^-1), C symmetric
        index = torch.argsort(leverage, descending=True)[:keep].sort().values
        c_ss = c[index][:, index] + lam * torch.eye(keep, dtype=c.dtype)
        w = down.weight.double()  # [D, I]
        new_down = torch.linalg.solve(c_ss, (w @ c[:, index]).T).T  # W C[:, S] C_SS^-1
    for lin in gate_up:
        set_linear(lin, lin.weight[index].clone(), None if lin.bias is None else lin.bias[index].clone())
    set_linear(down, new_down.to(down.weight.dtype), down.bias)


@torch.no_grad()
def svd_vo(v: nn.Linear, o: nn.Linear, corr: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
           keep: int) -> None:
    """Rank-`keep` value/output pairs per key-value group, weighted by the input correlation."""
    rep = heads // kv_heads
    c = corr.double()
    wv = v.weight.double().view(kv_heads, head_dim, -1)  # [g, hd, D]
    wo = o.weight.double().view(o.out_features, heads, head_dim)  # [D, h, hd]
    new_v, new_o = [], [None] * heads
    for g in range(kv_heads):
        gram = wv[g] @ c @ wv[g].T  # [hd, hd] = W_v C W_v^T
        vals, vecs = eigh(gram)
        root = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
        m = torch.cat([wo[:, h].T for h in range(g * rep, (g + 1) * rep)], dim=1)  # [hd, rep*D]
        with one_thread():
            _, _, vh = torch.linalg.svd(root @ m, full_matrices=False)
        basis = vh[:keep].T  # [rep*D, k]: right singular vectors
        new_v.append((m @ basis).T @ wv[g])  # [k, D]: x -> (x W_v^T M) V_k
        for j, h in enumerate(range(g * rep, (g + 1) * rep)):
            new_o[h] = basis[j * o.out_features:(j + 1) * o.out_features]  # [D, k]
    set_linear(v, torch.cat(new_v).to(v.weight.dtype))
    set_linear(o, torch.cat(new_o, dim=1).to(o.weight.dtype), o.bias)


@torch.no_grad()
def cr_qk(q: nn.Linear, k: nn.Linear, corr: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
          keep: int) -> torch.Tensor:
    """Keep `keep` query/key channels (whole rotary pairs) per key/value group; returns the kept
    channel indices [kv_heads, keep] (first halves, then their partners)."""
    rep, half = heads // kv_heads, head_dim // 2
    c = corr.double()
    wq = q.weight.double().view(heads, head_dim, -1)
    wk = k.weight.double().view(kv_heads, head_dim, -1)
    norm = lambda w: ((w @ c) * w).sum(-1).clamp_min(0).sqrt()  # noqa: E731  sqrt(w^T C w) per row
    qn, kn = norm(wq).view(kv_heads, rep, head_dim), norm(wk)
    score = (qn * kn[:, None]).sum(1)  # [kv, hd]
    pair = score[:, :half] + score[:, half:]
    first = torch.argsort(pair, dim=1, descending=True)[:, :keep // 2].sort(dim=1).values
    index = torch.cat([first, first + half], dim=1)  # [kv, keep]
    new_q = torch.stack([wq[h][index[h // rep]] for h in range(heads)]).reshape(heads * keep, -1)
    new_k = torch.stack([wk[g][index[g]] for g in range(kv_heads)]).reshape(kv_heads * keep, -1)
    set_linear(q, new_q.to(q.weight.dtype))
    set_linear(k, new_k.to(k.weight.dtype))
    return index


@METHODS.register("modegpt")
class MoDeGPT(Pruner):
    Config = MoDeGPTConfig

    def __init__(self, config: MoDeGPTConfig):
        super().__init__(config)
        self.allocation: list[float] | None = None
        self.importance: list[float] | None = None

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        super().check(model, adapter)
        if not 0.0 < self.config.sparsity < 1.0:
            raise CompressorError(f"sparsity must be in (0, 1), got {self.config.sparsity}",
                                  "pass e.g. --sparsity 0.25")
        self._module_sparsity(model, adapter)

    def _shapes(self, model: nn.Module, adapter: Adapter) -> dict:
        cfg = adapter.text_config(model.config)
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return {"hidden": cfg.hidden_size, "inter": cfg.intermediate_size, "heads": heads, "kv": kv, "hd": hd}

    def _module_sparsity(self, model: nn.Module, adapter: Adapter) -> float:
        """The sparsity of each compressed module that removes `sparsity` of the block parameters."""
        s = self._shapes(model, adapter)
        mlp = 3 * s["hidden"] * s["inter"]
        vo = s["kv"] * s["hd"] * s["hidden"] + s["heads"] * s["hd"] * s["hidden"]
        qk = s["heads"] * s["hd"] * s["hidden"] + s["kv"] * s["hd"] * s["hidden"]
        compressible = mlp + ((vo + (qk if self._qk_supported(model, adapter) else 0))
                              if self.config.modules == "all" else 0)
        share = compressible / (mlp + vo + qk)
        module = self.config.sparsity / share
        if module >= self.config.max_layer_sparsity:
            raise CompressorError(
                f"sparsity {self.config.sparsity} of the block parameters needs {module:.2f} of the compressed "
                f"modules ({'MLP' if self.config.modules == 'mlp' else 'MLP, V and O'}), leaving too little width",
                f"lower --sparsity below {share * self.config.max_layer_sparsity:.2f}")
        return module

    @staticmethod
    def _qk_supported(model: nn.Module, adapter: Adapter) -> bool:
        return not adapter.normalizes_query_key(model) and not adapter.attention_has_bias(model)

    def allocate(self, importance: list[float], target: float) -> list[float]:
        c = self.config
        if c.allocation == "uniform":
            return [target] * len(importance)
        scores = torch.tensor(importance, dtype=torch.float64)
        weights = torch.softmax(-scores / c.temperature, 0) * len(importance)
        alloc = (weights * target).clamp(max=c.max_layer_sparsity)
        for _ in range(50):  # redistribute what the cap cut off, keeping the mean at target
            deficit = target * len(importance) - float(alloc.sum())
            free = alloc < c.max_layer_sparsity - 1e-9
            if deficit < 1e-9 or not free.any():
                break
            alloc[free] += deficit * weights[free] / weights[free].sum()
            alloc = alloc.clamp(max=c.max_layer_sparsity)
        return alloc.tolist()

    # ------------------------------------------------------------ engine hooks

    @torch.no_grad()
    def on_start(self, ctx: ModelContext) -> None:
        """Per-layer sparsities from block importance (carried: not recomputed on resume)."""
        model, adapter = ctx.model, ctx.adapter
        self.shapes = self._shapes(model, adapter)
        if ctx.calibration_tokens < self.shapes["hidden"]:
            raise CompressorError(
                f"calibration has {ctx.calibration_tokens} tokens; stable correlations of the "
                f"{self.shapes['hidden']}-wide inputs need at least {self.shapes['hidden']}", "raise --samples or --seq-len")
        self.qk = self.config.modules == "all" and self._qk_supported(model, adapter)
        if self.allocation is not None:
            return
        blocks = adapter.blocks(model)
        self.importance = [0.0] * len(blocks)
        if self.config.allocation == "global":
            self.importance = self._importance(blocks, ctx.hidden[:self.config.importance_samples],
                                               ctx.block_kwargs, ctx.run, ctx.progress)
        self.allocation = self.allocate(self.importance, self._module_sparsity(model, adapter))

    @torch.no_grad()
    def on_block_start(self, ctx: BlockContext) -> None:
        """Decompose the block's MLP (and V/O, Q/K) on its calibration inputs; the engine then
        propagates the compressed block's outputs."""
        c, shapes, layout, layer = self.config, self.shapes, ctx.adapter.layout, ctx.block
        sparsity = self.allocation[ctx.index]
        mlp_in = [layer.get_submodule(n) for n in layout.mlp_inputs]
        down = layer.get_submodule(layout.mlp_output)
        v = layer.get_submodule(layout.attn_inputs[-1])
        o = layer.get_submodule(layout.attn_output)
        cov_mlp, cov_attn = Covariance(), Covariance()
        handles = [_capture_input(down, cov_mlp.add)]
        if c.modules == "all":
            handles.append(_capture_input(v, cov_attn.add))
        try:
            ctx.run(layer, ctx.hidden, ctx.kwargs)
        finally:
            for h in handles:
                h.remove()
        inter = _kept(shapes["inter"], sparsity, c.round_to, "MLP")
        nystrom_mlp(mlp_in, down, cov_mlp.sum / cov_mlp.tokens, inter, c.ridge)
        dims = {"in": shapes["hidden"], "mid": shapes["hidden"], "out": shapes["hidden"],
                "attn_shortcut": False, "mlp_shortcut": False, "intermediate": inter}
        if c.modules == "all":
            vdim = _kept(shapes["hd"], sparsity, 1, "value head")
            corr = cov_attn.sum / cov_attn.tokens
            svd_vo(v, o, corr, shapes["heads"], shapes["kv"], shapes["hd"], vdim)
            qkdim, qk_index = None, None
            if self.qk:
                qkdim = 2 * _kept(shapes["hd"] // 2, sparsity, 1, "query/key head")
                qk_index = cr_qk(layer.get_submodule(layout.attn_inputs[0]), layer.get_submodule(layout.attn_inputs[1]),
                                 corr, shapes["heads"], shapes["kv"], shapes["hd"], qkdim)
                dims["qk_head_dim"] = qkdim
            attention = make_reduced_attention(layer.get_submodule(layout.attention), qkdim, vdim, shapes["kv"])
            if qk_index is not None:
                attention.qk_index = qk_index
            dims["v_head_dim"] = vdim
        ctx.meta.update(dims)
        release_memory()

    def structure(self, block_meta: list[dict], model: nn.Module, adapter: Adapter) -> dict:
        hidden = self.shapes["hidden"]
        return {"embedding": hidden, "head": hidden, "layers": block_meta,
                "allocation": [round(a, 4) for a in self.allocation],
                "importance": [round(i, 5) for i in self.importance]}

    def carry(self) -> dict:
        return {"allocation": self.allocation, "importance": self.importance}

    def restore(self, carry: dict) -> None:
        self.allocation, self.importance = carry["allocation"], carry["importance"]


    @staticmethod
    def _importance(blocks, hidden, block_kwargs, run: Runner, progress) -> list[float]:
        """1 - mean cosine similarity between each block's input and output (dense model)."""
        scores = []
        with progress.task("modegpt: layer importance", total=len(blocks)) as bar:
            for index, layer in enumerate(blocks):
                out = run(layer, hidden, block_kwargs[index])
                cos = torch.nn.functional.cosine_similarity(hidden.float(), out.to(hidden.device).float(), dim=-1)
                scores.append(float(1 - cos.mean()))
                hidden = out
                bar.advance()
        return scores
