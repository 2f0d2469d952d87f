"""The engine at scale, checked on the CPU: lazy loading keeps host memory near one block, the
block-by-block artifact write gives the same bytes as writing everything at once, activations
that do not fit are offloaded or refused with their size, and the GPTQ sweep kernel (run by
Triton's interpreter) computes what the reference loop computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.errors import CompressorError
from compressor.formats.artifact import save_tensors
from compressor.pipeline.resources import activation_bytes, device_batch, plan_activations
from compressor.safetensors_file import stored_tensors, write_tensors

ROOT = Path(__file__).resolve().parents[1]


def _write_llama(directory: Path, layers: int = 8, hidden: int = 512, intermediate: int = 2048) -> int:
    """A float32 Llama checkpoint of random weights; returns its weight bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


RSS_SCRIPT = r"""
import json, sys
import torch
from compressor import api
from compressor.models.loading import load_model
from compressor.util import release_memory

def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.models.llama import modeling_llama  # imported before the baseline: code, not weights
with torch.device("meta"):
    AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                                 num_attention_heads=4, vocab_size=64))
from compressor.formats import ct_config, quantized  # the writer's library: code, not weights
ct_config.library()
base = rss("VmRSS:")
mode = sys.argv[1]
if mode == "quantize":
    api.quantize(sys.argv[2], "rtn", sys.argv[3], {"bits": 4, "group_size": 64}, overwrite=True)
else:
    loaded = load_model(sys.argv[2], lazy=mode == "lazy")
    if loaded.lazy is not None:
        for i, block in enumerate(loaded.adapter.blocks(loaded.model)):
            loaded.lazy.materialize(block, loaded.adapter.block_prefix(loaded.model, i), torch.device("cpu"))
            block.to("meta")
            release_memory()  # as the engine does after every block
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


def _peak_growth(*args: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, env=env,
                         check=True).stdout
    numbers = json.loads(out.strip().splitlines()[-1])
    return numbers["peak"] - numbers["base"]


def test_lazy_loading_holds_about_one_block_in_host_memory(tmp_path):
    model = tmp_path / "model"
    size = _write_llama(model)  # 8 blocks of 16.8 MB
    eager = _peak_growth("eager", str(model))
    lazy = _peak_growth("lazy", str(model))
    assert eager > 0.7 * size  # the measurement sees a whole model
    assert lazy < 0.35 * size, (lazy, size)


def test_quantize_keeps_host_memory_bounded_from_load_to_artifact(tmp_path):
    model = tmp_path / "model"
    size = _write_llama(model, layers=24, hidden=384, intermediate=1536)  # 24 blocks of 9.4 MB
    growth = _peak_growth("quantize", str(model), str(tmp_path / "out"))
    # a few blocks at once (the one in hand, the next one read ahead, the one being checkpointed,
    # the method's working copies), not the model
    assert growth < 0.6 * size, (growth, size)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_block_by_block_write_equals_the_whole_write(tmp_path):
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(64, 32) for i in range(12)}
    tensors.update({"model.embed.weight": torch.randn(100, 32).bfloat16(), "lm_head.codes": torch.randint(0, 9, (7, 5))})
    # the write under test: each block's tensors spilled to a file, copied from there
    spilled = {}
    for i in range(12):
        part = tmp_path / f"part-{i}.safetensors"
        write_tensors(part, {f"model.layers.{i}.w": tensors[f"model.layers.{i}.w"]})
        spilled.update(stored_tensors(part))
    spilled.update({k: v for k, v in tensors.items() if not k.startswith("model.layers.")})
    for limit in (1 << 40, 20_000):  # one file, and shards with an index
        whole, blocks = tmp_path / f"whole-{limit}", tmp_path / f"blocks-{limit}"
        whole.mkdir(), blocks.mkdir()
        save_tensors(whole, dict(sorted(tensors.items())), max_shard_bytes=limit)
        save_tensors(blocks, dict(sorted(spilled.items())), max_shard_bytes=limit)
        names = sorted(p.name for p in whole.iterdir())
        assert names == sorted(p.name for p in blocks.iterdir())
        assert (names == ["model.safetensors"]) if limit > 1 << 30 else ("model.safetensors.index.json" in names
                                                                         and len(names) > 3)
        for name in names:
            assert (whole / name).read_bytes() == (blocks / name).read_bytes(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_copies_are_pinned_and_equal_once_ready():
    from compressor.pipeline.resources import HostCopier

    device = torch.device("cuda", 0)
    source = torch.randn(512, 256, device=device)
    tree = ({"a": source, "b": source.T.to(torch.int8)}, [{"c": source[:, 3]}, None], "name")
    copied, ready = HostCopier(device)(tree)
    ready.synchronize()
    (params, (carry, nothing), name) = copied
    assert nothing is None and name == "name"
    for host, expected in ((params["a"], source), (params["b"], source.T.to(torch.int8)), (carry["c"], source[:, 3])):
        assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, expected.cpu())
    on_cpu, no_event = HostCopier(torch.device("cpu"))(tree)
    assert on_cpu is tree and no_event is None


def test_activations_stay_on_the_gpu_when_they_fit_and_are_offloaded_otherwise():
    gpu = torch.device("cuda", 0)
    need = activation_bytes(512 * 2048, 4096, 14336, 2, float_path=False)
    assert need == 512 * 2048 * (3 * 4096 + 14336) * 2
    home, phrase = plan_activations(need, gpu, device_free=140 * 10**9, host_free=100 * 10**9)
    assert home == gpu and "on cuda:0" in phrase
    home, phrase = plan_activations(need, gpu, device_free=40 * 10**9, host_free=200 * 10**9)
    assert home.type == "cpu" and phrase.startswith("activations offloaded to host memory (55.8 GB")
    with pytest.raises(CompressorError, match=r"need 55\.8 GB.*lower --samples or --seq-len"):
        plan_activations(need, gpu, device_free=40 * 10**9, host_free=50 * 10**9)
    with pytest.raises(CompressorError, match="the host has"):
        plan_activations(need, torch.device("cpu"), host_free=10 * 10**9)


def test_forced_offload_and_gpu_batches(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_ACTIVATIONS", "host")
    home, _ = plan_activations(10, torch.device("cuda", 0), device_free=10**12, host_free=10**12)
    assert home.type == "cpu"
    assert device_batch(8, 512, torch.device("cpu")) == 8
    assert device_batch(8, 512, torch.device("cuda")) == 128
    assert device_batch(256, 2048, torch.device("cuda")) == 256


KERNEL_CHECK = r"""
import torch
from compressor.methods.quant.gptq_kernel import sweep_block
torch.manual_seed(0)
worst = 0.0
for n, rows, zero in [(128, 40, False), (70, 33, True)]:
    wb = torch.randn(n, rows)
    a = torch.randn(n, n)
    hb = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a @ a.T + n * torch.eye(n))), upper=True)
    s = torch.rand(n, rows) * 0.3 + 0.05
    z = torch.randint(-3, 4, (n, rows)).float() if zero else None
    q, e = sweep_block(wb, hb, s, z, -8, 7, 128)
    w, qr, er = wb.clone(), torch.empty_like(wb), torch.empty_like(wb)
    for i in range(n):  # the reference: gptq._sweep_columns with static scales
        x = w[i]
        c = torch.div(x, s[i]).round_()
        if z is None:
            c.clamp_(-8, 7); deq = c * s[i]
        else:
            c.add_(z[i]).clamp_(-8, 7); deq = (c - z[i]) * s[i]
        qr[i], er[i] = c, (x - deq) / hb[i, i]
        w[i:].addr_(hb[i, i:], er[i], alpha=-1)
    assert torch.equal(q, qr), (q != qr).sum()
    worst = max(worst, float((e - er).norm() / er.norm()))
