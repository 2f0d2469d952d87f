"""Mixed precision: candidate bits as stored, the stacked GPTQ sweep, the knapsack, the sensitivity
pass and its cache, the search under each budget, the artifact (one config group per format) in our
reader and in transformers, and the bad-input rows of the issue."""

from __future__ import annotations

import itertools
import json
import signal

import numpy as np
import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.formats import compressed_tensors
from compressor.methods.quant.candidates import KEEP, Format, parse_format
from compressor.methods.quant.gptq import GPTQConfig, gptq_quantize, gptq_quantize_rows
from compressor.mixed import driver, knapsack
from helpers import api_in_subprocess, artifact_files, assert_cli_error, cli

PROBE = {"probe_samples": 4, "probe_len": 32, "verify_windows": 4}


@pytest.fixture(scope="module")
def calib(text_file):
    return {"calib": str(text_file), "samples": 16, "seq_len": 64}


@pytest.fixture(scope="module")
def sensitivity(tiny_llama, calib, tmp_path_factory):
    """One sensitivity pass (GPTQ, symmetric, act-order) shared by the tests that search on it."""
    out = tmp_path_factory.mktemp("sensitivity") / "s"
    result = api.sensitivity(str(tiny_llama), "gptq", out, {"act_order": True, **PROBE}, **calib)
    return out, result


def _mixed(tiny_llama, out, calib, sensitivity_dir, **options):
    return api.quantize(str(tiny_llama), "gptq", out, {"act_order": True, "sensitivity": str(sensitivity_dir),
                                                       **PROBE, **options}, mixed=True, **calib)


# ---------------------------------------------------------------- formats and the sweep

@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(576, 576), (576, 1536), (100, 64)])
def test_storage_bits_are_the_bits_written(shape, sym):
    out_f, in_f = shape
    for fmt in (Format(2, 64), Format(3, 32), Format(4, 64), Format(8, 32)):
        if not fmt.fits(in_f):
            continue
        scheme = fmt.scheme(sym)
        groups = in_f // fmt.group_size
        record = {"qweight": torch.zeros(out_f, in_f, dtype=torch.int8), "scale": torch.ones(out_f, groups,
                                                                                              dtype=torch.float16)}
        if not sym:
            record["zero_point"] = torch.zeros(out_f, groups, dtype=torch.int8)
        written = compressed_tensors.encode("m", record, scheme)
        stored = sum(8 * t.numel() * t.element_size() for k, t in written.items() if not k.endswith("weight_shape"))
        assert fmt.storage_bits(out_f, in_f, sym) == stored
    assert KEEP.bits_per_weight(out_f, in_f, sym) == 16
    assert parse_format("int3-g64") == Format(3, 64) and parse_format("fp16") == KEEP


def test_one_sweep_for_several_formats_equals_separate_sweeps():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.rand(64) * 3
    h = x.T @ x / 512
    w = torch.randn(48, 64)
    configs = [GPTQConfig(bits=3, group_size=32, sym=False, act_order=True),
               GPTQConfig(bits=4, group_size=64, sym=False, act_order=True),
               GPTQConfig(bits=8, group_size=32, sym=False, act_order=True)]
    parts = [w[:16], w[16:40], w[40:]]
    stacked, _ = gptq_quantize_rows(w, h, [(p.shape[0], c) for p, c in zip(parts, configs)])
    for part, config, record in zip(parts, configs, stacked):
        alone, _ = gptq_quantize(part, h, config)
        assert torch.equal(alone["qweight"], record["qweight"])
        torch.testing.assert_close(alone["scale"].float(), record["scale"].float(), rtol=1e-3, atol=0)
        assert torch.equal(alone["zero_point"], record["zero_point"])


def test_candidates_split_across_cpu_threads_equal_one_sweep():
    from compressor.methods.quant.mixed import CandidateConfig, _in_threads, _quantize_rows

    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.rand(64) * 3
    h = x.T @ x / 512
    weights = [torch.randn(48, 64), torch.randn(16, 64)]
    config = CandidateConfig(sym=False, act_order=True)
    pairs = [(w, f) for f in (Format(2, 32), Format(3, 64), Format(4, 32), Format(8, 64)) for w in weights]
    threads = []

    def work(chunk):
        threads.append(torch.get_num_threads())
        return _quantize_rows(config, [w for w, _ in chunk], [f for _, f in chunk], h, "x")

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split = _in_threads(work, pairs, h.device)
    finally:
        torch.set_num_threads(before)
    assert threads == [1, 1, 1] and len(split) == len(pairs)
    for one, other in zip(_quantize_rows(config, [w for w, _ in pairs], [f for _, f in pairs], h, "x"), split):
        assert torch.equal(one["qweight"], other["qweight"]) and torch.equal(one["zero_point"], other["zero_point"])
        torch.testing.assert_close(one["scale"].float(), other["scale"].float(), rtol=1e-3, atol=0)


