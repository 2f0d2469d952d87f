"""The mixed-precision commands: `compress sensitivity` (the pass, the probes, the table and its
heatmap) and `compress quantize --mixed` (sensitivities from the cache or one pass, a plan for the
budget, the build, its measurement, and for measured budgets a tighter plan while one is missed).

Measurements that steer the search use text of the calibration split that calibration never saw
(calib.data.calibration_holdout), never the evaluation split that benchmarks report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compressor.calib.data import TokenSet, calibration_holdout, calibration_set
from compressor.errors import CompressorError
from compressor.methods.base import Method
from compressor.methods.quant.candidates import formats_for, parse_format, unusable_group_sizes
from compressor.methods.quant.mixed import CandidateConfig, MixedConfig, MixedPrecision
from compressor.mixed import interactions as inter
from compressor.mixed import search
from compressor.mixed.predict import Plan, Predictor
from compressor.mixed.probes import KLProbe
from compressor.mixed.sensitivity import (CandidateWeights, SensitivityTable, candidate_source, check_directory,
                                          default_directory, finished, run_pass, sensitivity_fingerprint)
from compressor.models.loading import LoadedModel
from compressor.pipeline.progress import Progress

PROBE_TOKENS_PER_BATCH = 1024  # bounds the [batch, length, vocab] log-probabilities in memory
TIGHTEN = 0.95  # a missed measured budget is retried at this fraction of what the measurement allows
MAX_STEP = 20  # one round tightens the predicted KL at most this many times
TOP_LAYERS = 10
CALIBRATED = 0.05  # a plan measured at most this fraction above its calibrated prediction ends the re-solving


@dataclass
class Calibration:
    """The calibration settings of a command (what `compress quantize` takes)."""

    data: str = "wiki"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    chat_template: bool = False
    batch_size: int = 8

    def tokens(self, tokenizer, log) -> TokenSet:
        return calibration_set(self.data, tokenizer, self.samples, self.seq_len, self.seed, self.text_field,
                               self.chat_template, log)

    def holdout(self, tokenizer, windows: int, log) -> TokenSet:
        return calibration_holdout(self.data, tokenizer, self.samples, self.seq_len, self.seed, windows,
                                   self.text_field, self.chat_template, log)


def _batch(length: int) -> int:
    return max(1, PROBE_TOKENS_PER_BATCH // length)


def _notes(loaded: LoadedModel, config: CandidateConfig) -> list[str]:
    adapter, model = loaded.adapter, loaded.model
    widths = {l.in_features for b in adapter.blocks(model) for l in adapter.block_linears(b).values()}
    skipped = unusable_group_sizes(config.candidate_group_sizes, widths)
    return [f"group size {g} divides no linear's in-features ({', '.join(map(str, sorted(widths)))}); skipped"
            for g in skipped]


def sensitivities(loaded: LoadedModel, transforms: list[Method], config: CandidateConfig, calib: Calibration,
                  directory: str | Path | None, *, device: str, dtype: torch.dtype, hessian_dtype: torch.dtype,
                  interactions: bool, probe_samples: int, probe_len: int, progress: Progress,
                  ) -> tuple[SensitivityTable, Path]:
    """The sensitivity table (from the cache, or one pass now) with its probe measurements."""
    config = config.candidates()
    tokens = calib.tokens(loaded.tokenizer, progress.log)
    key = sensitivity_fingerprint(loaded, transforms, config, tokens, dtype, hessian_dtype, calib.batch_size, device)
    directory = Path(directory) if directory else default_directory(key)
    if finished(directory, key):
        progress.log(f"reusing the sensitivities in {directory}")
        table = SensitivityTable.load(directory)
    else:
        progress.log(f"sensitivity pass into {directory}")
        settings = {"model": loaded.name, "source_sha256": loaded.source_hash,
                    "methods": [m.describe() for m in transforms] + [{"name": "sensitivity",
                                                                     "config": config.model_dump(mode="json")}],
                    "calibration": tokens.describe() | {"seed": calib.seed}}
        table = run_pass(loaded, transforms, config, tokens, directory, key, settings, device=device,
                         batch_size=calib.batch_size, hessian_dtype=hessian_dtype, progress=progress)
        table.notes = _notes(loaded, config)
        table.save(directory)
    probed = (table.interactions or {}).get("probe", {})
    if interactions and (probed.get("windows"), probed.get("length")) != (probe_samples, min(probe_len, tokens.seq_len)):
        started = time.perf_counter()
        weights = CandidateWeights(directory, table)
        _load_block_params(loaded, weights, table.blocks)
        length = min(probe_len, tokens.seq_len)
        probe = KLProbe(loaded.model, loaded.adapter, tokens.input_ids[:probe_samples, :length], _batch(length))
        progress.log(f"probing inter-block dependencies on {probe.tokens} tokens")
        measured = inter.measure(probe, table.linears, weights, progress.log)
        table.interactions = measured.to_json()
        table.timings["probes_s"] = time.perf_counter() - started
        table.save(directory)
    return table, directory


def _cheapest_bits(loaded: LoadedModel, config: CandidateConfig) -> float:
    formats = config.formats()
    bits = params = 0
    for block in loaded.adapter.blocks(loaded.model):
        for linear in loaded.adapter.block_linears(block).values():
            out_f, in_f = linear.out_features, linear.in_features
            bits += min(f.storage_bits(out_f, in_f, config.sym, config.scale_dtype) for f in formats_for(in_f, formats))
            params += out_f * in_f
    return bits / params


def _load_block_params(loaded: LoadedModel, weights: CandidateWeights, blocks: int) -> None:
    """The float model as the pass left it (its transforms folded in), whatever is in memory now."""
    for index, block in enumerate(loaded.adapter.blocks(loaded.model)[:blocks]):
        block.load_state_dict(weights.block(index)[0], strict=True)


def predictor_for(table: SensitivityTable, augmented: bool = True) -> Predictor:
    measured = inter.Interactions.from_json(table.interactions) if augmented and table.interactions else None
    return Predictor(table, measured)


def top_layers(table: SensitivityTable, predictor: Predictor, count: int = TOP_LAYERS) -> list[dict]:
    """The linears whose reference-format (≈3-bit) error costs the most predicted KL."""
    reference = inter.reference_formats(table.linears)
    ranked = sorted(table.linears, key=lambda l: -predictor.linear_loss(l, reference[l.name]))
    return [{"linear": l.name, "format": reference[l.name], "predicted_kl": predictor.linear_loss(l, reference[l.name]),
             "hessian_score": l.scores[reference[l.name]]} for l in ranked[:count]]


# ---------------------------------------------------------------- the search and its builds

class Verifier:
    """KL and perplexity of a plan's weights on held-out calibration text, against the base."""

    def __init__(self, loaded: LoadedModel, tokens: TokenSet, weights: CandidateWeights):
        self.probe = KLProbe(loaded.model, loaded.adapter, tokens.input_ids, _batch(tokens.seq_len),
                             cache_inputs=False)
        self.weights = weights
        self.tokens = tokens
        self.results: dict[tuple, dict] = {}

    def __call__(self, plan: Plan) -> dict[str, float]:
        key = tuple(sorted(plan.items()))
        if key not in self.results:
            measured = self.probe.measure({name: self.weights(name, fmt) for name, fmt in plan.items()})
            self.results[key] = {**measured, "ppl_increase": 100 * (measured["ppl"] / self.probe.base_ppl - 1),
                                 "base_ppl": self.probe.base_ppl, "data": self.tokens.describe()}
        return self.results[key]

    def compare(self, model) -> dict[str, float]:
        """The same measurement of another model (a sequential build)."""
        measured = self.probe.compare(model)
        return {**measured, "ppl_increase": 100 * (measured["ppl"] / self.probe.base_ppl - 1),
                "base_ppl": self.probe.base_ppl, "data": self.tokens.describe()}