assert worst < 1e-5, worst
print("ok")
"""


def test_fused_gptq_sweep_matches_the_column_loop():
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_hashes_written_with_the_bytes_match_a_second_read(tmp_path, monkeypatch):
    """The manifest takes each weight file's hashes from the bytes as they were written (no
    second read); they are exactly what reading the file back gives, serially or threaded, and a
    file changed after writing still fails verification."""
    from compressor.formats import manifest
    from compressor.safetensors_file import header_bytes

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(64, 32 + i).to(torch.bfloat16) for i in range(6)}
    tensors["codes"] = torch.randint(0, 255, (17, 9), dtype=torch.uint8)
    tensors["empty"] = torch.zeros(0)
    written = write_tensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    spilled = write_tensors(tmp_path / "b.safetensors", stored_tensors(tmp_path / "a.safetensors"))
    for name, hashes in (("a.safetensors", written), ("b.safetensors", spilled)):
        assert hashes.tensors == manifest.tensor_hashes(tmp_path / name)
        assert hashes.header == manifest.header_sha256(tmp_path / name)
    import hashlib

    assert written.header == hashlib.sha256(header_bytes(tmp_path / "a.safetensors")).hexdigest()
    monkeypatch.setattr(manifest, "PARALLEL_HASH_BYTES", 0)
    monkeypatch.setattr(manifest, "HASH_THREADS", 3)
    assert manifest.tensor_hashes(tmp_path / "a.safetensors") == written.tensors
    fields = dict(kind="quantized", source={}, method=None, calibration=None, metrics={})
    assert manifest.build_manifest(tmp_path, written={"a.safetensors": written, "b.safetensors": spilled},
                                   **fields) == manifest.build_manifest(tmp_path, **fields)
    manifest.write_manifest(tmp_path, manifest.build_manifest(tmp_path, written={"a.safetensors": written}, **fields))
    assert manifest.verify(tmp_path) == []
    raw = bytearray((tmp_path / "a.safetensors").read_bytes())
    raw[-40] ^= 1
    (tmp_path / "a.safetensors").write_bytes(bytes(raw))
    assert manifest.verify(tmp_path) == ["tensor t5 in a.safetensors is corrupted"]


def test_quantize_records_its_phases(tmp_path):
    """build.json and the result split the wall time: startup (imports), load, calibration,
    engine, encode, write (shards, manifest) and verify; and the checkpoint thread's parts."""
    from compressor import api
    from conftest import make_llama, make_text

    model = make_llama(tmp_path / "m", layers=2)
    text = tmp_path / "c.txt"
    text.write_text(make_text(4000))
    result = api.quantize(str(model), "gptq", tmp_path / "out", {"bits": 4, "group_size": 32}, calib=str(text),
                          samples=4, seq_len=32)
    build = json.loads((tmp_path / "out" / "build.json").read_text())
    # The checkpoint thread's share, per block: the block file and the early export (a lazy run).
    assert len(build["checkpoint_s"]) == 2 and all({"block_file", "export"} <= set(b) for b in build["checkpoint_s"])
    for phases in (result["phases_s"], build["phases_s"]):
        assert {"startup", "setup", "load", "calibration", "prepare", "engine", "embed", "encode", "write",
                "verify"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
    assert api.verify(tmp_path / "out")["ok"]


def test_blocks_encoded_during_the_run_give_the_same_artifact(tmp_path, monkeypatch):
    """A lazy run encodes and spills each block in the checkpoint thread while the next computes;
    the artifact is byte for byte the one the export after the last block writes."""
    from compressor import api, export
    from conftest import make_llama, make_text

    model = make_llama(tmp_path / "m", layers=3)
    text = tmp_path / "c.txt"
    text.write_text(make_text(4000))
    calls = []
    original = export.EarlyExport.block
    monkeypatch.setattr(export.EarlyExport, "block", lambda self, *a: (calls.append(a[0]), original(self, *a)))
    settings = dict(calib=str(text), samples=4, seq_len=32)
    api.quantize(str(model), "gptq", tmp_path / "early", {"bits": 4, "group_size": 32}, **settings)
    assert calls == [0, 1, 2]
    monkeypatch.setattr(export.EarlyExport, "applies", staticmethod(lambda *a: False))
    api.quantize(str(model), "gptq", tmp_path / "late", {"bits": 4, "group_size": 32}, **settings)
    assert calls == [0, 1, 2]
    names = sorted(p.name for p in (tmp_path / "late").iterdir() if p.name != "build.json")
    assert names == sorted(p.name for p in (tmp_path / "early").iterdir() if p.name != "build.json")
    for name in names:
        assert (tmp_path / "early" / name).read_bytes() == (tmp_path / "late" / name).read_bytes(), name


def test_stored_weights_are_checked_in_chunks(tmp_path):
    """The NaN/Inf check before a lazy run reads each weight in chunks: a NaN in the last chunk of
    a tensor is found, integer tensors pass."""
    from compressor.models.lazy import LazyWeights

    t = torch.ones(1000, 37, dtype=torch.bfloat16)
    bad = t.clone()
    bad[-1, -1] = float("nan")
    write_tensors(tmp_path / "w.safetensors", {"a": t, "b": bad, "c": torch.zeros(5, dtype=torch.int32)})
    lazy = LazyWeights([tmp_path / "w.safetensors"], torch.bfloat16)
    assert lazy.finite("a", chunk=1000) and lazy.finite("c", chunk=8)
    assert not lazy.finite("b", chunk=1000) and not lazy.finite("b")


def test_merge_refuses_a_file_no_scale_call_wrote(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    results = repo / "benchmarks" / "results" / "scale.json"
    before = results.read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [1]}')
    for path in (bad, tmp_path / "missing.json"):
        done = subprocess.run([sys.executable, "benchmarks/scale.py", "--report-only", "--merge", str(path)],
                              cwd=repo, capture_output=True, text=True)
        assert done.returncode == 2 and "is not a scale.json" in done.stderr and len(done.stderr.splitlines()) == 1
    assert results.read_bytes() == before
