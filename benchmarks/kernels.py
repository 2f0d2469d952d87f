"""Kernel benchmark (run on an H100/H200): our weight-only int-N, W8A8 and FP8 GEMMs on Llama-3
8B/70B linear shapes beside torch bf16 `linear` and torch's int4 weight-only kernel, measured in
the same run; then batch-1/16 decode of a synthetic Llama-3-8B-shaped model through our loader.

Protocol (BENCHMARKS.md): every operator is timed inside a CUDA graph that calls it once on each
of several weight copies whose total size exceeds L2 several times (so every call reads its
weights from device memory), replayed after a warm-up; the time per call is the median replay
time over the calls. GB/s counts the bytes a call must read (weights, scales, zero points,
activations) and write (output); % of copy bandwidth compares that with a device-to-device copy
measured in the same run (bytes read + written). TFLOP/s = 2·M·N·K / time.

Weights are synthetic (random codes and scales built directly in each format on the GPU): speed
does not depend on the values. Writes <out>/kernels.json (rows as results/kernels.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from compressor.kernels import quant_linear, splitk, w8_triton, wq_gemv, wq_layout, wq_triton  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]  # (N, K): out × in
MS = [1, 4, 16, 64, 256]
WEIGHT_ONLY = [(4, 64), (4, 128), (3, 64), (3, 128), (2, 64), (2, 128), (8, 128)]
ROTATION_BYTES = 4 * 60 * 2**20  # weights touched per graph replay: several times the 60 MB L2
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


# ---------------------------------------------------------------- timing

def graph_time(calls: list, replays: int = 15) -> float:
    """Median seconds per call of `calls` (closures) captured once in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up: compiles, allocates workspaces
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written: the faster of the copy engine path
    (`copy_`) and an SM kernel (`mul(x, 1)`), so that % of copy is not flattered."""
    x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    memcpy = graph_time([lambda: y.copy_(x)] * 4, replays=10)
    kernel = graph_time([lambda: torch.mul(x, 1.0, out=y)] * 4, replays=10)
    return 2 * x.numel() * 4 / min(memcpy, kernel) / 1e9


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / graph_time([lambda: a @ b] * 4, replays=5) / 1e12


def copies_for(nbytes: int) -> int:
    return max(2, -(-ROTATION_BYTES // max(nbytes, 1)))


# ---------------------------------------------------------------- operators under test

def bf16_op(n: int, k: int, g: torch.Generator):
    w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    return (lambda x: F.linear(x, w)), n * k * 2


def weight_only_op(n: int, k: int, bits: int, group: int, g: torch.Generator):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g, device="cuda") * 0.01 + 1e-3).half()
    w = wq_layout.repack(codes, scale, None, bits, group)
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    del codes
    def op(x):  # what QuantLinear runs: the decode GEMV for few rows, the Triton GEMM above
        return quant_linear.weight_only_matmul(x, w, None, counters)

    op.layout = w
    return op, w.nbytes()


def eight_bit_op(n: int, k: int, fp8: bool, g: torch.Generator, scaled_mm: bool = False):
    codes = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    if fp8:
        codes = (codes.float() / 127 * 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=g, device="cuda") * 0.01
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    if scaled_mm:
        return (lambda x: w8_triton.fp8_scaled_mm(x, codes, scale, None, n)), codes.numel() + 4 * n

    def op(x):
        return w8_triton.w8_matmul(x, codes, scale, None, counters, n)

    op.weights = (codes, scale)
    return op, codes.numel() + 4 * n


def int4pack_op(n: int, k: int, group: int, g: torch.Generator):
    """torch's own int4 weight-only kernel (tinygemm), the weak baseline."""
    w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    codes = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    scales_zeros = torch.rand(k // group, n, 2, generator=g, device="cuda").to(torch.bfloat16)
    del w
    return (lambda x: torch._weight_int4pack_mm(x, packed, group, scales_zeros)), n * k // 2 + scales_zeros.numel() * 2


def build_copies(make) -> tuple[list, int]:
    """Enough copies of the operator `make()` builds that one pass over them exceeds L2 several times."""
    op, nbytes = make()
    return [op] + [make()[0] for _ in range(copies_for(nbytes) - 1)], nbytes


def time_ops(ops: list, m: int, k: int, g: torch.Generator) -> float:
    """Seconds per call, one call per weight copy with its own activations."""
    xs = [torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16) for _ in ops]
    return graph_time([lambda o=o, x=x: o(x) for o, x in zip(ops, xs)])


