"""Lossless packing: codec round trips, C vs torch codecs, container, CLI, bad input, fuzzing,
the packed runner, and (where a GPU is present) the Triton decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.errors import CompressorError
from compressor.formats import packed as packed_format
from compressor.kernels import entropy_decode
from compressor.codecs import dfloat, lanes, native, tans
from tests.helpers import cli

SMALL = dfloat.PackConfig(lanes=8, steps=32)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(300, 257, generator=g) * 0.02).to(torch.bfloat16),   # nibble split
        (torch.randn(4001, generator=g) * 3).half(),                          # fp16
        torch.randn(123, 77, generator=g),                                    # fp32 by splitting
        torch.randint(0, 16, (5000,), generator=g, dtype=torch.int32),        # int codes
        torch.randint(-128, 127, (3333,), generator=g, dtype=torch.int8),
        torch.ones(2048, dtype=torch.bfloat16),                               # one symbol
        torch.tensor(1.5, dtype=torch.bfloat16),                              # scalar
        torch.zeros(0, 5),                                                    # empty
        torch.randint(0, 2**15, (999,), generator=g, dtype=torch.int16).view(torch.bfloat16),  # any bit pattern
    ]


@pytest.fixture
def torch_codec(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_NATIVE", "0")
    yield
    monkeypatch.delenv("COMPRESSOR_NATIVE")


def test_tans_tables_are_consistent():
    counts = np.zeros(256)
    counts[[0, 3, 7, 200]] = [1000, 10, 1, 5000]
    norm = tans.normalize(counts, 10)
    assert norm.sum() == 1024 and (norm[[0, 3, 7, 200]] >= 1).all() and norm[1] == 0
    table = tans.decode_table(norm, 10)
    assert sorted(np.bincount(table & 0xFFFF, minlength=256)[[0, 3, 7, 200]]) == sorted(norm[[0, 3, 7, 200]])


def test_round_trip_every_dtype_native():
    ts = _tensors()
    for t, p in zip(ts, dfloat.pack_tensors(ts, SMALL)):
        out = dfloat.unpack_tensor(p)
        assert out.dtype == t.dtype and out.shape == t.shape and _bits(out) == _bits(t)
    kinds = [p.meta["kind"] for p in dfloat.pack_tensors(ts, SMALL)]
    assert kinds[0] == "coded" and kinds[-1] == "raw" and kinds[-2] == "raw"


def test_torch_codec_writes_the_same_bytes_and_decodes(torch_codec):
    ts = _tensors(1)[:4]
    slow = dfloat.pack_tensors(ts, SMALL)
    for t, p in zip(ts, slow):
        assert _bits(dfloat.unpack_tensor(p)) == _bits(t)
    import os

    os.environ["COMPRESSOR_NATIVE"] = "1"
    if native.library() is None:
        pytest.skip(f"no C codec here: {native.status()}")
    fast = dfloat.pack_tensors(ts, SMALL)
    for a, b in zip(slow, fast):
        assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
        assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_bf16_gaussian_ratio_and_split_choice():
    t = (torch.randn(2_000_000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    (p,) = dfloat.pack_tensors([t], dfloat.PackConfig())
    assert p.meta["mode"] == lanes.MODE_NIBBLE  # exponent + 3 mantissa bits coded
    assert p.nbytes() / (t.numel() * 2) < 0.66
    assert _bits(dfloat.unpack_tensor(p)) == _bits(t)


def test_reference_decoder_agrees_with_native():
    ts = _tensors(2)[:2]
    layout = SMALL.layout()
    pairs = [(t, p) for t, p in zip(ts, dfloat.pack_tensors(ts, SMALL)) if p.meta["kind"] == "coded"]
    assert pairs
    for t, p in pairs:
        a = p.arrays
        stream = lanes.CodedStream(a["words"], a["lane_bits"], a["norm"], p.meta["count"])
        values = lanes.decode_reference([stream], layout, [a["values"]])[0].numpy().astype(np.uint16)
        merged = lanes.merge_planes(values, p.meta["mode"], a.get("raw"), a.get("signs"))
        assert merged.tobytes() == _bits(t)


def test_torch_plan_decoder_fills_a_shared_buffer():
    g = torch.Generator().manual_seed(4)
    ts = [(torch.randn(300, 257, generator=g) * 0.02).to(torch.bfloat16),
          (torch.randn(20000, generator=g) * 0.01).half()]
    packed = dfloat.pack_tensors(ts, SMALL)
    assert {p.meta.get("mode") for p in packed} == {lanes.MODE_BYTE, lanes.MODE_NIBBLE}
    specs, off = [], 0
    for t, p in zip(ts, packed):
        specs.append(packed_format.stream_spec(p, off))
        off += t.numel()
    assert all(s is not None for s in specs)
    out = torch.full((off,), -21846, dtype=torch.int16)
    entropy_decode.decode(entropy_decode.build_plan(specs, "cpu"), out, "torch")
    assert out.numpy().tobytes() == b"".join(_bits(t) for t in ts)


# ---------------------------------------------------------------- container and CLI

def test_cli_pack_unpack_byte_identical(tiny_llama, tmp_path):
    r = cli("--json", "pack", tiny_llama, "-o", tmp_path / "p", "--lanes", "8", "--steps", "32")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ratio"] < 0.97  # float32: exponent coded, 24 bits raw
    assert cli("verify", tmp_path / "p").exit_code == 0
    r = cli("unpack", tmp_path / "p", "-o", tmp_path / "u")
    assert r.exit_code == 0, r.output
    for f in tiny_llama.iterdir():
        if f.is_file():
            assert (tmp_path / "u" / f.name).read_bytes() == f.read_bytes(), f.name


def test_pack_cast_to_bf16(tiny_gemma3, tmp_path):
    from safetensors.torch import load_file

    r = cli("pack", tiny_gemma3, "-o", tmp_path / "p", "--dtype", "bfloat16", "--lanes", "8", "--steps", "32")
    assert r.exit_code == 0, r.output
    assert cli("unpack", tmp_path / "p", "-o", tmp_path / "u").exit_code == 0
    a, b = load_file(tmp_path / "u" / "model.safetensors"), load_file(tiny_gemma3 / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.bfloat16 and torch.equal(a[k].view(torch.int16), b[k].bfloat16().view(torch.int16))
    assert json.loads((tmp_path / "u" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_pack_quantized_artifact_codes(text_file, tmp_path):
    from tests.conftest import make_llama

    model = make_llama(tmp_path / "m", layers=1, hidden=256, intermediate=512)
    r = cli("quantize", model, "-o", tmp_path / "q", "--method", "rtn", "--bits", "4", "--group-size", "32")
    assert r.exit_code == 0, r.output
    assert cli("pack", tmp_path / "q", "-o", tmp_path / "p").exit_code == 0
    _, packed = packed_format.read_packed_file(tmp_path / "p" / "model.packed.safetensors")
    codes = [p for n, p in packed.items() if n.endswith("weight_packed")]
    coded = [p for p in codes if p.meta["kind"] == "coded"]
    assert len(coded) >= len(codes) // 2  # the int4 codes of the larger linears are not uniform
    assert sum(p.nbytes() for p in coded) < 0.97 * sum(p.meta["count"] for p in coded)
    assert cli("unpack", tmp_path / "p", "-o", tmp_path / "u").exit_code == 0
    for f in (tmp_path / "q").glob("*.safetensors"):
        assert (tmp_path / "u" / f.name).read_bytes() == f.read_bytes()


def test_pack_refuses_bad_inputs(tiny_llama, tmp_path):
    r = cli("pack", tmp_path / "nope", "-o", tmp_path / "p")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = cli("pack", tiny_llama, "-o", tmp_path / "p", "--table-log", "13")
    assert r.exit_code == 2 and "table_log" in r.output
    assert cli("pack", tiny_llama, "-o", tmp_path / "p", "--lanes", "8", "--steps", "32").exit_code == 0
    r = cli("pack", tmp_path / "p", "-o", tmp_path / "p2")
    assert r.exit_code == 2
    r = cli("unpack", tiny_llama, "-o", tmp_path / "u")
    assert r.exit_code == 2 and "not a packed artifact" in r.output


@pytest.fixture
def packed_tiny(tiny_llama, tmp_path) -> Path:
    out = tmp_path / "p"
    packed_format.pack(tiny_llama, out, SMALL, torch.bfloat16)
    return out


def _coded_piece(path: Path) -> tuple[str, int, int]:
    from compressor.safetensors_file import read_header

    entries, _ = read_header(path / "model.packed.safetensors")
    name = next(n for n in sorted(entries) if n.endswith("mlp.up_proj.weight"))
    return name, entries[name].start, entries[name].end


def test_truncated_packed_file_names_a_tensor(packed_tiny, tmp_path):
    f = packed_tiny / "model.packed.safetensors"
    name, start, end = _coded_piece(packed_tiny)
    with open(f, "r+b") as fh:
        fh.truncate((start + end) // 2)
    r = cli("unpack", packed_tiny, "-o", tmp_path / "u")
    assert r.exit_code == 2 and name in r.output and "truncated" in r.output
    assert not (tmp_path / "u").exists()


def test_bit_flip_names_the_tensor(packed_tiny, tmp_path):
    f = packed_tiny / "model.packed.safetensors"
    name, start, end = _coded_piece(packed_tiny)
    data = bytearray(f.read_bytes())
    data[(start + end) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    r = cli("unpack", packed_tiny, "-o", tmp_path / "u")
    assert r.exit_code == 2 and name in r.output and "corrupted" in r.output
    # Past the manifest, the decoder itself refuses it, naming the tensor.
    with pytest.raises(CompressorError, match=name.replace(".", r"\.")):
        packed_format.decode_file(f)


def test_packed_file_rebuilt_from_damaged_manifest_is_refused(packed_tiny, tmp_path):
    (packed_tiny / "manifest.json").write_text("{not json")
    r = cli("unpack", packed_tiny, "-o", tmp_path / "u")
    assert r.exit_code == 2 and "manifest" in r.output


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_decoder_never_crashes_or_hangs(data):
    layout = lanes.Layout(lanes=4, steps=8, table_log=10)
    count = data.draw(st.integers(0, 100))
    nlanes = lanes.lane_counts(count, layout).size
    lane_bits = np.array(data.draw(st.lists(st.integers(0, 200), min_size=nlanes, max_size=nlanes)), dtype=np.uint16)
    nwords = data.draw(st.integers(0, 40))
    words = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=nwords, max_size=nwords)),
                     dtype=np.uint32)
    weights = data.draw(st.lists(st.integers(0, 50), min_size=256, max_size=256))
    norm = tans.normalize(np.array(weights) + (np.arange(256) == 0), 10).astype(np.uint16)
    if data.draw(st.booleans()):
        norm = np.array(data.draw(st.lists(st.integers(0, 2000), min_size=256, max_size=256)), dtype=np.uint16)
    mode = data.draw(st.sampled_from([0, 1, 2]))
    raw = np.frombuffer(data.draw(st.binary(min_size=0, max_size=120)), dtype=np.uint8)
    signs = np.frombuffer(data.draw(st.binary(min_size=0, max_size=20)), dtype=np.uint8)
    stream = lanes.CodedStream(words, lane_bits, norm, count)
    try:
        out = lanes.decode_fast(stream, layout, np.arange(256, dtype=np.uint16), mode, raw, signs)
        assert out.size == count
    except lanes.CorruptStream:
        pass


def test_fuzz_mutated_real_stream_is_detected():
    rng = np.random.default_rng(0)
    t = (torch.randn(20000, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    (p,) = dfloat.pack_tensors([t], SMALL)
    detected = 0
    for trial in range(40):
        q = dfloat.PackedTensor(dict(p.meta), {k: v.copy() for k, v in p.arrays.items()})
        key = ["words", "lane_bits", "norm", "values", "raw", "signs"][trial % 6]
        arr = q.arrays[key].view(np.uint8)
        arr[rng.integers(arr.size)] ^= np.uint8(1 << rng.integers(8))
        try:
            out = dfloat.unpack_tensor(q)
        except lanes.CorruptStream:
            detected += 1
            continue
        assert _bits(out) == _bits(t)  # a flip that changes nothing decoded (an unused table slot) is harmless
    assert detected >= 30


# ---------------------------------------------------------------- runner

@pytest.mark.parametrize("maker", ["llama", "gemma3"])
def test_packed_runner_bit_identical(maker, tiny_llama, tiny_gemma3, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.formats.packed_runner import load_packed

    src = tiny_llama if maker == "llama" else tiny_gemma3
    packed_format.pack(src, tmp_path / "p", SMALL, torch.bfloat16)
    packed_format.unpack(tmp_path / "p", tmp_path / "u")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    backends = ["torch"] + (["native"] if native.library() is not None else [])
    for backend in backends:
        runner = load_packed(tmp_path / "p", "cpu", backend)
        assert runner.stats["buffer_bytes"] > 0
        with torch.no_grad():
            assert torch.equal(runner.model(ids).logits, expected), backend


def test_packed_runner_refuses_damage(packed_tiny):
    from compressor.formats.packed_runner import load_packed

    f = packed_tiny / "model.packed.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CompressorError, match="corrupted"):
        load_packed(packed_tiny, "cpu")


@pytest.mark.skipif(not entropy_decode.triton_available(), reason="needs a CUDA GPU and triton")
def test_triton_decoder_matches_reference_on_gpu():
    g = torch.Generator().manual_seed(9)
    ts = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in ((333, 1000), (64, 700), (2048, 129))]
    ts.append((torch.randn(30000, generator=g) * 0.1).half())
    packed = dfloat.pack_tensors(ts, dfloat.PackConfig(lanes=64, steps=128))
    specs, off = [], 0
    for t, p in zip(ts, packed):
        specs.append(packed_format.stream_spec(p, off))
        off += t.numel()
    assert all(s is not None for s in specs)
    plan = entropy_decode.build_plan(specs, "cuda")
    expected = b"".join(_bits(t) for t in ts)
    from compressor.kernels import entropy_decode_cuda

    for backend in ("triton", "torch") + (("cuda",) if entropy_decode_cuda.available() else ()):
        out = torch.full((off,), -21846, dtype=torch.int16, device="cuda")
        entropy_decode.decode(plan, out, backend)
        assert out.cpu().numpy().tobytes() == expected, backend


@pytest.mark.skipif(not entropy_decode.triton_available(), reason="needs a CUDA GPU and triton")
def test_packed_runner_bit_identical_on_gpu(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.formats.packed_runner import load_packed

    packed_format.pack(tiny_llama, tmp_path / "p", SMALL, torch.bfloat16)
    packed_format.unpack(tmp_path / "p", tmp_path / "u")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.bfloat16).cuda().eval()
    runner = load_packed(tmp_path / "p", "cuda")
    assert runner.backend == "triton"
    ids = torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        assert torch.equal(runner.model(ids).logits, ref(ids).logits)


# ---------------------------------------------------------------- reference model (slow)

@pytest.mark.slow
def test_reference_model_pack_ratio_unpack_and_run(tmp_path):
    from compressor.api import pack, unpack
    from compressor.formats.packed_runner import load_packed

    r = pack("smollm2-135m", tmp_path / "p", dtype="bfloat16")
    assert r["ratio"] <= 0.665
    unpack(tmp_path / "p", tmp_path / "u")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.bfloat16).eval()
    runner = load_packed(tmp_path / "p", "cpu")
    ids = torch.randint(0, 49000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(runner.model(ids).logits, ref(ids).logits)
    shutil.rmtree(tmp_path / "u")


def test_cuda_kernel_source_decodes_correctly_when_emulated_on_cpu(tmp_path):
    """The CuPy kernels' CUDA source, compiled as C++ with one thread run after another, on a plan
    with both raw-plane layouts: checks their logic where no GPU is (needs a C++ compiler)."""
    import ctypes
    import subprocess

    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    from compressor.kernels import entropy_decode_cuda

    src = entropy_decode_cuda._SOURCE.replace("extern __shared__ unsigned int stab[];", "static unsigned int stab[4096];")
    src = src.replace("i += blockDim.x", "i += 1")  # one emulated thread loads the whole table
    shim = ("#define __global__\nstruct D { int x; }; static D blockIdx, blockDim, threadIdx;\n"
            "static void __syncthreads() {}\n")
    runner = """
