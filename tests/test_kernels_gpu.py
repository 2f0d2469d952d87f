"""The CUDA kernels against the reference path, on a GPU (skipped without one).

Every case draws fresh random codes, scales, zero points and activations, poisons the output
with NaN first, and compares with float64 arithmetic on the same quantized values. The tolerance
is stated against the reference path's own error: the kernels' relative Frobenius error must be
at most twice the error of dequantize-then-matmul in the same 16-bit dtype, and below 1e-2."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from compressor.formats.activations import fake_quantize
from compressor.schemes import dequantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

from compressor.kernels import quant_linear, splitk, w8_triton, wq_gemv, wq_layout, wq_triton  # noqa: E402

# bits, group, asymmetric, act-order, dtype, M, N, K
WQ_CASES = [
    (4, 128, False, False, torch.bfloat16, 1, 4096, 4096),
    (4, 64, True, False, torch.bfloat16, 16, 1000, 2048),
    (4, 32, False, True, torch.float16, 3, 768, 1024),
    (4, -1, True, False, torch.bfloat16, 77, 520, 1000),
    (3, 128, False, False, torch.bfloat16, 1, 2048, 4096),
    (3, 64, True, True, torch.bfloat16, 17, 384, 1024),
    (2, 128, False, False, torch.bfloat16, 5, 1152, 2048),
    (2, 32, True, False, torch.float16, 64, 256, 512),
    (5, 64, False, False, torch.bfloat16, 9, 640, 1024),
    (5, 128, True, True, torch.float16, 130, 300, 768),
    (6, 128, False, False, torch.bfloat16, 2, 896, 1536),
    (6, 32, True, False, torch.bfloat16, 256, 512, 512),
    (8, 128, False, False, torch.bfloat16, 1, 2048, 2048),
    (8, -1, True, False, torch.float16, 33, 700, 1100),
    (8, 256, False, True, torch.bfloat16, 300, 1024, 1024),
    (4, 128, False, False, torch.bfloat16, 1000, 1024, 2048),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def case_id(case) -> str:
    bits, group, asym, perm, dtype, m, n, k = case
    return f"w{bits}-g{group}-{'asym' if asym else 'sym'}{'-act' if perm else ''}-{str(dtype)[6:]}-{m}x{n}x{k}"


def weight_only(case, seed: int):
    bits, group, asym, perm, dtype, m, n, k = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = 1 if group <= 0 else k // group
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 1e-3).half()
    zero = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, groups), generator=g, device="cuda",
                         dtype=torch.int8) if asym else None
    g_idx = (torch.randperm(k, generator=g, device="cuda") // group).int() if perm else None
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    bias = torch.randn(n, generator=g, device="cuda").to(dtype) if seed % 2 else None
    return codes, scale, zero, g_idx, x, bias


@pytest.mark.parametrize("case", WQ_CASES, ids=case_id)
def test_weight_only_kernel_matches_the_reference(case):
    bits, group, _, _, dtype, m, n, k = case
    for seed, use_asm, split in ((1, True, None), (2, False, 8), (3, True, 1)):
        codes, scale, zero, g_idx, x, bias = weight_only(case, seed + 10 * WQ_CASES.index(case))
        w = wq_layout.repack(codes, scale, zero, bits, group, g_idx)
        exact = x.double() @ dequantize(codes, scale, zero, g_idx, torch.float64).T
        if bias is not None:
            exact += bias.double()
        reference = F.linear(x, dequantize(codes, scale, zero, g_idx, dtype), bias)
        config = None
        if split is not None:
            config = splitk.plan(wq_triton.CONFIGS, m, w.n_pad, w.groups, splitk.sm_count(x.device), split=split)
        counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        wq_triton.wq_matmul(x, w, bias, counters, use_asm=use_asm, config=config, out=out)
        assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
        assert rel(out, exact) <= min(max(2 * rel(reference, exact), 4e-3), 1e-2), (seed, rel(out, exact),
                                                                                     rel(reference, exact))
        assert int(counters.abs().sum()) == 0, "split-K counters not reset"


GEMV_CASES = [c for c in WQ_CASES if c[5] <= wq_gemv.MAX_M] + [
    (4, 64, False, False, torch.bfloat16, 1, 14336, 4096), (4, 128, True, False, torch.float16, 16, 4096, 14336),
    (3, 64, False, False, torch.bfloat16, 8, 1024, 4096), (2, 64, True, False, torch.bfloat16, 4, 2048, 1024)]


@pytest.mark.skipif(not wq_gemv.available(), reason="the decode GEMV needs CuPy")
@pytest.mark.parametrize("case", GEMV_CASES, ids=case_id)
def test_decode_gemv_matches_the_reference(case):
    """The CUDA decode GEMV under its own plan, a deep split-K and a wide block without split."""
    bits, group, _, _, dtype, m, n, k = case
    sms = splitk.sm_count(torch.device("cuda"))
    for seed, forced in ((1, {}), (2, {"rt": 1, "nw": 2, "un": 2, "split": 3}), (3, {"rt": 2, "nw": 8, "split": 1})):
        codes, scale, zero, g_idx, x, bias = weight_only(case, seed + 500 + 10 * GEMV_CASES.index(case))
        w = wq_layout.repack(codes, scale, zero, bits, group, g_idx)
        exact = x.double() @ dequantize(codes, scale, zero, g_idx, torch.float64).T
        if bias is not None:
            exact += bias.double()
        reference = F.linear(x, dequantize(codes, scale, zero, g_idx, dtype), bias)
        counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        wq_gemv.gemv(x, w, bias, counters, config=wq_gemv.plan(m, w, sms, **forced) if forced else None, out=out)
        assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
        assert rel(out, exact) <= min(max(2 * rel(reference, exact), 4e-3), 1e-2), (seed, rel(out, exact),
                                                                                     rel(reference, exact))
        assert int(counters.abs().sum()) == 0, "split-K counters not reset"
        if not forced:  # QuantLinear's dispatch picks this path for decode rows and agrees with it
            assert torch.equal(quant_linear.weight_only_matmul(x, w, bias, counters), out) == \
                (m <= quant_linear.GEMV_MAX_M)


# kind, static input scale, dtype, M, N, K
W8_CASES = [("int", False, torch.bfloat16, 1, 4096, 4096), ("int", False, torch.bfloat16, 16, 1000, 1000),
            ("int", True, torch.float16, 70, 520, 2048), ("int", False, torch.bfloat16, 300, 2048, 1024),
            ("float", False, torch.bfloat16, 1, 2048, 4096), ("float", True, torch.bfloat16, 64, 1024, 1024),
            ("float", False, torch.float16, 9, 700, 1000), ("float", False, torch.bfloat16, 257, 1024, 2048)]


@pytest.mark.parametrize("case", W8_CASES, ids=lambda c: f"{c[0]}-{'static' if c[1] else 'dynamic'}-"
                                                          f"{str(c[2])[6:]}-{c[3]}x{c[4]}x{c[5]}")
def test_eight_bit_kernels_match_the_reference(case):
    kind, static, dtype, m, n, k = case
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g, device="cuda")
    w_scale = w.abs().amax(dim=1, keepdim=True) / (127.0 if kind == "int" else 448.0)
    codes = (w / w_scale).round().clamp(-127, 127).to(torch.int8) if kind == "int" else \
        (w / w_scale).to(torch.float8_e4m3fn)
    x = torch.randn(1, m, k, generator=g, device="cuda").to(dtype)
    input_scale = (x.abs().amax().float() / (127.5 if kind == "int" else 448.0)).reshape(1) if static else None
    x_hat = fake_quantize(x, kind, 8, input_scale)
    w_hat = codes.float() * w_scale
    exact = x_hat.double() @ w_hat.double().T
    reference = F.linear(x_hat.to(dtype), w_hat.to(dtype))
    n_pad = -(-n // 128) * 128
    padded = torch.zeros(n_pad, k, dtype=codes.dtype, device="cuda")
    padded[:n] = codes
    flat = torch.zeros(n_pad, device="cuda")
    flat[:n] = w_scale[:, 0]
    counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    w8_triton.w8_matmul(x, padded, flat, None, counters, n, input_scale, out=out)
    bound = min(max(2 * rel(reference, exact), 4e-3), 1e-2)
    assert torch.isfinite(out).all() and rel(out[None], exact) <= bound, (rel(out[None], exact), bound)
    assert int(counters.abs().sum()) == 0
    if kind == "float" and dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0:
        y = w8_triton.fp8_scaled_mm(x, padded, flat, None, n, input_scale)
        assert rel(y, exact) <= bound


def test_quant_linears_through_the_loader_match_the_float_path(tmp_path):
    """Tiny artifacts loaded for CUDA (QuantLinear on the kernels) against the float loader on
    the same GPU in bf16: logits agree to bf16 accuracy (FP8 to 5e-2: its inputs are rounded to
    3 mantissa bits, so a last-bit difference upstream can move a code by a whole step)."""
    from compressor import api
    from compressor.formats.quant_runtime import kernel_summary
    from conftest import make_llama, make_text

    model_dir = make_llama(tmp_path / "m", layers=2, hidden=128, intermediate=256)
    text = tmp_path / "t.txt"
    text.write_text(make_text(4000))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    for method, options in (("rtn", {"bits": 4, "group_size": 32, "sym": False}), ("rtn", {"bits": 3}),
                            ("smoothquant", {}), ("fp8", {})):
        out = tmp_path / f"{method}-{len(options)}"
        api.quantize(str(model_dir), method, out, options, calib=str(text), samples=4, seq_len=32)
        fast = api.load(out, dtype=torch.bfloat16, device="cuda").model
        assert kernel_summary(fast) == {"triton": 14}
        slow = api.load(out, dtype=torch.bfloat16).model.cuda()
        with torch.no_grad():
            a, b = fast(ids).logits.float(), slow(ids).logits.float()
            a1, b1 = fast(ids[:, :1]).logits.float(), slow(ids[:, :1]).logits.float()  # decode-sized rows
        assert rel(a, b) < (5e-2 if method == "fp8" else 2e-2), (method, options, rel(a, b))
        assert rel(a1, b1) < (5e-2 if method == "fp8" else 2e-2), (method, options, rel(a1, b1))