# ---------------------------------------------------------------- the knapsack

def test_the_programme_is_exact_and_the_relaxation_feasible():
    rng = np.random.default_rng(0)
    for _ in range(20):
        items = [knapsack.Item(np.sort(rng.uniform(1, 10, 3)), np.sort(rng.uniform(0, 5, 3))[::-1].copy())
                 for _ in range(6)]
        budget = rng.uniform(sum(i.costs.min() for i in items), sum(i.costs.max() for i in items))
        feasible = [c for c in itertools.product(range(3), repeat=6)
                    if sum(i.costs[k] for i, k in zip(items, c)) <= budget]
        optimum = min(sum(i.losses[k] for i, k in zip(items, c)) for c in feasible)
        exact = knapsack.frontier(items, budget, resolution=20000).solve(budget)
        assert sum(i.costs[k] for i, k in zip(items, exact)) <= budget
        # Costs are rounded up to 1/20000 of the budget: the optimum may be missed only within that slack.
        loss = sum(i.losses[k] for i, k in zip(items, exact))
        assert loss <= optimum + 1e-9 or any(
            sum(i.costs[k] for i, k in zip(items, c)) > budget * (1 - 6 / 20000) for c in feasible
            if abs(sum(i.losses[k] for i, k in zip(items, c)) - optimum) < 1e-9)
        relaxed = knapsack.lagrangian(items, budget)
        assert sum(i.costs[k] for i, k in zip(items, relaxed)) <= budget + 1e-9
        assert sum(i.losses[k] for i, k in zip(items, relaxed)) >= optimum - 1e-9
    frontier = knapsack.frontier(items, sum(i.costs.max() for i in items))
    cheapest = frontier.cheapest_within(optimum)
    assert sum(i.losses[k] for i, k in zip(items, cheapest)) <= optimum + 1e-9
    assert knapsack.lagrangian(items, sum(i.costs.min() for i in items) - 1) is None


# ---------------------------------------------------------------- the pass and its cache

def test_sensitivity_pass_writes_scores_heatmap_and_probes(sensitivity, tiny_llama):
    out, result = sensitivity
    table = json.loads((out / "sensitivity.json").read_text())
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(table["linears"]) == 3 * 7
    for linear in table["linears"]:
        scores = linear["scores"]
        for g in (32, 64):  # fewer bits at the same group size cost more (the real GPTQ error)
            assert scores[f"int2-g{g}"] > scores[f"int3-g{g}"] > scores[f"int4-g{g}"] > scores[f"int8-g{g}"] > 0
        assert scores["fp16"] < scores["int8-g64"]
        assert ("int2-g128" in scores) == (linear["in_features"] % 128 == 0)
    probes = table["interactions"]
    assert len(probes["single"]) == 3 and len(probes["pair"]) == 2 and all(g > 0 for g in probes["gains"])
    assert len(result["top"]) == 10 and result["augmented"] and result["notes"] == []
    assert not list(out.glob("inputs-*")), "the kept directory holds no calibration activations"


