"""Where FP8's perplexity increase comes from on the reference model: weights, activations, or both.

The `fp8` method rounds weights to E4M3 with one scale per output channel and the linears' inputs
to E4M3 with one scale per token at run time. This script applies each rounding alone, both
together (what the artifact computes), and finer scales (per group of 64 inputs for weights or
activations), in process on the fp32 model, and measures perplexity and KL on the protocol's
held-out windows of wiki and, out of domain, Austen. Rounding is done with the same functions the
artifact's weights and our reader's activation simulation use.

    python benchmarks/fp8_split.py [--device cuda] [--windows 64]
    python benchmarks/fp8_split.py --report-only

Writes benchmarks/results/fp8_split.json and reports/fp8_split.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, report_cli, table, write_report, write_results  # noqa: E402

NAME = "fp8_split"
GROUP = 64


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    from compressor.methods.quant.fp8 import fp8_codes

    return fp8_codes(x).to(x.dtype)


def weights_channel(w: torch.Tensor) -> torch.Tensor:
    from compressor.methods.quant.fp8 import quantize_fp8_weight

    record = quantize_fp8_weight(w)
    return (record["qweight"].float() * record["scale"]).to(w.dtype)


def weights_group(w: torch.Tensor) -> torch.Tensor:
    from compressor.methods.quant.fp8 import FP8_MAX

    out, cols = w.shape
    g = w.float().reshape(out, cols // GROUP, GROUP)
    scale = (g.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (_e4m3(g / scale) * scale).reshape(out, cols).to(w.dtype)


def inputs_token(x: torch.Tensor) -> torch.Tensor:
    from compressor.formats.activations import fake_quantize

    return fake_quantize(x, "float", 8)


def inputs_group(x: torch.Tensor) -> torch.Tensor:
    from compressor.methods.quant.fp8 import FP8_MAX

    g = x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    scale = (g.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(x.dtype).eps)
    return (_e4m3(g / scale) * scale).reshape(x.shape)


VARIANTS = {  # name: (weight rounding, input rounding, what it is)
    "weights": (weights_channel, None, "E4M3 weights per output channel, inputs in fp32"),
    "activations": (None, inputs_token, "fp32 weights, E4M3 inputs per token"),
    "both": (weights_channel, inputs_token, "both: what the fp8 artifact computes"),
    "both-act-g64": (weights_channel, inputs_group, f"inputs scaled per token and group of {GROUP}"),
    "both-w-g64": (weights_group, inputs_token, f"weights scaled per output channel and group of {GROUP}"),
}


def rounded(base: nn.Module, weight_fn, input_fn) -> nn.Module:
    """A copy of `base` with every decoder linear's weights and/or inputs rounded (not lm_head)."""
    model = copy.deepcopy(base)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        if weight_fn is not None:
            module.weight.data = weight_fn(module.weight.data)
        if input_fn is not None:
            module.register_forward_pre_hook(lambda _m, inputs, fn=input_fn: (fn(inputs[0]), *inputs[1:]))
    return model


def measure(args: argparse.Namespace) -> list[dict]:
    from compressor import api
    from compressor.calib.data import evaluation_set
    from compressor.evaluation.perplexity import evaluate_models

    loaded = api.load(args.model)
    base = loaded.model.float().eval().to(args.device)
    models = {name: rounded(base, w, a) for name, (w, a, _) in VARIANTS.items()}
    rows = {name: {"variant": name, "what": VARIANTS[name][2]} for name in VARIANTS}
    rows["fp32"] = {"variant": "fp32", "what": "the reference model in float32"}
    for text in args.texts.split(","):
        tokens = evaluation_set(text, loaded.tokenizer, args.windows, 512)
        results = evaluate_models(models, tokens, base, batch_size=4, device=args.device)
        rows["fp32"][f"{text}_ppl"] = results["base"]["ppl"]
        for name in VARIANTS:
            rows[name][f"{text}_ppl"] = results[name]["ppl"]
            rows[name][f"{text}_kl"] = results[name]["kl"]
        print({name: round(results[name]["ppl"], 4) for name in results if name in VARIANTS or name == "base"},
              flush=True)
    return [rows["fp32"], *(rows[name] for name in VARIANTS)]


ROUNDING = {"fp32": (None, None), "weights": ("channel", None), "activations": (None, "token"),
            "both": ("channel", "token"), "both-act-g64": ("channel", f"group{GROUP}"), "both-w-g64": (f"group{GROUP}", "token")}


def shaped(data: dict, args: argparse.Namespace | None = None) -> dict:
    """The rows in the results shape of ../shared/BENCHMARKS.md: model, method, config (which
    rounding, with what scales), ppl and kl of the first text beside the per-text fields."""
    text = data["protocol"]["texts"][0]
    model = getattr(args, "model", None) or data.get("model", "smollm2-135m")
    for r in data["rows"]:
        weights, inputs = ROUNDING[r["variant"]]
        r.update(model=model, method="fp32" if r["variant"] == "fp32" else "fp8",
                 config={"weights": weights, "inputs": inputs}, ppl=r[f"{text}_ppl"], kl=r.get(f"{text}_kl", 0.0))
    return data


def render(data: dict) -> str:
    texts = data["protocol"]["texts"]
    base = data["rows"][0]
    lines = ["# FP8: where the perplexity increase comes from", "",
             f"Measured {data['date']} on {data['machine']} ({data['device']}) by `benchmarks/fp8_split.py`: the "
             f"fp32 reference model with E4M3 rounding applied in process, {data['protocol']['eval_windows']} × 512 "
             f"held-out tokens of {', '.join(texts)}. `share` = the row's increase as a fraction of `both`'s "
             "(the fp8 artifact's rounding).", ""]
    both = data["rows"][[r["variant"] for r in data["rows"]].index("both")]
    header = ["variant", "rounding"]
    for text in texts:
        header += [f"{text} ppl", "increase", "share", "KL"]
    rows = []
    for r in data["rows"]:
        cells = [r["variant"], r["what"]]
        for text in texts:
            ppl, b = r.get(f"{text}_ppl"), base[f"{text}_ppl"]
            increase = None if ppl is None or r is base else ppl / b - 1
            share = None if increase is None else increase / (both[f"{text}_ppl"] / b - 1)
            cells += [fmt(ppl, "{:.3f}"), fmt(increase, "{:+.2%}"), fmt(share, "{:.0%}"),
                      fmt(r.get(f"{text}_kl"), "{:.4f}")]
        rows.append(cells)
    lines += table(header, rows)
    lines += ["", "E4M3 keeps 3 mantissa bits, so a value's relative rounding error does not depend on its "
              "scale: finer scales change little, unlike integer formats."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--texts", default="wiki,austen")
    args = report_cli(parser, NAME, render, refresh=shaped)
    if args is None:
        return
    rows = measure(args)
    protocol = {"eval_windows": args.windows, "window": 512, "texts": args.texts.split(",")}
    rows = shaped({"protocol": protocol, "rows": rows}, args)["rows"]
    path = write_results(NAME, rows, protocol, {"device": args.device})
    print(f"wrote {path}")
    print(f"wrote {write_report(NAME, render(json.loads(path.read_text())))}")


if __name__ == "__main__":
    main()
