"""Layer-level output error of the weight quantizers on real linears of the reference model, in
domain and out of domain: cheap evidence where whole-model runs do not fit the machine.

The float model runs once over calibration windows (wiki:calib) and over held-out windows of
wiki and of Austen; forward pre-hooks accumulate each chosen linear's input second moment
H = XᵀX / n for each text. Every variant quantizes the linear from the calibration H only; its
error E = W − Ŵ (Ŵ includes a low-rank correction where the variant has one) is then measured on
each text as the relative output error tr(E H Eᵀ) / tr(W H Wᵀ). Bits per weight are those the
artifact would store (the format's encoded tensors, low-rank factors included).

    python benchmarks/quantize_layers.py --samples 16 --windows 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results  # noqa: E402

MODEL = "smollm2-135m"
LAYERS = (3, 15, 27)
LINEARS = ("self_attn.q_proj", "mlp.down_proj")
W4 = {"bits": 4, "group_size": 64, "sym": False}
W3 = {"bits": 3, "group_size": 64, "sym": False}
# name: (quantizer, config, low-rank rank applied after it)
VARIANTS = {
    "rtn-w4": ("rtn", W4, 0),
    "hqq-w4": ("hqq", W4, 0),
    "gptq-w4": ("gptq", {**W4, "act_order": True}, 0),
    "gptq-w4-damp0.1": ("gptq", {**W4, "act_order": True, "damp": 0.1}, 0),
    "gptq-w4-damp0.3": ("gptq", {**W4, "act_order": True, "damp": 0.3}, 0),
    "rtn-w3": ("rtn", W3, 0),
    "gptq-w3": ("gptq", {**W3, "act_order": True}, 0),
    "gptq-w3-damp0.1": ("gptq", {**W3, "act_order": True, "damp": 0.1}, 0),
    "gptq-w3-r8": ("gptq", {**W3, "act_order": True}, 8),
    "gptq-w3-r8-1pass": ("gptq", {**W3, "act_order": True, "lowrank_passes": 0}, 8),
    "gptq-w3-r32": ("gptq", {**W3, "act_order": True}, 32),
    "gptq-w3-g32": ("gptq", {**W3, "group_size": 32, "act_order": True}, 0),
}


def second_moments(model, windows: dict, names: list[str]) -> dict:
    """{text: {linear: H}} of the float model's inputs, float64 sums over every token."""
    import torch

    sums: dict = {}
    current = {}

    def hook(name):
        def accumulate(_, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            slot = sums.setdefault(current["text"], {})
            h, n = slot.get(name, (0, 0))
            slot[name] = (h + x.T @ x, n + x.shape[0])
        return accumulate

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for text, ids in windows.items():
            current["text"] = text
            for start in range(0, ids.shape[0], 4):
                model(ids[start:start + 4])
    for h in handles:
        h.remove()
    return {text: {n: (h / count).float() for n, (h, count) in slot.items()} for text, slot in sums.items()}


def quantize(w, h, method: str, config: dict, rank: int):
    """(effective weight, record) of one variant."""
    import torch

    from compressor.methods.quant.gptq import GPTQ, GPTQConfig, gptq_quantize
    from compressor.methods.quant.hqq import HQQConfig, hqq_qparams
    from compressor.methods.quant.quantizer import compute_qparams, dequantize_record, make_record
    from compressor.methods.quant.rtn import WeightQuantConfig

    if method == "gptq":
        gptq = GPTQ(GPTQConfig(**config, lowrank=rank))
        record, _ = gptq_quantize(w, h, gptq.config)
        if rank:  # what GPTQ.on_group does with --lowrank (its passes on the residual included)
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            record = gptq._compensated(w, {"l": record}, h, ["l"], {"l": linear}, None)["l"]
            return linear.weight.data, record
    else:
        cfg = (HQQConfig if method == "hqq" else WeightQuantConfig)(**config)
        scheme = cfg.scheme()
        qparams = hqq_qparams(w, scheme, cfg) if method == "hqq" else compute_qparams(w, scheme)
        record = make_record(w, *qparams, scheme)
    weight = dequantize_record(record, torch.float32)
    return weight, record


def stored_bytes(name: str, record: dict, config: dict) -> int:
    from compressor.formats import quantized
    from compressor.methods.quant.rtn import WeightQuantConfig

    scheme = WeightQuantConfig(**{k: config[k] for k in ("bits", "group_size", "sym")}).scheme()
    encoded = quantized.writer_for({"kind": "weight-int", "scheme": scheme}).encode(name, record)
    return sum(t.numel() * t.element_size() for k, t in encoded.items() if not k.endswith("weight_shape"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens per text")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    import torch

    from compressor import api
    from compressor.calib.data import calibration_set, evaluation_set

    started = time.perf_counter()
    base = api.load(MODEL)
    tok = base.tokenizer
    windows = {"calib": calibration_set("wiki", tok, args.samples, 512).input_ids,
               "wiki": evaluation_set("wiki", tok, args.windows, 512).input_ids,
               "austen": evaluation_set("austen", tok, args.windows, 512).input_ids}
    names = [f"model.layers.{layer}.{linear}" for layer in LAYERS for linear in LINEARS]
    moments = second_moments(base.model.eval(), windows, names)
    print(f"second moments in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for variant in args.variants.split(","):
        method, config, rank = VARIANTS[variant]
        errors = {"calib": [], "wiki": [], "austen": []}
        total_bytes = total_weights = 0
        for name in names:
            w = base.model.get_submodule(name).weight.data.float()
            weight, record = quantize(w, moments["calib"][name], method, config, rank)
            e = w - weight
            for text in errors:
                h = moments[text][name].double()
                errors[text].append(float(torch.einsum("ij,jk,ik->", e.double(), h, e.double())
                                          / torch.einsum("ij,jk,ik->", w.double(), h, w.double())))
            total_bytes += stored_bytes(name, record, config)
            total_weights += w.numel()
        row = {"model": MODEL, "method": method, "config": {**config, **({"lowrank": rank} if rank else {})},
               "row": variant, "bits_per_weight": round(8 * total_bytes / total_weights, 4),
               **{f"rel_err_{text}": sum(v) / len(v) for text, v in errors.items()}}
        rows.append(row)
        print(row, flush=True)
    protocol = {"calib_samples": args.samples, "calib_len": 512, "eval_windows": args.windows, "window": 512,
                "linears": names}
    path = write_results("quantize_layers", rows, protocol,
                         {"note": "layer-level proxy on the shared, heavily loaded 2-core CPU; whole-model perplexity "
                                  "is in the other sets"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