# ---------------------------------------------------------------- kernel rows

def operators(n: int, k: int, g: torch.Generator, weight_only=WEIGHT_ONLY, methods=None) -> list:
    cases = [("torch-int4pack", {"bits": 4, "group_size": gs}, lambda gs=gs: int4pack_op(n, k, gs, g))
             for gs in (64, 128)]
    cases += [(f"w{b}a16", {"bits": b, "group_size": gs}, lambda b=b, gs=gs: weight_only_op(n, k, b, gs, g))
              for b, gs in weight_only]
    cases += [("w8a8", {"bits": 8, "act_bits": 8}, lambda: eight_bit_op(n, k, False, g)),
              ("fp8", {"bits": 8, "act_bits": 8, "backend": "triton"}, lambda: eight_bit_op(n, k, True, g)),
              ("fp8", {"bits": 8, "act_bits": 8, "backend": "scaled_mm"},
               lambda: eight_bit_op(n, k, True, g, scaled_mm=True))]
    return [c for c in cases if methods is None or c[0] in methods]


def row(method: str, config: dict, n: int, k: int, m: int, t: float, nbytes: int, base_t: float,
        copy_gbps: float) -> dict:
    moved = nbytes + m * k * 2 + m * n * 2
    return {"method": method, "config": config, "shape": f"{n}x{k}", "m": m, "time_us": t * 1e6,
            "bf16_time_us": base_t * 1e6, "speedup_vs_bf16": base_t / t, "bytes": moved,
            "gbps": moved / t / 1e9, "pct_copy_bw": 100 * moved / t / 1e9 / copy_gbps,
            "tflops": 2 * m * n * k / t / 1e12}


