"""Mixed precision: a format per linear, chosen under a budget (compressor.mixed runs the search).

- `Sensitivity` (the measuring pass; not a user-facing method): for every linear and every
  candidate format, the base quantizer's real result (GPTQ on the Hessian of the block's inputs,
  or RTN) and the second-order loss estimate ½·tr(ΔW H ΔWᵀ) of its error, H = XᵀX/n. All candidates
  of a group share one Hessian and one GPTQ column sweep (rows are independent given H). The scores
  go into the block's metadata and every candidate's record into the run directory, which is the
  cache a search and a build read.
- `mixed` (a quantizer): each linear in the format its plan gives it, either re-quantized
  true-sequentially with the base quantizer (`build: sequential`) or taken from the sensitivity
  pass's records (`build: cached`: no calibration pass at all).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import json
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.base import METHODS, BlockContext, Method, MethodConfig, Record
from compressor.methods.composition import method_names
from compressor.methods.quant.candidates import KEEP, Format, candidate_formats, formats_for, parse_format
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize_rows, too_few_tokens
from compressor.methods.quant.quantizer import compute_qparams, dequantize_record, make_record
from compressor.models.adapters import Adapter, LinearGroup
from compressor.util import one_thread

# A record of the sensitivity pass is stored under "<linear>@<format>".
CANDIDATE_SEPARATOR = "@"
MIXED_BUDGETS = ("target_bits", "max_kl", "max_ppl_increase")
BASES = ("gptq", "rtn")


class CandidateConfig(MethodConfig):
    """The base quantizer's settings and the candidate formats (shared by the pass and the build)."""

    base: Literal["gptq", "rtn"] = Field("gptq", description="mixed: the quantizer that rounds each linear in "
                                                            "its chosen format")
    score_with: Literal["base", "rtn"] = Field(
        "base", description="mixed: the quantizer whose error the sensitivity pass scores: the base's (GPTQ: one "
                            "column sweep per candidate), or RTN (several times faster; the build then re-quantizes "
                            "with the base, sequentially)")
    sym: bool = Field(True, description="symmetric (no zero point), or integer zero points",
                      json_schema_extra={"flag": "--sym/--asym"})
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of the stored scales")
    act_order: bool = Field(False, description="quantize columns by descending Hessian diagonal")
    damp: float = Field(0.01, gt=0, le=1.0, description="dampening as a fraction of the mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    mse_clip: bool = Field(True, description="search per-group clipping minimizing the Hessian-weighted error")
    refit_scales: bool = Field(True, description="after the sweep, re-solve each row's group scales for the "
                                                  "least output error given the chosen codes")
    candidate_bits: list[int] = Field([2, 3, 4, 8], min_length=1,
                                      description="mixed: integer bit widths a linear may get")
    candidate_group_sizes: list[int] = Field([32, 64, 128], min_length=1,
                                             description="mixed: group sizes a linear may get (those that divide "
                                                         "its in-features)")
    keep_16bit: bool = Field(True, description="mixed: a linear may also stay in 16-bit floats")

    @field_validator("candidate_bits")
    @classmethod
    def _bits(cls, value: list[int]) -> list[int]:
        if any(not 2 <= b <= 8 for b in value):
            raise ValueError("candidate bit widths are 2..8")
        return sorted(set(value))

    @field_validator("candidate_group_sizes")
    @classmethod
    def _group_sizes(cls, value: list[int]) -> list[int]:
        if any(g < 1 for g in value):
            raise ValueError("candidate group sizes are positive")
        return sorted(set(value))

    def formats(self) -> list[Format]:
        return candidate_formats(self.candidate_bits, self.candidate_group_sizes, self.keep_16bit)

    def candidates(self) -> "CandidateConfig":
        """These settings alone (what a sensitivity pass depends on), without a subclass's."""
        return CandidateConfig(**{k: getattr(self, k) for k in CandidateConfig.model_fields})

    def gptq(self, fmt: Format) -> GPTQConfig:
        shared = {k: getattr(self, k) for k in ("sym", "scale_dtype", "act_order", "damp", "block_size", "mse_clip",
                                                 "refit_scales")}
        return GPTQConfig(bits=fmt.bits, group_size=fmt.group_size, static_groups=True, **shared)


def _quantize_rows(config: CandidateConfig, weights: list[torch.Tensor], formats: list[Format],
                   hessian: torch.Tensor | None, name: str, quantizer: str | None = None) -> list[Record]:
    """The record of each weight in its (integer) format by `quantizer` (the base by default); GPTQ
    does them all in one sweep."""
    if (quantizer or config.base) == "gptq" and hessian is not None:
        blocks = [(w.shape[0], config.gptq(f)) for w, f in zip(weights, formats)]
        # On the CPU: many small and medium operations (see util.one_thread); on a GPU it runs where it is.
        with one_thread() if hessian.device.type == "cpu" else nullcontext():
            records, _ = gptq_quantize_rows(torch.cat(weights), hessian, blocks, name)
        return records
    schemes = [f.scheme(config.sym, config.scale_dtype) for f in formats]
    return [make_record(w, *compute_qparams(w, s), s) for w, s in zip(weights, schemes)]


def _in_threads(work: Callable[[list], list], items: list, device: torch.device) -> list:
    """work(items) on a GPU; on the CPU split across torch's threads, each running single-threaded
    (the sweep is many small steps that one thread does best: see util.one_thread). Rows are
    independent given the Hessian, so the results are one call's (up to float summation order)."""
    threads = min(torch.get_num_threads(), len(items))
    if device.type != "cpu" or threads < 2:
        return work(items)

    def single(chunk: list) -> list:
        with one_thread():
            return work(chunk)

    chunks = [items[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="candidates") as pool:
        done = list(pool.map(single, chunks))
    out: list = [None] * len(items)
    for i, chunk in enumerate(done):
        out[i::threads] = chunk
    return out


def kept_record(w: torch.Tensor) -> Record:
    return {"weight": w.to(torch.float16)}


def restored(record: Record, dtype: torch.dtype) -> torch.Tensor:
    """The float weight a record stands for (a kept record is its 16-bit weight)."""
    return record["weight"].to(dtype) if "weight" in record else dequantize_record(record, dtype)


def loss_estimate(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """½·tr(ΔW H ΔWᵀ): the increase of the layer's mean squared output error, to second order."""
    d = delta.double()
    return 0.5 * float(((d @ hessian.double()) * d).sum())


class Sensitivity(Method):
    """Every candidate format of every linear, measured in one calibration pass (see the module doc)."""

    name = "sensitivity"
    Config = CandidateConfig
    needs_calibration = True
    measures = True

    def __init__(self, config: CandidateConfig):
        super().__init__(config)
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        formats = self.config.formats()
        for index, block in enumerate(adapter.blocks(model)):
            for name, linear in adapter.block_linears(block).items():
                if not formats_for(linear.in_features, formats):
                    raise CompressorError(
                        f"no candidate format fits {adapter.block_prefix(model, index)}{name} "
                        f"({linear.in_features} inputs)", "add a group size that divides it, or keep --keep-16bit")

    def on_block_start(self, ctx: BlockContext) -> None:
        # The block stays as it is, so one pass gives every group's Hessian and the next block's inputs.
        self.stats = ctx.block_stats({"hessian"}, keep_outputs=True)

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        stats = self.stats[group.name]
        hessian = stats["hessian"]  # every candidate is rounded and scored on the block's device
        names = list(linears)
        weights = {n: linears[n].weight.data.float().to(hessian.device) for n in names}
        formats = formats_for(linears[names[0]].in_features, self.config.formats())
        quantized = [f for f in formats if not f.kept]
        few = too_few_tokens(ctx, group, linears, stats)
        pairs = [(n, f) for f in quantized for n in names] + [(n, KEEP) for n in names if KEEP in formats]
        scorer = self.config.base if self.config.score_with == "base" else self.config.score_with

        def candidates(chunk: list[tuple[str, Format]]) -> list[tuple[Record, float]]:
            rounded = [(n, f) for n, f in chunk if not f.kept]
            records = dict(zip(rounded, _quantize_rows(self.config, [weights[n] for n, _ in rounded],
                                                       [f for _, f in rounded], None if few else hessian,
                                                       f"{ctx.prefix}{group.name}", scorer))) if rounded else {}
            records.update({(n, f): kept_record(weights[n]) for n, f in chunk if f.kept})
            return [(records[n, f], loss_estimate(restored(records[n, f], torch.float32) - weights[n], hessian))
                    for n, f in chunk]

        scored = dict(zip(pairs, _in_threads(candidates, pairs, hessian.device)))
        records = {pair: record for pair, (record, _) in scored.items()}
        scores = ctx.meta.setdefault("sensitivity", {})
        for (n, f), (_, score) in scored.items():
            scores.setdefault(n, {})[f.name] = score
        # The kept weights are the block's own parameters (saved with it): no need to store them twice.
        return {f"{n}{CANDIDATE_SEPARATOR}{f.name}": r for (n, f), r in records.items() if not f.kept}

    def on_block_end(self, ctx: BlockContext) -> None:
        self.stats = {}


class MixedConfig(CandidateConfig):
    plan: dict[str, str] = Field({}, description="mixed: format per linear (module name → int<bits>-g<size> or "
                                                 "fp16), or a JSON file of one; the search sets it")
    build: Literal["cached", "sequential"] = Field(
        "cached", description="mixed: take each linear's result from the sensitivity pass (no second calibration "
                              "pass), or re-quantize true-sequentially in the chosen formats")
    target_bits: float | None = Field(None, gt=0, description="mixed: average bits per weight of the quantized "
                                                              "linears, scales and zero points included")
    max_kl: float | None = Field(None, gt=0, description="mixed: largest KL to the base model, measured")
    max_ppl_increase: float | None = Field(None, gt=0, description="mixed: largest perplexity increase over the "
                                                                   "base model in percent, measured")
    max_rounds: int = Field(4, ge=1, le=10, description="mixed: builds tried while a measured budget is missed")
    interactions: bool = Field(True, description="mixed: augment the Hessian scores with measured inter-block "
                                                 "dependencies (probe set)")
    probe_samples: int = Field(8, ge=1, description="mixed: calibration samples of the probe set")
    probe_len: int = Field(128, ge=8, description="mixed: tokens per probe sample")
    verify_windows: int = Field(8, ge=1, description="mixed: held-out calibration windows the build is measured on")
    sensitivity: str | None = Field(None, description="mixed: sensitivity directory to reuse or write (default: "
                                                      "the cache, keyed by model, data and settings)")

    @field_validator("plan", mode="before")
    @classmethod
    def _plan_file(cls, value):
        if isinstance(value, str):
            try:
                return json.loads(Path(value).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read a plan from {value} ({exc})") from None
        return value

    @model_validator(mode="after")
    def _rtn_scores_build_sequentially(self) -> "MixedConfig":
        if self.score_with != "base" and self.score_with != self.base and self.build == "cached":
            raise ValueError(f"--score-with {self.score_with} keeps {self.score_with} candidates, not {self.base}'s: "
                             "add --build sequential")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> "MixedConfig":
        given = [f"--{k.replace('_', '-')}" for k in ("target_bits", "max_kl", "max_ppl_increase")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are alternative budgets; give one")
        return self

    def budget(self) -> tuple[str, float] | None:
        for key in ("target_bits", "max_kl", "max_ppl_increase"):
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return None


CandidateSource = Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Record]]]


@METHODS.register("mixed")
class MixedPrecision(Method):
    Config = MixedConfig
    produces = "weights"

    def __init__(self, config: MixedConfig):
        super().__init__(config)
        self.source: CandidateSource | None = None
        self.cached: dict[str, Record] = {}
        self.formats = {m: parse_format(f) for m, f in config.plan.items()}

    @property
    def needs_calibration(self) -> bool:
        return self.config.build == "sequential" and self.config.base == "gptq"

    def use_candidates(self, source: CandidateSource) -> None:
        """Where a cached build reads each block's parameters and candidate records (the sensitivity pass's)."""
        self.source = source

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        if not self.formats:
            raise CompressorError("the mixed quantizer has no plan",
                                  "give a budget (--target-bits, --max-kl or --max-ppl-increase) to search one")
        if self.config.build == "cached" and self.source is None:
            raise CompressorError("a cached mixed build needs the sensitivity pass's candidates",
                                  "run it through `compress quantize --mixed`, or use build sequential")
        expected = {}
        for index, block in enumerate(adapter.blocks(model)):
            prefix = adapter.block_prefix(model, index)
            expected.update({prefix + n: l.in_features for n, l in adapter.block_linears(block).items()})
        missing, extra = sorted(set(expected) - set(self.formats)), sorted(set(self.formats) - set(expected))
        if missing or extra:
            raise CompressorError(f"the plan does not match the model's linears (missing {missing[:2]}, "
                                  f"unknown {extra[:2]})", "search a plan for this model")
        for module, fmt in self.formats.items():
            if not fmt.fits(expected[module]):
                raise CompressorError(f"format {fmt.name} does not fit {module} ({expected[module]} inputs)",
                                      "choose a group size that divides its in-features")

    def on_block_start(self, ctx: BlockContext) -> None:
        if self.config.build == "cached":
            params, self.cached = self.source(ctx.index)
            ctx.block.load_state_dict(params, strict=True)

    def on_group(self, ctx: BlockContext, group: LinearGroup, linears: dict[str, nn.Linear]) -> dict[str, Record]:
        formats = {n: self.formats[ctx.prefix + n] for n in linears}
        weights = {n: linears[n].weight.data.float().cpu() for n in linears}
        if self.config.build == "cached":
            records = {n: kept_record(weights[n]) if f.kept else self.cached[f"{n}{CANDIDATE_SEPARATOR}{f.name}"]
                       for n, f in formats.items()}
        else:
            hessian = None
            if self.needs_calibration:
                stats = ctx.group_stats(group, {"hessian"})
                hessian = None if too_few_tokens(ctx, group, linears, stats) else stats["hessian"]
                weights = {n: w.to(stats["hessian"].device) for n, w in weights.items()}
            records = {n: kept_record(weights[n]) for n, f in formats.items() if f.kept}
            rounded = [n for n, f in formats.items() if not f.kept]
            if rounded:
                records.update(zip(rounded, _quantize_rows(self.config, [weights[n] for n in rounded],
                                                           [formats[n] for n in rounded], hessian,
                                                           f"{ctx.prefix}{group.name}")))
        for name, linear in linears.items():
            linear.weight.data = restored(records[name], linear.weight.dtype).to(linear.weight.device)
        return records

    def on_block_end(self, ctx: BlockContext) -> None:
        self.cached = {}

    def export(self) -> dict:
        return {"kind": "weight-int", "actorder": "weight" if self.config.act_order else None,
                "schemes": {m: f.scheme(self.config.sym, self.config.scale_dtype) for m, f in self.formats.items()}}


def mixed_spec(spec: str | list[str], options: dict | None, mixed: bool) -> tuple[list[str], dict]:
    """`--method gptq --mixed --target-bits 3.5` as the list the engine runs: the list's quantizer
    replaced by `mixed` with it as the base (awq+gptq → awq, mixed)."""
    options = dict(options or {})
    given = [f"--{k.replace('_', '-')}" for k in MIXED_BUDGETS if options.get(k) is not None]
    if len(given) > 1:
        raise CompressorError(f"{' and '.join(given)} are alternative budgets", "give one")
    if not mixed:
        raise CompressorError(f"{given[0]} is a mixed-precision budget", "add --mixed")
    conflicting = [f"--{k.replace('_', '-')}" for k in ("bits", "group_size") if options.get(k) is not None]
    if conflicting:
        raise CompressorError(f"--mixed chooses each linear's bits and group size; {' and '.join(conflicting)} "
                              "contradicts it", "drop it (--candidate-bits and --candidate-group-sizes set the choices)")
    names = method_names(spec)
    quantizers = [n for n in names if METHODS.get(n).produces == "weights"]
    if len(quantizers) != 1 or quantizers[0] not in BASES:
        raise CompressorError(f"--mixed needs {' or '.join(BASES)} as the list's quantizer, not "
                              f"{', '.join(quantizers) or 'none'}", "e.g. --method gptq or --method awq+gptq")
    options["base"] = quantizers[0]
    return ["mixed" if n == quantizers[0] else n for n in names], options