extern "C" void run_all(const unsigned int* w, const unsigned int* tb, const unsigned char* raw,
    const unsigned char* sg, short* out, const long long* lp, const long long* lo, const long long* lr,
    const long long* ls, const int* ln, const int* lt, int n, int stride, int R, int mode, int block) {
  blockDim.x = block;
  for (int b = 0; b * block < n; b++) { blockIdx.x = b;
    for (int t = 0; t < block; t++) { threadIdx.x = t;
      tans_decode_smem(w, tb, raw, sg, out, lp, lo, lr, ls, ln, lt, n, stride, R, mode); } }
}
"""
    (tmp_path / "k.cpp").write_text(shim + src + runner)
    subprocess.run([compiler, "-O1", "-w", "-shared", "-fPIC", "-o", str(tmp_path / "k.so"), str(tmp_path / "k.cpp")],
                   check=True)
    lib = ctypes.CDLL(str(tmp_path / "k.so"))
    g = torch.Generator().manual_seed(5)
    ts = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in ((333, 1000), (64, 700), (2048, 129))]
    ts.append((torch.randn(30000, generator=g) * 0.1).half())
    packed = dfloat.pack_tensors(ts, dfloat.PackConfig(lanes=64, steps=128))
    specs, off = [], 0
    for t, p in zip(ts, packed):
        specs.append(packed_format.stream_spec(p, off))
        off += t.numel()
    plan = entropy_decode.build_plan(specs, "cpu")
    assert {ls.mode for ls in plan.lanes} == {1, 2}
    expected = torch.cat([t.reshape(-1).view(torch.int16) for t in ts])

    def p(t):
        return ctypes.c_void_p(t.data_ptr())

    out = torch.full((off,), -21846, dtype=torch.int16)
    for ls in plan.lanes:
        lib.run_all(p(plan.words), p(plan.table), p(plan.raw), p(plan.signs), p(out), p(ls.pos),
                    p(ls.out), p(ls.raw), p(ls.sign), p(ls.n), p(ls.tab), ctypes.c_int(ls.pos.numel()),
                    ctypes.c_int(plan.stride), ctypes.c_int(plan.table_log), ctypes.c_int(ls.mode), ctypes.c_int(32))
    assert torch.equal(out, expected)


def test_inspect_counts_packed_parameters(packed_tiny, tiny_llama):
    r = cli("--json", "inspect", packed_tiny)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    base = json.loads(cli("--json", "inspect", tiny_llama).stdout)
    assert info["kind"] == "packed" and info["params"] == base["params"]
    assert info["bits_per_weight_file"] < 16
