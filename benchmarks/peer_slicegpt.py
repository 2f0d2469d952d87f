"""Run SliceGPT's reference implementation (microsoft/TransformerCompression) on our local model
and our calibration/evaluation tokens, with our perplexity protocol. It needs transformers 4.41
(the version the reference pins), so benchmarks/slicing.py runs this file in a separate virtual
environment:

    SLICEGPT_PYTHON=/path/to/venv/bin/python SLICEGPT_SRC=/path/to/TransformerCompression/src \\
        python benchmarks/slicing.py ...

Arguments: a JSON file with model_dir (a transformers-4.x config of the model), calib (.pt
[samples, len] token ids), eval (.pt), sparsity, out (result JSON). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import types
from pathlib import Path

import torch


def import_reference(src: Path):
    # Import the package's modules without its __init__ (which pulls in datasets/lm-eval helpers).
    pkg = types.ModuleType("slicegpt")
    pkg.__path__ = [str(src / "slicegpt")]
    sys.modules["slicegpt"] = pkg
    from slicegpt import layernorm_fusion, rotate  # noqa: E402
    from slicegpt.adapters.llama_adapter import LlamaModelAdapter  # noqa: E402
    from slicegpt.config import config  # noqa: E402
    from slicegpt.slicing_scheduler import ConstSlicingScheduler  # noqa: E402

    config.device = torch.device("cpu")
    return layernorm_fusion, rotate, LlamaModelAdapter, ConstSlicingScheduler


@torch.no_grad()
def evaluate(model, base, ids: torch.Tensor, batch: int = 4) -> dict:
    nll = kl = 0.0
    tokens = 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        lp = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
        blp = base(input_ids=x).logits[:, :-1].float().log_softmax(-1)
        t = x[:, 1:].unsqueeze(-1)
        nll += float(-lp.gather(-1, t).sum())
        kl += float((blp.exp() * (blp - lp)).sum())
        tokens += t.numel()
    return {"ppl": math.exp(nll / tokens), "kl": kl / tokens, "tokens": tokens}


def main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(args.get("threads", 2)))
    layernorm_fusion, rotate, LlamaModelAdapter, ConstSlicingScheduler = import_reference(Path(args["src"]))
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args["model_dir"], torch_dtype=torch.float32).eval()
    adapter = LlamaModelAdapter(model)
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
    hidden = model.config.hidden_size
    width = int((1 - args["sparsity"]) * hidden)
    width -= width % 8
    calib = torch.load(args["calib"])
    loader = [{"input_ids": calib[i:i + 8], "attention_mask": torch.ones_like(calib[i:i + 8])}
              for i in range(0, calib.shape[0], 8)]
    rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(width))
    wall = time.perf_counter() - started
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    base = LlamaForCausalLM.from_pretrained(args["model_dir"], torch_dtype=torch.float32).eval()
    quality = evaluate(model, base, torch.load(args["eval"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args["out"]).write_text(json.dumps({"width": width, "params": params, "wall_s": wall,
                                             "peak_rss_mb": peak, **quality}, indent=2))


if __name__ == "__main__":
    main()
