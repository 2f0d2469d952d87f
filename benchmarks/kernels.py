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
from compressor.kernels import quant_linear, splitk, w8_triton, wq_layout, wq_triton  # noqa: E402

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


def weight_only_op(n: int, k: int, bits: int, group: int, g: torch.Generator, use_asm=None):
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g, device="cuda") * 0.01 + 1e-3).half()
    w = wq_layout.repack(codes, scale, None, bits, group)
    counters = torch.zeros(quant_linear.COUNTERS, dtype=torch.int32, device="cuda")
    del codes
    def op(x):
        return wq_triton.wq_matmul(x, w, None, counters, use_asm=use_asm)

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

def operators(n: int, k: int, g: torch.Generator, weight_only=WEIGHT_ONLY) -> list:
    cases = [("torch-int4pack", {"bits": 4, "group_size": gs}, lambda gs=gs: int4pack_op(n, k, gs, g))
             for gs in (64, 128)]
    cases += [(f"w{b}a16", {"bits": b, "group_size": gs}, lambda b=b, gs=gs: weight_only_op(n, k, b, gs, g))
              for b, gs in weight_only]
    cases += [("w8a8", {"bits": 8, "act_bits": 8}, lambda: eight_bit_op(n, k, False, g)),
              ("fp8", {"bits": 8, "act_bits": 8, "backend": "triton"}, lambda: eight_bit_op(n, k, True, g)),
              ("fp8", {"bits": 8, "act_bits": 8, "backend": "scaled_mm"},
               lambda: eight_bit_op(n, k, True, g, scaled_mm=True))]
    return cases


def row(method: str, config: dict, n: int, k: int, m: int, t: float, nbytes: int, base_t: float,
        copy_gbps: float) -> dict:
    moved = nbytes + m * k * 2 + m * n * 2
    return {"method": method, "config": config, "shape": f"{n}x{k}", "m": m, "time_us": t * 1e6,
            "bf16_time_us": base_t * 1e6, "speedup_vs_bf16": base_t / t, "bytes": moved,
            "gbps": moved / t / 1e9, "pct_copy_bw": 100 * moved / t / 1e9 / copy_gbps,
            "tflops": 2 * m * n * k / t / 1e12}


def kernel_rows(copy_gbps: float, log, rows: list, save, shapes=SHAPES, ms=MS) -> None:
    """Appends to `rows`, saving after each shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        ops, nbytes = build_copies(lambda: bf16_op(n, k, g))
        base = {m: time_ops(ops, m, k, g) for m in ms}
        rows += [row("bf16", {"bits": 16}, n, k, m, base[m], nbytes, base[m], copy_gbps) for m in ms]
        del ops
        for method, config, make in operators(n, k, g):
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


def end_to_end_rows(log, layers: int = 32, batches=(1, 16), prompt_len: int = 512, gen_len: int = 64,
                    shape: dict = LLAMA_8B, device: str = "cuda") -> list[dict]:
    from transformers import LlamaConfig

    from compressor.evaluation.speed import measure
    from compressor.formats.quant_runtime import build_quantized_model, kernel_summary
    from compressor.models.loading import build_model

    config = LlamaConfig(num_hidden_layers=layers, **shape)
    rows, base = [], {}
    for kind in ("bf16", "w4a16", "w3a16", "w8a8", "fp8"):
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
    ap.add_argument("--parts", default="kernels,e2e", help="comma-separated: kernels, e2e, sweep=SPEC.json, profile")
    ap.add_argument("--layers", type=int, default=32)
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
                    "torch": torch.__version__, "asm": wq_triton.USE_ASM, "triton": __import__("triton").__version__}
        write_results("kernels", rows, protocol, {"device": torch.cuda.get_device_name()}, path=result_path)

    for part in args.parts.split(","):
        if part.startswith("sweep="):
            rows += sweep_rows(copy_gbps, log, json.loads(Path(part[len("sweep="):]).read_text()))
        elif part == "kernels":
            kernel_rows(copy_gbps, log, rows, save)
        elif part == "profile":  # a decode launch for ncu: 4-bit g128, 14336x4096, M=1
            g = torch.Generator(device="cuda").manual_seed(2)
            ops, _ = build_copies(lambda: weight_only_op(14336, 4096, 4, 128, g))
            x = torch.randn(1, 4096, generator=g, device="cuda").to(torch.bfloat16)
            for _ in range(5):
                for op in ops:
                    op(x)
            torch.cuda.synchronize()
        elif part == "e2e":
            rows += end_to_end_rows(log, args.layers)
        save()


if __name__ == "__main__":
    main()
