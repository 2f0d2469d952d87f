"""Quantized linears at run time (CPU part): the torch bit stream, the kernel layout, QuantLinear's
reference path against the float loader, backend choice and fallbacks, and `compress bench`.
The kernels themselves are checked against the reference on a GPU in test_kernels_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.formats import bitpack
from compressor.formats import artifact as artifacts
from compressor.kernels import bitstream, quant_linear, wq_layout
from compressor.formats import quant_runtime
from helpers import cli

CALIB = {"samples": 8, "seq_len": 64}
CASES = {
    "w4-g32-asym": ("rtn", {"bits": 4, "group_size": 32, "sym": False}),
    "w3-g64": ("rtn", {"bits": 3, "group_size": 64}),
    "w8-channel": ("rtn", {"bits": 8, "group_size": -1}),
    "w4-g16": ("rtn", {"bits": 4, "group_size": 16}),  # no kernel layout: reference path
    "w4-gptq": ("gptq", {"bits": 4, "group_size": 32, "act_order": True}),
    "w8a8": ("smoothquant", {}),
    "fp8": ("fp8", {}),
    "fp8-static": ("fp8", {"act_static": True}),
}


@pytest.fixture(scope="module")
def built(tiny_llama, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-artifacts")
    out = {}
    for name, (method, options) in CASES.items():
        out[name] = root / name
        api.quantize(str(tiny_llama), method, out[name], options, calib=str(text_file), **CALIB)
    return out


def ids(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- bit stream and layout

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_torch_bit_stream_matches_the_numpy_format(bits):
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 31, 32, 33, 100, 576):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g, dtype=torch.int8)
        packed = bitstream.pack_rows(codes, bits)
        assert torch.equal(packed, bitpack.pack(codes, bits))
        assert torch.equal(bitstream.unpack_rows(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", sorted(wq_layout.PLANES))
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
def test_layout_holds_every_code_and_a_scale_row_per_tile(bits, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    out_features, in_features = 130, 512 if group_size > 0 else 200  # ragged rows; ragged K per channel
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (out_features, in_features), generator=g,
                          dtype=torch.int8)
    groups = 1 if group_size <= 0 else in_features // group_size
    scale = torch.rand(out_features, groups, generator=g).half()
    zero = torch.randint(-2, 2, (out_features, groups), generator=g, dtype=torch.int8)
    w = wq_layout.repack(codes, scale, zero, bits, group_size)
    assert torch.equal(wq_layout.unpack_values(w)[:out_features, :in_features], codes.int() + (1 << (bits - 1)))
    assert w.n_pad % 128 == 0 and w.k_pad % w.block_k == 0 and w.k_pad >= in_features
    column_group = torch.zeros(in_features, dtype=torch.long) if group_size <= 0 else \
        torch.arange(in_features) // group_size
    tile_of_column = torch.arange(in_features) // w.block_k
    assert torch.equal(w.scales[tile_of_column, :out_features].T, scale[:, column_group])
    assert torch.equal(w.zeros[tile_of_column, :out_features].T, zero[:, column_group])


def test_act_order_columns_are_regrouped_and_read_through_perm():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (64, 128), generator=g, dtype=torch.int8)
    g_idx = torch.randperm(128, generator=g) // 32
    w = wq_layout.repack(codes, torch.rand(64, 4).half(), None, 4, 32, g_idx)
    assert w.perm is not None and torch.equal(g_idx[w.perm.long()], torch.arange(128) // 32)
    assert torch.equal(wq_layout.unpack_values(w)[:64], codes[:, w.perm.long()].int() + 8)
    assert wq_layout.repack(codes, torch.rand(64, 4).half(), None, 4, 32, torch.arange(128) // 32).perm is None


@pytest.mark.parametrize("bits, group_size, g_idx, phrase", [
    (7, 32, None, "7-bit"), (4, 48, None, "group size 48"),
    (4, 32, torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32), "unequal size")])
def test_layouts_the_kernels_do_not_take_are_refused_with_a_reason(bits, group_size, g_idx, phrase):
    codes = torch.zeros(64, 128, dtype=torch.int8)
    with pytest.raises(wq_layout.Unsupported, match=phrase):
        wq_layout.repack(codes, torch.ones(64, 128 // group_size), None, bits, group_size, g_idx)


# ---------------------------------------------------------------- QuantLinear reference path

@pytest.mark.parametrize("case", list(CASES))
def test_quantized_linears_match_the_dequantized_float_model(case, built):
    """The loader's QuantLinear path (reference backend on CPU) computes what the float loader
    computes: same dequantization, same simulated input quantization."""
    path = built[case]
    expected = api.load(path).model
    config = artifacts.read_config(path)
    qconfig = config.pop("quantization_config")
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    warnings = []
    model = quant_runtime.build_quantized_model(hf_config, artifacts.load_tensors(path), qconfig, torch.float32,
                                                torch.device("cpu"), warnings.append)
    assert warnings == []
    layers = [m for m in model.modules() if isinstance(m, quant_linear.QuantLinear)]
    assert len(layers) == 3 * 7 and {m.backend for m in layers} == {"torch"}
    assert not any(isinstance(m, torch.nn.Linear) and "layers." in n for n, m in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected(ids()).logits, rtol=1e-5, atol=1e-5)


def test_layers_without_a_kernel_fall_back_with_a_warning_naming_them(built, monkeypatch):
    """Where kernels could run, a layer whose layout they do not take runs the reference path and
    the loader names it; the others get the kernel layout."""
    monkeypatch.setattr(quant_linear, "kernels_possible", lambda device, dtype: True)
    for case, expect_kernels in (("w4-g16", False), ("w4-g32-asym", True)):
        tensors = artifacts.load_tensors(built[case])
        qconfig = artifacts.read_config(built[case])["quantization_config"]
        # an act-order column map, as other tools write it (ours keeps static groups)
        tensors["model.layers.0.mlp.down_proj.weight_g_idx"] = (
            torch.randperm(128, generator=torch.Generator().manual_seed(0)) // 32).int()
        warnings = []
        _, layers = quant_runtime.quantized_linears(tensors, qconfig, torch.bfloat16, torch.device("cpu"),
                                                    warnings.append)
        backends = {layer.backend for layer in layers.values()}
        if expect_kernels:
            assert backends == {"triton"} and warnings == []
            layer = layers["model.layers.0.mlp.down_proj"]
            assert layer.perm is not None and layer.plane0.dtype == torch.int32
        else:
            assert backends == {"torch"} and len(warnings) == len(layers)
            assert any(w.startswith("model.layers.0.self_attn.q_proj: no kernel for group size 16")
                       for w in warnings)
            assert all("reference path" in w for w in warnings)


def test_damaged_tensors_name_the_module(built):
    tensors = artifacts.load_tensors(built["w4-g32-asym"])
    qconfig = artifacts.read_config(built["w4-g32-asym"])["quantization_config"]
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = tensors["model.layers.1.mlp.up_proj.weight_scale"][:, :1]
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="model.layers.1.mlp.up_proj"):
        quant_runtime.quantized_linears(tensors, qconfig, torch.float32, torch.device("cpu"), print)


# ---------------------------------------------------------------- compress bench

def test_bench_on_cpu_reports_both_models_and_says_what_runs(built):
    result = cli("--json", "bench", built["w4-g32-asym"], "--device", "cpu", "--batch", "1,2",
                 "--prompt-len", "8", "--gen-len", "3")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["device"] == "cpu" and "reference path" in r["note"]
    for label in ("base", "artifact"):
        rows = r[label]["rows"]
        assert [row["batch"] for row in rows] == [1, 2]
        assert all(row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows)
        assert not any(row["cuda_graph"] for row in rows)
    assert [s["batch"] for s in r["speedup"]] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_one_line_error(built):
    result = cli("bench", built["w8a8"], "--device", "cuda")
    assert result.exit_code == 2
    assert "not available" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, phrase", [(["--batch", "1,x"], "comma-separated"), (["--batch", "0"], "positive"),
                                          (["--gen-len", "0"], "positive"), (["--device", "tpu"], "tpu")])
def test_bench_bad_settings_are_one_line_errors(args, phrase, built):
    result = cli("bench", built["w8a8"], *args)
    assert result.exit_code == 2 and phrase in result.stderr


# ---------------------------------------------------------------- the kernels' indexing, without a GPU

INTERPRETED = r"""
import numpy as np, torch
import triton.runtime.interpreter as interp
_patch = interp._patch_lang_tensor
def _patched(tensor, scope):  # Triton 3.6's interpreter calls int() on 1-element arrays (numpy >= 2.4 refuses)
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
interp._patch_lang_tensor = _patched
from compressor.kernels import splitk, w8_triton, wq_layout, wq_triton
from compressor.schemes import dequantize
g = torch.Generator().manual_seed(0)
for bits, group, asym, act, m, n, k, split in [(4, 128, False, False, 1, 64, 256, 2), (3, 64, True, True, 3, 70, 256, 1),
                                              (8, -1, False, False, 17, 64, 200, 1), (2, 32, True, False, 2, 64, 128, 4)]:
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, dtype=torch.int8)
    groups = 1 if group <= 0 else k // group
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).half()
    zero = torch.randint(-2, 2, (n, groups), generator=g, dtype=torch.int8) if asym else None
    g_idx = (torch.randperm(k, generator=g) // group).int() if act else None
    w = wq_layout.repack(codes, scale, zero, bits, group, g_idx)
    x = torch.randn(m, k, generator=g).half()
    config = splitk.plan([(m, {"BM": 16 if m <= 16 else 32, "BN": 64, "num_warps": 4, "num_stages": 1})],
                         m, w.n_pad, w.groups, 132, split=split)
    counters = torch.zeros(64, dtype=torch.int32)
    y = wq_triton.wq_matmul(x, w, None, counters, use_asm=False, config=config)
    exact = x.double() @ dequantize(codes, scale, zero, g_idx, torch.float64).T
    assert float((y.double() - exact).norm() / exact.norm()) < 2e-3 and not counters.any(), (bits, group)
q = torch.randint(-127, 128, (64, 300), generator=g, dtype=torch.int8)
x = torch.randn(5, 300, generator=g).half()
y = w8_triton.w8_matmul(x, q, torch.full((64,), 0.01), None, torch.zeros(64, dtype=torch.int32), 64,
                        config={"BM": 16, "BN": 64, "num_warps": 4, "num_stages": 1, "split_k": 3, "units_per_split": 1})
xq, xs = w8_triton.quantize_rows(x, False)
exact = (xq.double() * xs.double()[:, None]) @ (q.double() * 0.01).T
assert float((y.double() - exact).norm() / exact.norm()) < 2e-3
print("ok")
"""


def test_kernels_compute_the_reference_in_the_triton_interpreter():
    """The kernels' index arithmetic, layouts, act-order gather and split-K hand-off, run by
    Triton's CPU interpreter (fp16: the interpreter has no bf16; the PTX paths need a GPU)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
