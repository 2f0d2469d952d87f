"""The fixed per-run costs of `compress quantize` that issue 14's scale work cut, measured on the
CPU with the code paths before and after side by side (both are still in the code): tokenizing the
calibration text (once, then from the token cache), the artifact's manifest (weights re-read for
hashing, as before, or hashed as written) and its verification, blocks encoded after the engine
or in its checkpoint thread, and the interpreter's exit with and without `gc.freeze`. Written into
results/scale.json under `cpu_fixed` (rendered in reports/scale.md).

    python benchmarks/fixed_costs.py [--mb 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def tokenizing(work: Path) -> dict:
    """calibration_set('wiki') into an empty token cache, then again (read from the cache)."""
    from transformers import AutoTokenizer

    from compressor.calib.data import calibration_set
    from compressor.models import assets

    tok = AutoTokenizer.from_pretrained(assets.fetch_model("smollm2-135m"))
    wiki = assets.fetch_text("wiki")
    os.environ["COMPRESSOR_CACHE"] = str(work / "cache")
    shutil.copytree(wiki, assets.text_dir("wiki"))
    cold, a = timed(lambda: calibration_set("wiki", tok, 128, 512, 0))
    warm, b = timed(lambda: calibration_set("wiki", tok, 128, 512, 0))
    assert a.sha256 == b.sha256
    return {"tokenize_cold_s": round(cold, 2), "tokenize_cached_s": round(warm, 2)}


def manifest(work: Path, mb: int) -> dict:
    """An artifact's weights (`mb` MB of bf16 in 4 shards) written, its manifest built and verified:
    hashes from a second read (before) or from the bytes as written (now)."""
    import torch

    from compressor.formats.artifact import save_tensors
    from compressor.formats.manifest import build_manifest, verify, write_manifest

    torch.manual_seed(0)
    count = mb * 2**20 // 2 // (4096 * 4096)
    tensors = {f"w{i}": torch.randn(4096, 4096).to(torch.bfloat16) for i in range(max(count, 1))}
    out = {}
    for how in ("reread", "as_written"):
        d = work / how
        d.mkdir(parents=True)
        write_s, written = timed(lambda: save_tensors(d, tensors, max_shard_bytes=mb * 2**20 // 4))
        fields = dict(kind="quantized", source={}, method=None, calibration=None, metrics={})
        hash_s, m = timed(lambda: build_manifest(d, written=written if how == "as_written" else None, **fields))
        write_manifest(d, m)
        verify_s, problems = timed(lambda: verify(d))
        assert problems == []
        out[how] = {"write_s": round(write_s, 2), "manifest_s": round(hash_s, 2), "verify_s": round(verify_s, 2)}
        shutil.rmtree(d)
    out["weights_mb"] = round(sum(t.numel() * 2 for t in tensors.values()) / 2**20)
    return out


def exit_cost() -> dict:
    """Seconds a process that imported what `compress quantize` imports takes to end, with and
    without gc.freeze() before it exits."""
    code = ("import sys, time, gc; import compressor.cli, compressor.api, transformers, compressed_tensors.quantization; "
            "from transformers import LlamaForCausalLM, AutoTokenizer; "
            "gc.freeze() if sys.argv[1] == 'freeze' else None; "
            "open(sys.argv[2], 'w').write(repr(time.time()))")
    out = {}
    for how in ("plain", "freeze"):
        stamp = Path(tempfile.mktemp())
        subprocess.run([sys.executable, "-c", code, how, str(stamp)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out[f"exit_{how}_s"] = round(time.time() - float(stamp.read_text()), 2)
        stamp.unlink()
    return out


def early_export(work: Path) -> dict:
    """GPTQ of a small bf16 Llama (lazy, on the CPU), blocks encoded after the engine (before) or
    in the checkpoint thread while the next block computes (now): the encode phase after the engine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor import api, export
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model_dir = work / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    text = work / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} number{i % 13}." for i in range(40000)))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text.read_text()], trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>"],
                                                                     show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)
    out = {}
    applies = export.EarlyExport.applies
    for how in ("after_engine", "during_engine"):
        export.EarlyExport.applies = staticmethod(applies if how == "during_engine" else (lambda *a: False))
        result = api.quantize(str(model_dir), "gptq", work / how, {"bits": 4, "group_size": 128}, calib=str(text),
                              samples=8, seq_len=256, dtype=torch.bfloat16)
        out[how] = {"wall_s": round(result["wall_s"], 2), "engine_s": round(result["phases_s"]["engine"], 2),
                    "encode_s": round(result["phases_s"]["encode"], 3)}
    export.EarlyExport.applies = applies
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=512, help="weights of the manifest measurement, MB")
    args = parser.parse_args()
    results = RESULTS / "scale.json"
    data = json.loads(results.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cpu = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
               "threads": os.environ.get("OMP_NUM_THREADS"), **tokenizing(work / "t"), **exit_cost(),
               "manifest": manifest(work / "m", args.mb), "early_export": early_export(work / "e")}
    data["cpu_fixed"] = cpu
    results.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(cpu, indent=1))


if __name__ == "__main__":
    main()