def _within(budget: str, limit: float, measured: dict) -> bool:
    return measured["kl"] <= limit if budget == "max_kl" else measured["ppl_increase"] <= limit


def _next_allowance(history: list[tuple[float, float]], goal: float) -> float:
    """The predicted-KL allowance expected to measure `goal`, from (predicted, measured) of the
    rounds so far: proportional after one, the secant in logs after two; always tighter than the last."""
    predicted, measured = history[-1]
    allowed = predicted * goal / measured
    if len(history) > 1:
        (p0, m0), (p1, m1) = history[-2], history[-1]
        if p0 != p1 and m0 != m1 and (math.log(m1) - math.log(m0)) / (math.log(p1) - math.log(p0)) > 0:
            slope = (math.log(m1) - math.log(m0)) / (math.log(p1) - math.log(p0))
            allowed = math.exp(math.log(p1) + (math.log(goal) - math.log(m1)) / slope)
    return min(max(allowed, predicted / MAX_STEP), predicted * TIGHTEN)


def _verified_for_bits(table: SensitivityTable, predictor: Predictor, target: float, max_rounds: int,
                       measure: Callable[[Plan], dict], progress: Progress) -> tuple[search.Choice, dict, list[dict]]:
    """The plan for a bits budget, measured beside the best uniform format within the budget.

    The uniform plan's measured / predicted KL calibrates the prediction. When a mixed plan measures
    worse than that calibration expects, the bit widths below the uniform's take the difference
    (their scores are scaled up to match) and the plan is re-solved, up to `max_rounds` plans. A plan
    measuring as expected or better ends the search: the prediction holds (scaling scores down on
    that evidence chased cheaper plans that measured worse). The best measured plan is kept, so a
    bits budget never ends worse than uniform precision.
    """
    tried: list[tuple[search.Choice, dict]] = []
    rounds: list[dict] = []
    uniform = search.uniform_within(table, predictor, target)
    calibration = 1.0
    if uniform is not None:
        measured = measure(uniform.plan)
        tried.append((uniform, measured))
        calibration = measured["kl"] / max(uniform.predicted_kl, 1e-12)
        rounds.append({"round": 0, "uniform": uniform.uniform, "formats": uniform.counts(),
                       "bits_per_weight": uniform.bits_per_weight,
                       "predicted_kl": uniform.predicted_kl, "measured_kl": measured["kl"],
                       "measured_ppl_increase": measured["ppl_increase"]})
        progress.log(f"uniform {uniform.uniform}: {uniform.bits_per_weight:.3f} bits, predicted KL "
                     f"{uniform.predicted_kl:.4g}, measured KL {measured['kl']:.4g}")
    floor = parse_format(uniform.uniform).bits if uniform is not None else None
    factors: dict[int, float] = {}
    for number in range(max_rounds):
        calibrated = Predictor(search.scaled(table, factors), predictor.interactions)
        choice = search.for_bits(calibrated.table, calibrated, target)
        if any(choice.plan == plan.plan for plan, _ in tried):
            break
        measured = measure(choice.plan)
        tried.append((choice, measured))
        rounds.append({"round": number + 1, "formats": choice.counts(), "bits_per_weight": choice.bits_per_weight,
                       "scale_by_bits": dict(factors),
                       "predicted_kl": choice.predicted_kl, "measured_kl": measured["kl"],
                       "measured_ppl_increase": measured["ppl_increase"]})
        progress.log(f"round {number + 1}: {choice.bits_per_weight:.3f} bits, predicted KL {choice.predicted_kl:.4g}, "
                     f"measured KL {measured['kl']:.4g}, perplexity +{measured['ppl_increase']:.2f}%")
        families = calibrated.family_losses(choice.plan)
        blamed = [b for b in families if b < floor] if floor is not None else [min(families)]
        blamed_loss = sum(families[b] for b in blamed)
        if not blamed_loss:
            break
        coupling = choice.predicted_kl / sum(families.values())
        factor = (measured["kl"] / calibration / coupling - (sum(families.values()) - blamed_loss)) / blamed_loss
        if factor < 1 + CALIBRATED:
            break
        factor = min(factor, MAX_STEP)
        for b in blamed:
            factors[b] = factors.get(b, 1.0) * factor
    best, measured = min(tried, key=lambda pair: pair[1]["kl"])
    if best is uniform and len(tried) > 1:
        progress.log(f"uniform {uniform.uniform} measured better than every mixed plan tried; keeping it")
    return best, measured, rounds