def kernel_rows(copy_gbps: float, log, rows: list, save, shapes=SHAPES, ms=MS, methods=None) -> None:
    """Appends to `rows`, saving after each shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        ops, nbytes = build_copies(lambda: bf16_op(n, k, g))
        base = {m: time_ops(ops, m, k, g) for m in ms}
        rows += [row("bf16", {"bits": 16}, n, k, m, base[m], nbytes, base[m], copy_gbps) for m in ms]
        del ops
        for method, config, make in operators(n, k, g, methods=methods):
            try:
                ops, nbytes = build_copies(make)
                for m in ms:
                    rows.append(row(method, config, n, k, m, time_ops(ops, m, k, g), nbytes, base[m], copy_gbps))
            except Exception as exc:  # a failing operator is recorded, not hidden
                rows.append({"method": method, "config": config, "shape": f"{n}x{k}",
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                log(f"{method} {config} {n}x{k}: {rows[-1]['error']}")
            ops = None
            torch.cuda.empty_cache()
        for m in ms:
            got = [r for r in rows if r.get("shape") == f"{n}x{k}" and r.get("m") == m and r["method"] != "bf16"]
            log(f"{n}x{k} m={m}: bf16 {base[m] * 1e6:.1f} us; " + ", ".join(
                f"{r['method']}{r['config'].get('group_size') or r['config'].get('backend', '')} "
                f"{r['speedup_vs_bf16']:.2f}x" for r in got))
        save()


def sweep_rows(copy_gbps: float, log, spec: dict) -> list[dict]:
    """Time configurations of our kernels (spec: {"weight_only": [...], "w8a8": [...]}, each entry
    {"shapes": [[N, K]], "ms": [...], "configs": [{BM, BN, num_warps, num_stages, per_sm, ...}]})."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    for kind, entries in spec.items():
        for entry in entries:
            for n, k in entry["shapes"]:
                ops, _ = build_copies(lambda: bf16_op(n, k, g))
                base = {m: time_ops(ops, m, k, g) for m in entry["ms"]}
                del ops
                weight_only = kind == "weight_only"
                bits = entry.get("bits", 4 if weight_only else 8)
                group = entry.get("group_size", 128 if weight_only else None)
                if kind == "weight_only":
                    made, nbytes = build_copies(lambda: weight_only_op(n, k, bits, group, g))
                    weights = [op.layout for op in made]
                else:
                    made, nbytes = build_copies(lambda: eight_bit_op(n, k, kind == "fp8", g))
                    weights = [op.weights for op in made]
                for cfg in entry["configs"]:
                    for m in entry["ms"]:
                        if kind == "weight_only":
                            config = splitk.plan([(m, cfg)], m, weights[0].n_pad, weights[0].groups, sms)
                            calls = [lambda x, w=w: wq_triton.wq_matmul(x, w, None, counters, cfg.get("asm"), config)
                                     for w in weights]
                        else:
                            config = splitk.plan([(m, cfg)], m, weights[0][0].shape[0], -(-k // 128), sms)
                            calls = [lambda x, w=w: w8_triton.w8_matmul(x, w[0], w[1], None, counters, n, config=config)
                                     for w in weights]
                        try:
                            t = time_ops(calls, m, k, g)
                        except Exception as exc:
                            log(f"sweep {kind} {n}x{k} m={m} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                            continue
                        rows.append({"method": f"{kind}-sweep", "shape": f"{n}x{k}", "m": m,
                                     "config": {"bits": bits, "group_size": group, **config},
                                     "time_us": t * 1e6, "bf16_time_us": base[m] * 1e6, "speedup_vs_bf16": base[m] / t,
                                     "pct_copy_bw": 100 * (nbytes + m * (n + k) * 2) / t / 1e9 / copy_gbps})
                for m in entry["ms"]:
                    got = sorted((r for r in rows if r["method"] == f"{kind}-sweep" and r["shape"] == f"{n}x{k}"
                                  and r["m"] == m), key=lambda r: -r["speedup_vs_bf16"])
                    for r in got[:3]:
                        log(f"sweep {kind} {n}x{k} m={m}: {r['speedup_vs_bf16']:.2f}x {r['pct_copy_bw']:.0f}% "
                            f"{ {k2: v for k2, v in r['config'].items() if k2 not in ('bits', 'group_size')} }")
                del made, weights
                torch.cuda.empty_cache()
    return rows


GEMV_SHAPES = [(14336, 4096), (4096, 14336)]  # one "wide" and one "narrow" output (wq_gemv.LAUNCH)
GEMV_CONFIGS = [{"rt": rt, "nw": nw, "un": un, "warps_per_sm": wps}  # the two best of the first sweep and neighbours
                for rt, nw, un, wps in ((1, 4, 1, 32), (1, 8, 2, 16), (2, 4, 1, 32), (1, 4, 2, 24), (1, 8, 1, 32))]
CROSSOVER_MS = [1, 2, 4, 8, 16]


def gemv_rows(copy_gbps: float, log) -> list[dict]:
    """The decode GEMV's launch settings timed on 4-bit g128 weights of the 8B MLP shapes at M=1, the
    fastest per output width applied to wq_gemv.LAUNCH; then the GEMV against the Triton GEMM at
    M = 1..16 on the same weights, the largest M up to which the GEMV is never slower applied to
    quant_linear.GEMV_MAX_M (everything measured after this runs with both)."""
    rows: list[dict] = []
    if not check_gemv(log):
        quant_linear.GEMV_MAX_M = 0
        return rows
    try:
        measure_gemv(copy_gbps, log, rows)
    except Exception as exc:  # recorded; the Triton GEMM then runs every M
        quant_linear.GEMV_MAX_M = 0
        log(f"gemv failed, not used: {type(exc).__name__}: {str(exc)[:500]}")
    return rows


def check_gemv(log) -> bool:
    """The decode GEMV must match dequantize-then-matmul before it is timed or used."""
    from compressor.schemes import dequantize

    g = torch.Generator(device="cuda").manual_seed(5)
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    for bits, group, asym, m, n, k in ((4, 128, False, 1, 14336, 4096), (4, 64, True, 4, 4096, 14336),
                                       (3, 64, False, 16, 2048, 4096), (8, 128, False, 1, 4096, 4096),
                                       (2, 32, True, 8, 1024, 2048)):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, device="cuda",
                              dtype=torch.int8)
        scale = (torch.rand(n, k // group, generator=g, device="cuda") * 0.01 + 1e-3).half()
        zero = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k // group), generator=g, device="cuda",
                             dtype=torch.int8) if asym else None
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        exact = x.double() @ dequantize(codes, scale, zero, None, torch.float64).T
        try:
            y = wq_gemv.gemv(x, wq_layout.repack(codes, scale, zero, bits, group), None, counters)
            err = float((y.double() - exact).norm() / exact.norm())
        except Exception as exc:
            log(f"gemv check failed, not used: {type(exc).__name__}: {str(exc)[:500]}")
            return False
        log(f"gemv check w{bits} g{group} {'asym' if asym else 'sym'} m={m} {n}x{k}: relative error {err:.2e}")
        if not err < 4e-3:
            log("gemv disagrees with the reference: not used")
            return False
    return True


def measure_gemv(copy_gbps: float, log, rows: list[dict]) -> None:
    g = torch.Generator(device="cuda").manual_seed(4)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    faster = {m: True for m in CROSSOVER_MS}
    for n, k in GEMV_SHAPES:
        ops, _ = build_copies(lambda: bf16_op(n, k, g))
        base = {m: time_ops(ops, m, k, g) for m in CROSSOVER_MS}
        del ops
        made, nbytes = build_copies(lambda: weight_only_op(n, k, 4, 128, g))
        weights = [op.layout for op in made]
        width = "wide" if weights[0].n_pad >= 8192 else "narrow"

        def timed(fn, m):
            return time_ops([lambda x, w=w: fn(x, w) for w in weights], m, k, g)

        best = None
        for cfg in GEMV_CONFIGS:
            config = wq_gemv.plan(1, weights[0], sms, **cfg)
            try:
                t = timed(lambda x, w: wq_gemv.gemv(x, w, None, counters, config=config), 1)
            except Exception as exc:
                log(f"gemv {n}x{k} {cfg}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rows.append(row("gemv-sweep", {"bits": 4, "group_size": 128, **cfg, **config}, n, k, 1, t, nbytes,
                            base[1], copy_gbps))
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            raise RuntimeError("no launch setting ran")
        wq_gemv.LAUNCH[width] = dict(best[1])
        log(f"gemv {n}x{k} m=1: best {best[1]} {best[0] * 1e6:.1f} us ({base[1] / best[0]:.2f}x bf16), "
            f"applied to {width} layers")
        for m in CROSSOVER_MS:
            t_gemv = timed(lambda x, w: wq_gemv.gemv(x, w, None, counters), m)
            t_triton = timed(lambda x, w: wq_triton.wq_matmul(x, w, None, counters), m)
            for name, t in (("gemv-decode", t_gemv), ("triton-decode", t_triton)):
                rows.append(row(name, {"bits": 4, "group_size": 128}, n, k, m, t, nbytes, base[m], copy_gbps))
            faster[m] &= t_gemv <= t_triton
            log(f"gemv {n}x{k} m={m}: gemv {t_gemv * 1e6:.1f} us, triton {t_triton * 1e6:.1f} us, "
                f"bf16 {base[m] * 1e6:.1f} us")
        made = weights = []
        torch.cuda.empty_cache()
    max_m = 0
    for m in CROSSOVER_MS:
        if not faster[m]:
            break
        max_m = m
    quant_linear.GEMV_MAX_M = max_m
    log(f"gemv used up to M={max_m}")


def carried_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an earlier results file for what this run did not measure (not its sweeps), each
    marked with the date of the run that measured it."""
    old = json.loads(path.read_text())

    def key(r):
        return (r["method"], json.dumps(r.get("config"), sort_keys=True), r.get("shape"), r.get("m"), r.get("model"),
                r.get("batch"))

    have = {key(r) for r in rows}
    return [{"carried_from": old["date"], **r} for r in old["rows"]
            if not r["method"].endswith("-sweep") and key(r) not in have]


# ---------------------------------------------------------------- end to end

def synthetic_tensors(kind: str, layers: int, g: torch.Generator, shape: dict = LLAMA_8B,
                      device: str = "cuda") -> tuple[dict, dict | None]:
    """A Llama-3-8B-shaped artifact's tensors and quantization_config, built on the GPU in the
    formats our writers produce (kind: bf16, w4a16, w3a16, w8a8, fp8)."""
    from compressor.formats import compressed_tensors, naive_quantized
    from compressor.kernels import bitstream
    from compressor.schemes import WeightScheme

    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    bf = torch.bfloat16
    t = {"model.embed_tokens.weight": (torch.randn(shape["vocab_size"], hidden, generator=g, device=device)
                                       * 0.02).to(bf),
         "lm_head.weight": (torch.randn(shape["vocab_size"], hidden, generator=g, device=device) * 0.02).to(bf),
         "model.norm.weight": torch.ones(hidden, dtype=bf, device=device)}
    qconfig = None
    if kind in ("w4a16", "w3a16"):
        scheme = WeightScheme(4 if kind == "w4a16" else 3, 128, True)
        qconfig = compressed_tensors.quantization_config(scheme, ["lm_head"])
    elif kind in ("w8a8", "fp8"):
        qconfig = naive_quantized.quantization_config(naive_quantized.W8Scheme("int" if kind == "w8a8" else "float"),
                                                      ["lm_head"])
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=bf, device=device)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=bf, device=device)
        for name, (n, k) in shapes.items():
            key = p + name
            if kind == "bf16":
                t[key + ".weight"] = (torch.randn(n, k, generator=g, device=device) * 0.02).to(bf)
            elif kind in ("w4a16", "w3a16"):
                bits = scheme.bits
                codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, device=device,
                                      dtype=torch.int8)
                t[key + ".weight_packed"] = bitstream.pack_rows(codes, bits)
                t[key + ".weight_scale"] = (torch.rand(n, k // 128, generator=g, device=device) * 0.01).half()
                t[key + ".weight_shape"] = torch.tensor([n, k])
            else:
                codes = torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8)
                t[key + ".weight"] = codes if kind == "w8a8" else (codes.float() / 127 * 448).to(torch.float8_e4m3fn)
                t[key + ".weight_scale"] = torch.rand(n, 1, generator=g, device=device) * 0.01
    return t, qconfig


E2E_KINDS = ("bf16", "w4a16", "w3a16", "w8a8", "fp8")


def end_to_end_rows(log, layers: int = 32, batches=(1, 16), prompt_len: int = 512, gen_len: int = 64,
                    shape: dict = LLAMA_8B, device: str = "cuda", kinds=E2E_KINDS) -> list[dict]:
    from transformers import LlamaConfig

    from compressor.evaluation.speed import measure
    from compressor.formats.quant_runtime import build_quantized_model, kernel_summary
    from compressor.models.loading import build_model

    config = LlamaConfig(num_hidden_layers=layers, **shape)
    rows, base = [], {}
    for kind in kinds:
        g = torch.Generator(device=device).manual_seed(7)
        started = time.perf_counter()
        tensors, qconfig = synthetic_tensors(kind, layers, g, shape, device)
        if qconfig is None:
            model = build_model(config, tensors, torch.bfloat16).to(device)
        else:
            model = build_quantized_model(config, tensors, qconfig, torch.bfloat16, torch.device(device), log)
        del tensors
        weights_gb = None
        if device == "cuda":
            torch.cuda.empty_cache()
            weights_gb = torch.cuda.memory_allocated() / 1e9
        runtime = kernel_summary(model) or {"dense": 1}
        log(f"e2e {kind}: built in {time.perf_counter() - started:.0f} s, {weights_gb} GB on the GPU, {runtime}")
        for r in measure(model, torch.device(device), list(batches), prompt_len, gen_len, repeats=3):
            if kind == "bf16":
                base[r["batch"]] = r
            b = base[r["batch"]]
            rows.append({"method": kind, "model": f"llama3-8b-shaped-{layers}l", "batch": r["batch"],
                         "config": {"bits": {"bf16": 16, "w4a16": 4, "w3a16": 3}.get(kind, 8),
                                    "group_size": 128 if kind in ("w4a16", "w3a16") else None},
                         "tokens_per_s": r["decode_tokens_per_s"], "bf16_tokens_per_s": b["decode_tokens_per_s"],
                         "speedup_vs_bf16": r["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                         "decode_ms_per_step": r["decode_ms_per_step"],
                         "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                         "peak_memory_mb": r.get("peak_memory_mb"), "weights_gb": weights_gb,
                         "cuda_graph": r["cuda_graph"], "cuda_graph_note": r.get("cuda_graph_note"),
                         "prompt_len": prompt_len, "gen_len": gen_len, "runtime": runtime})
            log(f"e2e {kind} batch {r['batch']}: {r['decode_tokens_per_s']:.1f} tok/s "
                f"({rows[-1]['speedup_vs_bf16']:.2f}x bf16), graph={r['cuda_graph']} {r.get('cuda_graph_note') or ''}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_asm(log) -> None:
    """The inline-PTX path must compute what the plain-Triton path computes; if it does not on this
    GPU, everything below runs the plain path (and the log says so)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    for bits in (4, 3):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (512, 1024), generator=g, device="cuda",
                              dtype=torch.int8)
        w = wq_layout.repack(codes, torch.rand(512, 8, generator=g, device="cuda").half(), None, bits, 128)
        x = torch.randn(4, 1024, generator=g, device="cuda").to(torch.bfloat16)
        try:
            fast = wq_triton.wq_matmul(x, w, None, counters, use_asm=True).float()
            ok = torch.allclose(fast, wq_triton.wq_matmul(x, w, None, counters, use_asm=False).float(),
                                rtol=1e-2, atol=1e-2)
        except Exception as exc:
            ok = False
            log(f"asm path failed: {type(exc).__name__}: {str(exc)[:300]}")
        if not ok:
            wq_triton.USE_ASM = False
            log(f"asm path disagrees with the plain path ({bits}-bit): benchmarking the plain path")
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="gemv,kernels,e2e",
                    help="comma-separated: gemv (launch settings and crossover of the decode GEMV), kernels, e2e, "
                         "sweep=SPEC.json, profile")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", help="kernel rows for these NxK shapes only (comma-separated)")
    ap.add_argument("--ms", help="kernel rows for these M only (comma-separated)")
    ap.add_argument("--methods", help="kernel rows for these methods only (comma-separated; bf16 always runs)")
    ap.add_argument("--e2e-kinds", default=",".join(E2E_KINDS), help="formats of the end-to-end part")
    ap.add_argument("--e2e-batches", default="1,16", help="batch sizes of the end-to-end part")
    ap.add_argument("--keep-from", type=Path,
                    help="an earlier kernels.json: its rows for what this run does not measure are kept, marked")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "kernels.log", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    props = torch.cuda.get_device_properties(0)
    copy_gbps, tflops = copy_bandwidth(), matmul_tflops()
    log(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    check_asm(log)
    rows = []
    result_path = args.out / "kernels.json"

    def save() -> None:
        protocol = {"timing": "CUDA graph over weight copies beyond L2, median of replays",
                    "rotation_bytes": ROTATION_BYTES, "l2_bytes": props.L2_cache_size,
                    "sms": props.multi_processor_count, "copy_gbps": copy_gbps, "bf16_matmul_tflops": tflops,
                    "torch": torch.__version__, "asm": wq_triton.USE_ASM, "triton": __import__("triton").__version__,
                    "gemv": {"cupy": wq_gemv.available(), "max_m": quant_linear.GEMV_MAX_M,
                             "launch": wq_gemv.LAUNCH}}
        if args.keep_from:
            protocol["carried_from"] = args.keep_from.name
        carried = carried_rows(args.keep_from, rows) if args.keep_from else []
        write_results("kernels", rows + carried, protocol, {"device": torch.cuda.get_device_name()}, path=result_path)

    for part in args.parts.split(","):
        if part.startswith("sweep="):
            rows += sweep_rows(copy_gbps, log, json.loads(Path(part[len("sweep="):]).read_text()))
        elif part == "gemv":
            if wq_gemv.available():
                rows += gemv_rows(copy_gbps, log)
            else:
                log("CuPy is not installed: no decode GEMV, the Triton GEMM runs every M")
        elif part == "kernels":
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
            ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
            kernel_rows(copy_gbps, log, rows, save, shapes, ms, args.methods.split(",") if args.methods else None)
        elif part == "profile":  # a decode launch for ncu: 4-bit g128, 14336x4096, M=1
            g = torch.Generator(device="cuda").manual_seed(2)
            ops, _ = build_copies(lambda: weight_only_op(14336, 4096, 4, 128, g))
            x = torch.randn(1, 4096, generator=g, device="cuda").to(torch.bfloat16)
            for _ in range(5):
                for op in ops:
                    op(x)
            torch.cuda.synchronize()
        elif part == "e2e":
            rows += end_to_end_rows(log, args.layers, [int(b) for b in args.e2e_batches.split(",")],
                                    kinds=args.e2e_kinds.split(","))
        save()


if __name__ == "__main__":
    main()