def test_budget_build_loads_in_our_reader_and_transformers(sensitivity, tiny_llama, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    result = _mixed(tiny_llama, out, calib, sensitivity[0], target_bits=3.5)
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["method"]["config"]["plan"]
    summary = manifest["metrics"]["mixed"]
    assert manifest["metrics"]["bits_per_weight"] <= 3.5
    assert manifest["metrics"]["bits_per_weight"] == pytest.approx(summary["bits_per_weight"], abs=1e-3)
    assert summary["predicted_kl"] > 0 and summary["measured"]["kl"] > 0 and summary["augmented"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    formats = {f for f in plan.values() if f != "fp16"}
    assert len(config["config_groups"]) == len(formats) > 1
    for group in config["config_groups"].values():
        fmt = {f"int{group['weights']['num_bits']}-g{group['weights']['group_size']}"}
        assert {plan[m] for m in group["targets"]} == fmt
    assert api.inspect(str(out))["bit_map"] == plan
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = api.load(out).model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    assert result["mixed"]["formats"] == {f: list(plan.values()).count(f) for f in sorted(set(plan.values()))}


def test_what_was_measured_is_what_was_built(sensitivity, tiny_llama, calib, tmp_path):
    """The KL the search recorded equals the KL of the artifact, reloaded, on the same held-out text."""
    from compressor.calib.data import calibration_holdout
    from compressor.mixed.probes import KLProbe

    out = tmp_path / "q"
    measured = _mixed(tiny_llama, out, calib, sensitivity[0], target_bits=3.0)["mixed"]["measured"]
    base = api.load(str(tiny_llama))
    held = calibration_holdout(calib["calib"], base.tokenizer, 16, 64, 0, PROBE["verify_windows"])
    again = KLProbe(base.model, base.adapter, held.input_ids, cache_inputs=False).compare(api.load(out).model)
    assert again["kl"] == pytest.approx(measured["kl"], rel=1e-4)
    assert again["ppl"] == pytest.approx(measured["ppl"], rel=1e-5)


def test_a_second_budget_reuses_the_cached_pass(sensitivity, tiny_llama, calib, tmp_path, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the sensitivity pass ran again")

    monkeypatch.setattr(driver, "run_pass", no_pass)
    monkeypatch.setattr(driver.inter, "measure", no_pass)
    low = _mixed(tiny_llama, tmp_path / "low", calib, sensitivity[0], target_bits=2.6)["mixed"]
    high = _mixed(tiny_llama, tmp_path / "high", calib, sensitivity[0], target_bits=4.5)["mixed"]
    assert low["bits_per_weight"] <= 2.6 < 4.3 < high["bits_per_weight"] <= 4.5
    assert low["predicted_kl"] > high["predicted_kl"] and low["measured"]["kl"] > high["measured"]["kl"]


def test_a_kl_budget_is_met_as_measured(sensitivity, tiny_llama, calib, tmp_path):
    loose = _mixed(tiny_llama, tmp_path / "a", calib, sensitivity[0], target_bits=3.0)["mixed"]["measured"]["kl"]
    result = _mixed(tiny_llama, tmp_path / "b", calib, sensitivity[0], max_kl=loose / 3)["mixed"]
    assert result["measured"]["kl"] <= loose / 3
    assert result["rounds"] and all(r["measured_kl"] > loose / 3 for r in result["rounds"][:-1])


def test_a_perplexity_budget_is_met_as_measured(sensitivity, tiny_llama, calib, tmp_path):
    # The tiny random model's perplexity moves little (either way) when quantized: a tight budget.
    allowed = 0.05
    result = _mixed(tiny_llama, tmp_path / "b", calib, sensitivity[0], max_ppl_increase=allowed)["mixed"]
    assert result["measured"]["ppl_increase"] <= allowed
    assert all(r["measured_ppl_increase"] > allowed for r in result["rounds"][:-1])
    assert result["rounds"][-1]["measured_ppl_increase"] == result["measured"]["ppl_increase"]


def test_a_bits_budget_is_measured_beside_uniform_and_the_prediction_recalibrated(sensitivity, tiny_llama, calib,
                                                                                  tmp_path, monkeypatch):
    """2-bit linears that cost far more than predicted (as on gemma3-270m; here the measurement adds
    a fixed KL per 2-bit linear): the plan measures worse than the calibration expects, the 2-bit
    scores are scaled up to match and the plan re-solved with fewer of them; what is kept is the best
    plan measured, never worse than the best uniform format within the budget."""
    honest = driver.Verifier.__call__

    def costly_two_bits(self, plan):
        measured = dict(honest(self, plan))
        measured["kl"] += 1e-4 * sum(f.startswith("int2") for f in plan.values())
        return measured

    monkeypatch.setattr(driver.Verifier, "__call__", costly_two_bits)
    result = _mixed(tiny_llama, tmp_path / "q", calib, sensitivity[0], target_bits=3.3, max_rounds=4)
    mixed = result["mixed"]
    uniform, first, second, *_ = mixed["rounds"]
    assert (uniform["round"], uniform["uniform"]) == (0, "int3-g64")
    assert first["scale_by_bits"] == {} and second["scale_by_bits"][2] > 2
    assert first["measured_kl"] > 2 * first["predicted_kl"] * uniform["measured_kl"] / uniform["predicted_kl"]
    assert second["measured_kl"] < first["measured_kl"]
    kept = min(mixed["rounds"], key=lambda r: r["measured_kl"])
    assert mixed["measured"]["kl"] == kept["measured_kl"] <= uniform["measured_kl"]
    assert mixed["bits_per_weight"] == pytest.approx(kept["bits_per_weight"]) and mixed["bits_per_weight"] <= 3.3

    def two_bit(r):
        return sum(n for f, n in r["formats"].items() if f.startswith("int2"))

    assert two_bit(second) < two_bit(first)
    plan = json.loads((tmp_path / "q" / "manifest.json").read_text())["method"]["config"]["plan"]
    assert sum(f.startswith("int2") for f in plan.values()) == two_bit(kept)


def test_a_plan_measuring_better_than_predicted_ends_the_bits_search(sensitivity, tiny_llama, calib, tmp_path,
                                                                    monkeypatch):
    honest = driver.Verifier.__call__

    def mixed_plans_measure_better(self, plan):
        measured = dict(honest(self, plan))
        measured["kl"] *= 1.0 if len(set(plan.values())) == 1 else 0.5
        return measured

    monkeypatch.setattr(driver.Verifier, "__call__", mixed_plans_measure_better)
    mixed = _mixed(tiny_llama, tmp_path / "q", calib, sensitivity[0], target_bits=3.3, max_rounds=4)["mixed"]
    assert [r["round"] for r in mixed["rounds"]] == [0, 1]
    assert mixed["measured"]["kl"] == mixed["rounds"][1]["measured_kl"]


def test_a_budget_every_linear_can_keep_builds_uniform_16_bit(sensitivity, tiny_llama, calib, tmp_path):
    result = _mixed(tiny_llama, tmp_path / "q", calib, sensitivity[0], target_bits=16)["mixed"]
    assert result["uniform"] == "fp16"
    base, built = api.load(str(tiny_llama)).model, api.load(tmp_path / "q").model
    for name, weight in base.named_parameters():
        expected = weight.half().float() if name.endswith("proj.weight") else weight
        assert torch.equal(built.get_parameter(name), expected), name


def test_awq_then_mixed_builds_from_the_cache_with_folded_norms(tiny_llama, calib, tmp_path):
    out = tmp_path / "q"
    # 96 divides none of the tiny model's in-features (64, 128): skipped with a note, not an error.
    result = api.quantize(str(tiny_llama), "awq+gptq", out, {"target_bits": 3.5, "grid": 4, "search_samples": 4,
                                                             "candidate_group_sizes": [32, 64, 96, 128],
                                                             "sensitivity": str(tmp_path / "s"), **PROBE},
                          mixed=True, **calib)
    assert [m["name"] for m in result["method"]["methods"]] == ["mixed"]
    table = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert [m["name"] for m in table["settings"]["methods"]] == ["awq", "sensitivity"]
    assert table["notes"] == ["group size 96 divides no linear's in-features (64, 128); skipped"]
    base, built = api.load(str(tiny_llama)).model, api.load(out).model
    norms = [n for n, _ in base.named_parameters() if "layernorm" in n]
    assert any(not torch.equal(base.get_parameter(n), built.get_parameter(n)) for n in norms)


def test_sequential_build_requantizes_in_the_plan(sensitivity, tiny_llama, calib, tmp_path):
    out = tmp_path / "q"
    result = _mixed(tiny_llama, out, calib, sensitivity[0], target_bits=3.5, build="sequential")["mixed"]
    cached = _mixed(tiny_llama, tmp_path / "c", calib, sensitivity[0], target_bits=3.5)["mixed"]
    assert result["formats"] == cached["formats"]
    assert "measured_cached_candidates" in json.loads((out / "manifest.json").read_text())["metrics"]["mixed"]
    assert (out / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_rtn_scores_then_a_sequential_gptq_build(sensitivity, tiny_llama, calib, tmp_path):
    """Scores from the RTN error (a fast pass), the build re-quantized with GPTQ in the chosen formats."""
    scored = tmp_path / "s"
    result = _mixed(tiny_llama, tmp_path / "q", calib, scored, target_bits=3.5, score_with="rtn",
                    build="sequential")["mixed"]
    assert result["bits_per_weight"] <= 3.5 and result["measured"]["kl"] > 0
    rtn = json.loads((scored / "sensitivity.json").read_text())["linears"]
    gptq = json.loads((sensitivity[0] / "sensitivity.json").read_text())["linears"]
    assert sum(l["scores"]["int3-g64"] for l in rtn) > sum(l["scores"]["int3-g64"] for l in gptq)
    with pytest.raises(CompressorError, match="add --build sequential"):
        _mixed(tiny_llama, tmp_path / "c", calib, scored, target_bits=3.5, score_with="rtn")


# ---------------------------------------------------------------- bad input and the command line

@pytest.mark.parametrize("args,phrases", [
    (["--target-bits", "3.5", "--max-kl", "0.1", "--mixed"], ["--target-bits and --max-kl are alternative budgets"]),
    (["--mixed", "--target-bits", "3.5", "--bits", "4"], ["--mixed chooses each linear's bits", "--bits"]),
    (["--target-bits", "3.5"], ["mixed-precision budget", "add --mixed"]),
    (["--mixed"], ["--mixed needs a budget"]),
    (["--mixed", "--target-bits", "3", "--method", "hqq"], ["--mixed needs gptq or rtn"]),
])
def test_conflicting_flags_are_one_line_errors(args, phrases, tiny_llama, tmp_path):
    assert_cli_error(cli("quantize", tiny_llama, "-o", tmp_path / "q", *args), *phrases)
    assert not (tmp_path / "q").exists()


def test_a_budget_below_the_smallest_format_names_the_smallest(tiny_llama, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "run_pass", lambda *a, **k: pytest.fail("the pass ran before the check"))
    # int2 at group 64 (2 + 16/64 bits) everywhere but down_proj, which takes group 128 (2 + 16/128)
    smallest = (28672 * 2.25 + 8192 * 2.125) / 36864
    with pytest.raises(CompressorError, match=f"below the smallest achievable {smallest:.4f}"):
        api.quantize(str(tiny_llama), "gptq", tmp_path / "q", {"target_bits": 2.0}, mixed=True, **calib)


def test_cli_sensitivity_quantize_and_inspect(sensitivity, tiny_llama, text_file, tmp_path):
    out, _ = sensitivity
    shown = cli("sensitivity", tiny_llama, "-o", out, "--act-order", "--probe-samples", "4", "--probe-len", "32",
                "--calib", text_file, "--samples", "16", "--seq-len", "64")
    assert shown.exit_code == 0, shown.stderr
    assert "most sensitive linears" in shown.stdout
    built = cli("quantize", tiny_llama, "-o", tmp_path / "q", "--method", "gptq", "--mixed", "--target-bits", "3.25",
                "--act-order", "--sensitivity", out, "--probe-samples", "4", "--probe-len", "32",
                "--verify-windows", "4", "--calib", text_file, "--samples", "16", "--seq-len", "64", "--json")
    assert built.exit_code == 0, built.stderr
    assert json.loads(built.stdout)["bits_per_weight"] <= 3.25
    inspected = cli("inspect", tmp_path / "q")
    assert inspected.exit_code == 0 and "bits/group size per linear" in inspected.stdout


def test_a_build_killed_after_the_search_resumes_to_the_same_artifact(sensitivity, tiny_llama, calib, tmp_path):
    """Found while adding mixed precision to the kill campaign: a build killed after the search left
    its run directory beside the output, and the rerun was refused with advice (--resume) that
    --mixed refused as well."""
    options = {"act_order": True, "sensitivity": str(sensitivity[0]), **PROBE, "target_bits": 3.5}
    clean = tmp_path / "clean"
    api.quantize(str(tiny_llama), "gptq", clean, options, mixed=True, **calib)
    out = tmp_path / "q"
    killed = api_in_subprocess("quantize", str(tiny_llama), "gptq", out, options, mixed=True, kill_after=0, **calib)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert api.run_directory_for(out).is_dir() and not out.exists()
    with pytest.raises(CompressorError, match="pass --resume to continue it or --restart"):
        api.quantize(str(tiny_llama), "gptq", out, options, mixed=True, **calib)
    api.quantize(str(tiny_llama), "gptq", out, options, mixed=True, resume=True, **calib)
    assert artifact_files(out) == artifact_files(clean)
    assert not api.run_directory_for(out).exists()