def choose(table: SensitivityTable, predictor: Predictor, config: MixedConfig,
           measure: Callable[[Plan], dict], progress: Progress) -> tuple[search.Choice, dict, list[dict]]:
    """The plan for the config's budget, its measurement, and every round tried."""
    budget, limit = config.budget()
    if budget == "target_bits":
        return _verified_for_bits(table, predictor, limit, config.max_rounds, measure, progress)
    # A KL budget steers the predicted KL; a perplexity budget starts from KL ≈ ΔNLL = log(1 + P).
    target = limit if budget == "max_kl" else math.log1p(limit / 100)
    allowed = target
    rounds, history = [], []
    for number in range(config.max_rounds):
        choice = search.for_loss(table, predictor, allowed)
        measured = measure(choice.plan)
        reached = measured["kl"] if budget == "max_kl" else math.log1p(max(measured["ppl_increase"], 0) / 100)
        history.append((choice.predicted_kl, max(reached, 1e-12)))
        rounds.append({"round": number + 1, "predicted_kl_allowed": allowed, "bits_per_weight": choice.bits_per_weight,
                       "predicted_kl": choice.predicted_kl, "measured_kl": measured["kl"],
                       "measured_ppl_increase": measured["ppl_increase"]})
        progress.log(f"round {number + 1}: {choice.bits_per_weight:.3f} bits, predicted KL {choice.predicted_kl:.4g}, "
                     f"measured KL {measured['kl']:.4g}, perplexity +{measured['ppl_increase']:.2f}%")
        if _within(budget, limit, measured):
            return choice, measured, rounds
        allowed = _next_allowance(history, TIGHTEN * target)
    progress.warn(f"the measured budget is still missed after {config.max_rounds} rounds; keeping the last plan "
                  "(raise --max-rounds, or loosen the budget)")
    return choice, measured, rounds


