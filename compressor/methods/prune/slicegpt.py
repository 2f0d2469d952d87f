"""SliceGPT (Ashkboos et al., 2024): delete rows and columns of every weight matrix after
rotating the residual stream into the principal-component basis of its calibration signals.

Computational invariance: with RMSNorm scales fused into the linears that read the norm, an
orthogonal Q commutes with the norm (|xQ| = |x|), so rotating every write to the residual
stream by Q and every read by Q^T leaves the function unchanged. Slicing keeps the leading
d columns of Q (the directions with most signal energy).

Two variants:
- per-block: every residual point (embedding output, between attention and MLP, block output)
  gets its own basis from the PCA of the sliced model's own signals, computed block after block;
  residual connections between two bases carry a shortcut matrix Q_a^T Q_b.
- global: one basis for the whole stream (PCA of the trace-normalized sum of all residual
  points' covariances); no shortcuts, so the result is the original architecture with a smaller
  hidden size.

Where invariance does not hold: Gemma 3 normalizes attention and MLP outputs (post-norms with
per-channel scales) before the residual add. Those norms divide by the RMS of the module's
full, unrotated output and then scale per channel, which no rotation commutes with, and no
per-channel refit of a norm over the sliced output can recover the per-token RMS (measured: a
pure rotation with such a refit took gemma3-270m from ppl 33 to 178). So the scale and the
rotation are folded into the module's output matrix, which also writes a few "probe" channels:
the top principal directions of its original output, whose energy estimates the full RMS
(models.sliced.ProbedRMSNorm). With as many probe channels as the hidden size it is exact.
`probe=0` keeps the per-channel refit instead (the architecture's own norms, so a global slice
stays an ordinary config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, BlockContext, MethodConfig, ModelContext, Runner
from compressor.methods.prune.pruner import Pruner
from compressor.models.adapters import Adapter
from compressor.models.sliced import (make_sliced_layer, rms_scale, set_embedding, set_linear, set_norm,
                                      set_probed_norm, shortcut)
from compressor.util import one_thread, release_memory


class SliceGPTConfig(MethodConfig):
    sparsity: float = Field(0.25, description="fraction of the residual width to delete, in (0, 1)")
    rotation: Literal["per-block", "global"] = Field(
        "per-block", description="a basis per residual point (shortcut matrices), or one for the whole stream "
                                 "(an ordinary config)")
    schedule: list[float] | None = Field(None, description="per-block rotation: one sparsity per decoder block "
                                                           "instead of one for all")
    round_to: int = Field(8, ge=1, description="round widths down to a multiple of this (SliceGPT's "
                                               "round_interval)")
    # 'slice' is the reference behaviour, which unties tied embeddings.
    embeddings: Literal["slice", "keep"] = Field(
        "slice", description="per-block: rotate and slice the embeddings and head, or keep them in the original "
                             "basis (still tied) and slice between the first and last block")
    damp: float = Field(0.01, ge=0, description="dampening added to the covariance diagonal, relative to its mean")
    # 0 keeps Gemma's own architecture (so a global slice is an ordinary config) at a large cost
    # in accuracy: see the module docstring.
    probe: int = Field(64, ge=0, description="post-norm models (Gemma 3): channels from which a sliced "
                                             "post-norm estimates the full RMS; 0 refits it per channel")


def width_for(hidden: int, sparsity: float, round_to: int, what: str) -> int:
    if not 0.0 <= sparsity < 1.0:  # 0 (a pure rotation) is allowed here for tests; the CLI wants (0, 1)
        raise CompressorError(f"sparsity must be in (0, 1), got {sparsity}", "pass e.g. --sparsity 0.25")
    width = int((1 - sparsity) * hidden)
    width -= width % round_to
    if width < 1:
        raise CompressorError(
            f"sparsity {sparsity} leaves zero width of the {hidden}-wide {what} (rounded to multiples of {round_to})",
            "lower --sparsity")
    return width


@dataclass
class Covariance:
    """x^T x over tokens: fp32 per batch, summed in fp64; eigendecomposition in fp64."""

    sum: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        part = (x.T @ x).double().cpu()  # the factorizations run on the CPU
        self.sum = part if self.sum is None else self.sum + part
        self.tokens += x.shape[0]

    def basis(self, width: int, damp: float) -> torch.Tensor:
        h = self.sum.clone()
        h.diagonal().add_(damp * h.diagonal().mean())
        values, vectors = eigh(h)
        order = torch.argsort(values, descending=True)
        return vectors[:, order[:width]].contiguous()  # [full, width] float64, orthonormal columns


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with one_thread():
        return torch.linalg.eigh(matrix)


class _Stop(Exception):
    pass


def _capture_input(module: nn.Module, sink: Callable[[torch.Tensor], None], stop: bool = False):
    def hook(_m, args, kwargs):
        sink((args[0] if args else kwargs["hidden_states"]).detach())
        if stop:
            raise _Stop

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _norm_gain(norm: nn.Module, offset: float) -> torch.Tensor:
    return norm.weight.detach().double() + offset


def _set_norm_gain(norm: nn.Module, gain: torch.Tensor, offset: float) -> None:
    set_norm(norm, (gain - offset).to(norm.weight.dtype))


# The bases are computed where the statistics are (the CPU); each block is rotated where it runs.

def _scale_columns(linear: nn.Linear, gain: torch.Tensor) -> None:
    gain = gain.to(linear.weight.device)
    set_linear(linear, (linear.weight.double() * gain).to(linear.weight.dtype), linear.bias)


def _rotate_inputs(linear: nn.Linear, basis: torch.Tensor) -> None:
    """A linear reading the stream: W <- W B (reads the rotated, sliced stream)."""
    basis = basis.to(linear.weight.device)
    set_linear(linear, (linear.weight.double() @ basis).to(linear.weight.dtype), linear.bias)


def _rotate_outputs(linear: nn.Linear, basis: torch.Tensor, gain: torch.Tensor | None = None) -> None:
    """A linear writing the stream: W <- B^T diag(gain) W."""
    basis = basis.to(linear.weight.device)
    gain = gain.to(linear.weight.device) if gain is not None else None
    w = linear.weight.double()
    if gain is not None:
        w = w * gain[:, None]
    bias = None
    if linear.bias is not None:
        b = linear.bias.double() * (gain if gain is not None else 1)
        bias = (basis.T @ b).to(linear.bias.dtype)
    set_linear(linear, (basis.T @ w).to(linear.weight.dtype), bias)


def _shortcut(layer_dtype: torch.dtype, device, src: torch.Tensor | None, dst: torch.Tensor | None,
              full: int) -> nn.Linear | None:
    """Residual map from basis `src` to basis `dst` (None: the original, unrotated stream)."""
    if src is dst:
        return None
    src = src.to(device) if src is not None else None
    dst = dst.to(device) if dst is not None else None
    if src is None:
        matrix = dst.T  # [d_dst, full]
    elif dst is None:
        matrix = src  # [full, d_src]
    else:
        matrix = dst.T @ src
    like = torch.empty(0, dtype=layer_dtype, device=device)
    lin = shortcut(matrix.shape[1], matrix.shape[0], like)
    lin.weight.data = matrix.to(layer_dtype).contiguous()
    return lin


def _fit_post_norm_gain(ys: list[torch.Tensor], gain: torch.Tensor, basis: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel scale c that makes c * z / rms(z) best match z / rms(y) in least squares,
    z = (y * gain) B: the probe-free post-norm refit (--probe 0)."""
    num = torch.zeros(basis.shape[1], dtype=torch.float64)
    den = torch.zeros_like(num)
    b32, g32 = basis.float(), gain.float()
    for y in ys:
        y = y.reshape(-1, y.shape[-1]).float()
        z = (y * g32) @ b32
        rms_y = (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        rms_z = (z.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        z2 = z.pow(2)
        num += (z2 / (rms_y * rms_z)).sum(0).double()
        den += (z2 / rms_z.pow(2)).sum(0).double()
    return num / den.clamp_min(1e-30)


def _rms_probe(ys: list[torch.Tensor], channels: int) -> torch.Tensor:
    """[full, r] matrix P with |y P|^2 ~ |y|^2 per token: the top-r principal directions of the
    post-norm inputs y, scaled by the factor that best corrects the energy they miss (relative
    least squares over the calibration tokens)."""
    cov = Covariance()
    for y in ys:
        y = y.reshape(-1, y.shape[-1]).float()
        cov.add(y * y.pow(2).sum(-1, keepdim=True).clamp_min(1e-30).rsqrt())
    values, vectors = eigh(cov.sum)
    top = vectors[:, torch.argsort(values, descending=True)[:channels]].float()
    captured, squared = 0.0, 0.0
    for y in ys:
        y = y.reshape(-1, y.shape[-1]).float()
        ratio = ((y @ top).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-30)).double()
        captured += float(ratio.sum())
        squared += float(ratio.pow(2).sum())
    return top.double() * (captured / max(squared, 1e-30)) ** 0.5


@METHODS.register("slicegpt")
class SliceGPT(Pruner):
    Config = SliceGPTConfig

    def __init__(self, config: SliceGPTConfig):
        super().__init__(config)
        self.b_in: torch.Tensor | None = None  # basis of the stream entering the next block
        self.global_basis: torch.Tensor | None = None
        self.resumed = False

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        super().check(model, adapter)
        c = self.config
        hidden = adapter.text_config(model.config).hidden_size
        blocks = len(adapter.blocks(model))
        if c.schedule is not None:
            if c.rotation == "global":
                raise CompressorError("a per-layer schedule needs --rotation per-block",
                                      "one global basis has one width")
            if len(c.schedule) != blocks:
                raise CompressorError(f"the schedule has {len(c.schedule)} sparsities for {blocks} blocks",
                                      "give one sparsity per decoder block")
        step = self.width_step(adapter.text_config(model.config))
        for i, s in enumerate(c.schedule or [c.sparsity]):
            width_for(hidden, s, step, "residual stream" if c.schedule is None else f"stream at block {i}")

    def width_step(self, config) -> int:
        """Widths are multiples of round_to; a global slice is also a config's hidden size, which
        transformers requires to be a multiple of the attention heads (when rounding to both
        would be much coarser, e.g. 72 for 9 heads, to the heads alone)."""
        c = self.config
        if c.rotation != "global":
            return c.round_to
        heads = config.num_attention_heads
        both = math.lcm(c.round_to, heads)
        return both if both <= 4 * c.round_to else heads

    def widths(self, config, blocks: int) -> list[int]:
        c = self.config
        step = self.width_step(config)
        return [width_for(config.hidden_size, s, step, "residual stream") for s in (c.schedule or [c.sparsity] * blocks)]

    @property
    def keep_ends(self) -> bool:
        return self.config.rotation == "per-block" and self.config.embeddings == "keep"

    # ------------------------------------------------------------ the algorithm, as engine hooks

    @torch.no_grad()
    def on_start(self, ctx: ModelContext) -> None:
        """Fuse every pre-norm's scale into its readers, find the global basis (global rotation),
        rotate and slice the embedding and the calibration inputs. Deterministic: it runs again
        on resume, where the carried bases stand in for what was computed before."""
        c = self.config
        model, adapter, hidden = ctx.model, ctx.adapter, ctx.hidden
        cfg = adapter.text_config(model.config)
        self.full = cfg.hidden_size
        blocks = adapter.blocks(model)
        self.slice_widths = self.widths(cfg, len(blocks))
        self.dtype = blocks[0].get_submodule(adapter.layout.attn_output).weight.dtype
        tokens = ctx.calibration_tokens
        if tokens < self.full:
            raise CompressorError(
                f"calibration has {tokens} tokens; a stable PCA of the {self.full}-wide residual stream needs at "
                f"least {self.full}", "raise --samples or --seq-len")
        self._fuse_norms(model, adapter, fuse_head=not self.keep_ends)
        if c.rotation == "global" and self.global_basis is None:
            self.global_basis = self._global_basis(blocks, adapter.layout.mlp_norm, hidden, ctx.block_kwargs, ctx.run,
                                                   self.slice_widths[0], ctx.progress)
        if self.keep_ends:
            return
        cov = Covariance()
        for i in range(0, hidden.shape[0], 8):
            cov.add(hidden[i:i + 8])
        b_emb = self._basis(cov, self.slice_widths[0])
        emb = adapter.embedding(model)
        set_embedding(emb, (emb.weight.double() @ b_emb).to(emb.weight.dtype))
        ctx.set_inputs(self._project(hidden, b_emb))
        if not self.resumed:
            self.b_in = b_emb

    def _basis(self, cov: Covariance, width: int) -> torch.Tensor:
        return self.global_basis if self.global_basis is not None else cov.basis(width, self.config.damp)

    @torch.no_grad()
    def on_block_start(self, ctx: BlockContext) -> None:
        """Rotate and slice one block; its projected outputs are the next block's inputs."""
        full, dtype, layout, run = self.full, self.dtype, ctx.adapter.layout, ctx.run
        off = ctx.adapter.norm_weight_offset
        layer, index, hidden, kwargs = ctx.block, ctx.index, ctx.hidden, ctx.kwargs
        # the embedding's basis (and a global one) come from where the embeddings ran: move to the block
        b_in = self.b_in = self.b_in.to(hidden.device) if self.b_in is not None else None
        width = self.slice_widths[index]
        is_last = index == len(self.slice_widths) - 1
        needs_signals = self.global_basis is None or bool(layout.attn_post_norm or layout.mlp_post_norm)
        make_sliced_layer(layer, layout)
        d_in = b_in.shape[1] if b_in is not None else full
        for name in layout.attn_inputs:
            if b_in is not None:
                _rotate_inputs(layer.get_submodule(name), b_in)
        _set_norm_gain(layer.get_submodule(layout.attn_norm),
                       torch.full((d_in,), rms_scale(full, d_in), dtype=torch.float64), off)
        # Pass 1: attention up to its output projection's input, once; the stream between
        # attention and MLP (in the original basis) follows from it with cheap matmuls.
        layer.attn_shortcut = _shortcut(dtype, hidden.device, b_in, None, full)
        o_proj = layer.get_submodule(layout.attn_output)
        cov_mid, y_attn, attn = Covariance(), [], None
        if needs_signals:
            chunks: list[torch.Tensor] = []
            handle = _capture_input(o_proj, lambda a: chunks.append(a.to("cpu")), stop=True)
            try:
                run(layer, hidden, kwargs, stop=_Stop)
            finally:
                handle.remove()
            attn = torch.cat(chunks)
            del chunks

            def mid_signal(x, a):
                y = o_proj(a)
                if layout.attn_post_norm:
                    y_attn.append(y.to("cpu"))
                cov_mid.add(layer.attention_residual(x, y))

            run.map(layer, mid_signal, hidden, attn)
        b_mid = self._basis(cov_mid, width)
        d_mid = b_mid.shape[1]
        attn_probe = self._write_stream(layer, layout.attn_output, layout.attn_post_norm, b_mid, y_attn, off, full)
        y_attn.clear()
        layer.attn_shortcut = _shortcut(dtype, hidden.device, b_in, b_mid, full)
        for name in layout.mlp_inputs:
            _rotate_inputs(layer.get_submodule(name), b_mid)
        _set_norm_gain(layer.get_submodule(layout.mlp_norm),
                       torch.full((d_mid,), rms_scale(full, d_mid), dtype=torch.float64), off)
        # Pass 2: the block's output in the original basis.
        layer.mlp_shortcut = _shortcut(dtype, hidden.device, b_mid, None, full)
        want_out = not (is_last and (self.keep_ends or self.global_basis is None))
        out, y_mlp = None, []
        if needs_signals and (not is_last or (want_out and layout.mlp_post_norm)):
            handle = None
            if layout.mlp_post_norm:
                handle = _capture_input(layer.get_submodule(layout.mlp_post_norm), lambda y: y_mlp.append(y.to("cpu")))
            try:
                out = run.map(layer, lambda x, a: layer.mlp_residual(layer.attention_residual(x, o_proj(a))),
                              hidden, attn)
            finally:
                if handle:
                    handle.remove()
        del attn
        if want_out:
            if self.global_basis is not None:
                b_out = self.global_basis.to(hidden.device)
            else:
                cov_out = Covariance()
                for i in range(0, out.shape[0], 8):
                    cov_out.add(out[i:i + 8])
                b_out = cov_out.basis(width, self.config.damp)
        else:
            b_out = None  # the last block writes the original basis; the head reads it unchanged
        d_out = b_out.shape[1] if b_out is not None else full
        mlp_probe = 0
        if b_out is not None:
            mlp_probe = self._write_stream(layer, layout.mlp_output, layout.mlp_post_norm, b_out, y_mlp, off, full)
        y_mlp.clear()
        layer.mlp_shortcut = _shortcut(dtype, hidden.device, b_mid, b_out, full)
        ctx.meta.update({"in": d_in, "mid": d_mid, "out": d_out,
                         "attn_shortcut": layer.attn_shortcut is not None,
                         "mlp_shortcut": layer.mlp_shortcut is not None,
                         **({"attn_probe": attn_probe} if attn_probe else {}),
                         **({"mlp_probe": mlp_probe} if mlp_probe else {})})
        if out is not None and not is_last:
            ctx.set_outputs(self._project(out, b_out) if b_out is not None else out)
        del out
        self.b_in = b_out
        release_memory()

    @torch.no_grad()
    def on_end(self, ctx: ModelContext) -> None:
        """The head reads the last block's basis (the final norm's width follows)."""
        if self.b_in is not None:
            d_head = self.b_in.shape[1]
            _rotate_inputs(ctx.adapter.head(ctx.model), self.b_in)
            _set_norm_gain(ctx.adapter.final_norm(ctx.model),
                           torch.full((d_head,), rms_scale(self.full, d_head), dtype=torch.float64),
                           ctx.adapter.norm_weight_offset)

    def structure(self, block_meta: list[dict], model: nn.Module, adapter: Adapter) -> dict:
        head = adapter.head(model)
        return {"embedding": adapter.embedding(model).weight.shape[1], "head": head.weight.shape[1],
                "layers": block_meta}

    def carry(self) -> dict:
        carry: dict = {"global_basis": self.global_basis} if self.global_basis is not None else {}
        if self.b_in is not None and self.b_in is self.global_basis:
            carry["b_in_is_global"] = True  # one basis for the whole stream: no shortcut to make
        elif self.b_in is not None:
            carry["b_in"] = self.b_in
        return carry

    def restore(self, carry: dict) -> None:
        self.global_basis = carry.get("global_basis", self.global_basis)
        self.b_in = self.global_basis if carry.get("b_in_is_global") else carry.get("b_in")
        self.resumed = True


    # ------------------------------------------------------------ pieces

    @staticmethod
    def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        b = basis.to(x.device, x.dtype)
        return torch.cat([x[i:i + 8] @ b for i in range(0, x.shape[0], 8)])

    def _write_stream(self, layer: nn.Module, output: str, post_norm: str | None, basis: torch.Tensor,
                      ys: list[torch.Tensor], offset: float, full: int) -> int:
        """Rotate a module's output into `basis`. With a post-norm (Gemma), fold its scale in,
        append the RMS probe channels and swap in the probed norm; returns the probe width."""
        linear = layer.get_submodule(output)
        if not post_norm:
            _rotate_outputs(linear, basis)
            return 0
        norm = layer.get_submodule(post_norm)
        gain = _norm_gain(norm, offset)
        if self.config.probe == 0:
            fitted = _fit_post_norm_gain(ys, gain, basis, getattr(norm, "eps", 1e-6))
            _rotate_outputs(linear, basis, gain)
            _set_norm_gain(norm, fitted, offset)
            return 0
        probe = _rms_probe(ys, min(self.config.probe, full))
        _rotate_outputs(linear, torch.cat([gain[:, None] * basis, probe], dim=1))
        set_probed_norm(layer, post_norm, basis.shape[1], probe.shape[1], full)
        return probe.shape[1]

    @staticmethod
    def _fuse_norms(model: nn.Module, adapter: Adapter, fuse_head: bool) -> None:
        """Fold each pre-norm's per-channel scale into the linears that read it."""
        off = adapter.norm_weight_offset
        layout = adapter.layout
        for layer in adapter.blocks(model):
            for norm_name, readers in ((layout.attn_norm, layout.attn_inputs), (layout.mlp_norm, layout.mlp_inputs)):
                norm = layer.get_submodule(norm_name)
                gain = _norm_gain(norm, off)
                for name in readers:
                    _scale_columns(layer.get_submodule(name), gain)
                _set_norm_gain(norm, torch.ones_like(gain), off)
        if fuse_head:
            head, emb = adapter.head(model), adapter.embedding(model)
            if head.weight is emb.weight:  # untie: the head now differs from the embedding
                head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
                text = adapter.text_config(model.config)
                text.tie_word_embeddings = False
            norm = adapter.final_norm(model)
            gain = _norm_gain(norm, off)
            _scale_columns(head, gain)
            _set_norm_gain(norm, torch.ones_like(gain), off)

    def _global_basis(self, blocks, mlp_norm: str, hidden, block_kwargs, run: Runner, width: int, progress) -> torch.Tensor:
        """One basis for the whole stream: PCA of the sum of every residual point's covariance,
        each normalized by its trace so deep (large-norm) layers do not drown the early ones."""
        total = None

        def add(cov: Covariance):
            nonlocal total
            part = cov.sum / cov.sum.diagonal().sum()
            total = part if total is None else total + part

        cov = Covariance()
        for i in range(0, hidden.shape[0], 8):
            cov.add(hidden[i:i + 8])
        add(cov)
        task = progress.task("slicegpt (global): PCA pass", total=len(blocks)) if progress else None
        bar = task.__enter__() if task else None
        try:
            for index, layer in enumerate(blocks):
                cov_mid = Covariance()
                handle = _capture_input(layer.get_submodule(mlp_norm), cov_mid.add)
                try:
                    hidden = run(layer, hidden, block_kwargs[index])
                finally:
                    handle.remove()
                add(cov_mid)
                cov_out = Covariance()
                for i in range(0, hidden.shape[0], 8):
                    cov_out.add(hidden[i:i + 8])
                add(cov_out)
                if bar:
                    bar.advance()
        finally:
            if task:
                task.__exit__(None, None, None)
        return Covariance(total, 1).basis(width, self.config.damp)
