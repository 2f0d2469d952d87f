"""CPU wall time of GPTQ W4 g64 on the reference model: ours against llm-compressor, same sitting.

Each run is a fresh process from load to finished artifact: ours is `compress quantize
smollm2-135m --method gptq --bits 4 --group-size 64 --asym --act-order`; llm-compressor's is its
`oneshot` with a GPTQModifier of the same scheme (int4 asymmetric, group 64, act-order "weight",
dampening 0.01) on the same calibration windows (our fixed-seed wiki windows, passed as token ids),
loading the same converted checkpoint and saving a compressed artifact. Runs alternate A B A B
on this shared machine; the load average is recorded beside each run. Peers that are not
importable are skipped with the reason. llm-compressor is installed with `pip install --no-deps
--target DIR llmcompressor` so it cannot change torch; pass DIR with --peer-path.

    python benchmarks/peer_gptq_cpu.py --peer-path /tmp/peers --samples 32 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, median, write_results  # noqa: E402

MODEL = "smollm2-135m"
CONFIG = {"bits": 4, "group_size": 64, "sym": False, "act_order": True}

PEER = r"""
import json, sys, time, torch
started = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
model_dir, ids_file, out = sys.argv[1:4]
ids = torch.load(ids_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64,
           "actorder": "weight"}
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                      dampening_frac=0.01)
oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
print(json.dumps({"wall_s": time.perf_counter() - started}))
"""


def _load() -> float:
    return os.getloadavg()[0]


def _timed(cmd: list[str], env: dict) -> dict:
    """Wall, CPU seconds and peak RSS of one fresh process, with the load average around it."""
    load_before = _load()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {proc.stderr.strip()[-1500:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024), "load_before": round(load_before, 1),
            "load_after": round(_load(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs (ours, peer), alternating")
    parser.add_argument("--peer-path", default=None, help="directory llm-compressor was installed into (--target)")
    parser.add_argument("--work", default="out/peer-gptq-cpu")
    parser.add_argument("--results", default=str(RESULTS / "quantize_peer_cpu.json"))
    args = parser.parse_args()
    from compressor import api
    from compressor.calib.data import calibration_set
    from compressor.models import assets

    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = assets.fetch_model(MODEL)
    tokens = calibration_set("wiki", api.load(MODEL).tokenizer, args.samples, 512)
    torch.save(tokens.input_ids, work / "calib_ids.pt")
    peer_env = {"PYTHONPATH": os.pathsep.join(p for p in (args.peer_path, os.environ.get("PYTHONPATH")) if p)}
    probe = subprocess.run([sys.executable, "-c", "import llmcompressor"], capture_output=True, text=True,
                           env={**os.environ, **peer_env})
    peer_reason = None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["not importable"])[-1]
    ours_cmd = [sys.executable, "-m", "compressor.cli", "--json", "quantize", MODEL, "--method", "gptq", "--bits", "4",
                "--group-size", "64", "--asym", "--act-order", "--samples", str(args.samples), "-o",
                str(work / "ours"), "--overwrite", "--restart"]
    peer_cmd = [sys.executable, "-c", PEER, str(model_dir), str(work / "calib_ids.pt"), str(work / "peer")]
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for pair in range(args.pairs):
        for who, cmd, env in (("peer", peer_cmd, peer_env), ("ours", ours_cmd, {})):  # the peer first: fail fast
            if who == "peer" and peer_reason:
                print(f"skipping llm-compressor: {peer_reason}", flush=True)
                continue
            runs[who].append(_timed(cmd, env))
            print(json.dumps({who: runs[who][-1], "pair": pair}), flush=True)
    rows = []
    for who, method in (("ours", "gptq"), ("peer", "peer:llm-compressor:gptq")):
        if runs[who]:
            rows.append({"model": MODEL, "method": method, "config": CONFIG, "row": f"cpu-timing-{who}",
                         "wall_s": median([r["wall_s"] for r in runs[who]]),
                         "cpu_s": median([r["cpu_s"] for r in runs[who]]),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[who]), "runs": runs[who]})
    if len(rows) == 2:
        rows[0]["wall_vs_peer"] = rows[0]["wall_s"] / rows[1]["wall_s"]
    protocol = {"calib_samples": args.samples, "calib_len": 512, "order": "A B alternating, fresh processes"}
    extra = {"note": "shared 2-core CPU under load from other jobs; load average (1 min) recorded per run",
             **({"skipped": {"llm-compressor": peer_reason}} if peer_reason else {})}
    print(f"wrote {write_results('quantize_peer_cpu', rows, protocol, extra, path=Path(args.results))}")


if __name__ == "__main__":
    main()