def quantize_mixed(model: str, chain: list[Method], out: Path, *, calib: Calibration, device: str,
                   dtype: torch.dtype, hessian_dtype: torch.dtype, overwrite: bool, allow_pickle: bool, verify: bool,
                   progress: Progress, load: Callable[..., LoadedModel], build: Callable[..., dict],
                   resume: bool = False, restart: bool = False) -> dict:
    """`compress quantize --mixed`: search a plan for the budget and build it with `build` (api.compress);
    `load` is api.load; `resume` / `restart` continue or discard an interrupted build (the search is
    deterministic, so it finds the same plan again from the cached pass)."""
    started = time.perf_counter()
    mixer: MixedPrecision = chain[-1]
    config: MixedConfig = mixer.config
    transforms = chain[:-1]
    if config.budget() is None:
        raise CompressorError("--mixed needs a budget", "pass --target-bits, --max-kl or --max-ppl-increase")
    if config.sensitivity:
        check_directory(Path(config.sensitivity))
    loaded = load(model, dtype=dtype, allow_pickle=allow_pickle, progress=progress, verify=verify)
    if config.target_bits is not None:  # known from the shapes alone: before the pass
        search.check_target(config.target_bits, _cheapest_bits(loaded, config))
    table, directory = sensitivities(loaded, transforms, config, calib, config.sensitivity, device=device,
                                     dtype=dtype, hessian_dtype=hessian_dtype, interactions=config.interactions,
                                     probe_samples=config.probe_samples, probe_len=config.probe_len,
                                     progress=progress)
    for note in table.notes:
        progress.log(note)
    searched = time.perf_counter()
    weights = CandidateWeights(directory, table)
    _load_block_params(loaded, weights, table.blocks)
    verifier = Verifier(loaded, calib.holdout(loaded.tokenizer, config.verify_windows, progress.log), weights)
    predictor = predictor_for(table, config.interactions)
    choice, measured, rounds = choose(table, predictor, config, verifier, progress)
    if choice.uniform:
        progress.log(f"uniform {choice.uniform} meets the budget; building it")
    summary = {"predicted_kl": choice.predicted_kl, "predicted_hessian": choice.predicted_plain,
               "bits_per_weight": choice.bits_per_weight, "formats": choice.counts(), "uniform": choice.uniform,
               "measured": measured, "rounds": rounds, "sensitivity": str(directory),
               "augmented": predictor.interactions is not None}
    search_s = time.perf_counter() - searched
    planned = MixedPrecision(config.model_copy(update={"plan": choice.plan, "sensitivity": str(directory)}))
    if config.build == "cached":
        # The pass's transforms are in the cached block parameters; what was measured is what is built.
        del loaded, verifier
        planned.use_candidates(candidate_source(directory, table.blocks))
        chain, metrics = [planned], {"mixed": summary}
    else:
        chain = [*transforms, planned]

        def metrics(built) -> dict:
            return {"mixed": {**summary, "measured_cached_candidates": measured,
                              "measured": verifier.compare(built)}}
    result = build(model, chain, out, calib=calib.data, samples=calib.samples, seq_len=calib.seq_len,
                   seed=calib.seed, text_field=calib.text_field, chat_template=calib.chat_template, device=device,
                   batch_size=calib.batch_size, dtype=dtype, hessian_dtype=hessian_dtype, overwrite=overwrite,
                   allow_pickle=allow_pickle, verify=verify, progress=progress, extra_metrics=metrics,
                   resume=resume, restart=restart)
    timings = {"search_s": search_s, **table.timings, "total_s": time.perf_counter() - started}
    return {**result, "timings": timings}


def sensitivity_command(model: str, chain: list[Method], out: Path, *, calib: Calibration, device: str,
                        dtype: torch.dtype, hessian_dtype: torch.dtype, allow_pickle: bool, verify: bool,
                        progress: Progress, load: Callable[..., LoadedModel]) -> dict:
    """`compress sensitivity`: the table (JSON), its heatmap (PNG) and the most sensitive linears."""
    from compressor.mixed.plots import heatmap

    started = time.perf_counter()
    config: MixedConfig = chain[-1].config
    loaded = load(model, dtype=dtype, allow_pickle=allow_pickle, progress=progress, verify=verify)
    table, directory = sensitivities(loaded, chain[:-1], config, calib, out, device=device, dtype=dtype,
                                     hessian_dtype=hessian_dtype, interactions=config.interactions,
                                     probe_samples=config.probe_samples, probe_len=config.probe_len,
                                     progress=progress)
    predictor = predictor_for(table, config.interactions)
    png = directory / "heatmap.png"
    png.write_bytes(heatmap(table, predictor))
    return {"output": str(directory), "table": str(directory / "sensitivity.json"), "heatmap": str(png),
            "linears": len(table.linears), "formats": sorted({f for l in table.linears for f in l.scores}),
            "notes": table.notes, "top": top_layers(table, predictor), "augmented": predictor.interactions is not None,
            "timings": {**table.timings, "total_s": time.perf_counter() - started}}
