"""Fuzzing every reader of untrusted files: mutations of real small files, in-process.

A reader is one entry of `READERS`: the real files it reads (seeds, written by the product
itself in a scratch directory), which of them a mutation replaces, and the call that reads
them. Inputs are the seeds with random byte-level edits (bit flips, interesting integers over
length and count fields, truncation, insertion, deletion, splicing) and, for files that hold
JSON or YAML, structure-aware edits (a value replaced by a huge count, a negative number, a
path, a deep nesting, a wrong type). Every input must end in the reader's result or our one-line
`CompressorError`: anything else is a crash, an input that runs past `timeout_s` is a hang.

Inputs run in a worker process with an address-space limit (`memory_mb` above what the worker
holds at start), so a forged size or count that makes a reader allocate without bound fails
as a MemoryError (counted as a crash) rather than taking the machine down; a worker that dies
is restarted, and the input that killed it is kept. The worker reads one input after another
(no process per input) under a per-input timer (SIGALRM), and measures each input's peak memory:
the peak resident size is reset before the input (/proc/self/clear_refs) and read after it, and
the growth is compared with the size of the files the reader was given.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


class Hang(Exception):
    pass


@dataclass
class Reader:
    """A reader under test: `seed(dir)` writes real files into dir and returns the one that
    mutations replace (relative to dir); `read(dir)` reads them the way the product does."""
    name: str
    seed: Callable[[Path], str]
    read: Callable[[Path], object]
    structured: str = ""  # "json", "yaml", "safetensors" (the JSON header) or "": which structured edits apply


# ---------------------------------------------------------------- seeds (real files, written by the product)

def _tiny_model(scratch: Path) -> Path:
    model = scratch / "model"
    if not model.is_dir():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_llama

        make_llama(model, layers=1, hidden=32, intermediate=64)
    return model


def _quantized(scratch: Path) -> Path:
    out = scratch / "w4"
    if not out.is_dir():
        from compressor import api

        api.quantize(str(_tiny_model(scratch)), "rtn", out, {"bits": 4, "group_size": 16}, samples=4, seq_len=32)
    return out


def _packed(scratch: Path) -> Path:
    out = scratch / "packed"
    if not out.is_dir():
        from compressor import api

        api.pack(_tiny_model(scratch), out)
    return out


def _checkpoint(scratch: Path) -> Path:
    """A run directory as a killed run leaves it: the state, two finished blocks, the next inputs."""
    import torch

    from compressor.pipeline.checkpoint import RunDirectory

    run = scratch / "run"
    if not run.is_dir():
        torch.manual_seed(0)
        rd = RunDirectory(run, "fingerprint", 3)
        rd.start()
        for i in range(2):
            rd.save_inputs(i + 1, torch.randn(2, 4, 8))
            rd.save_block(i, {"w": torch.randn(8, 8)}, {"lin": {"scale": torch.randn(8)}}, {"i": i},
                          [{"t": torch.randn(3), "n": i}])
    return run


def _gguf(scratch: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    path = scratch / "gguf" / "model.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        w = GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_string("general.name", "tiny")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        w.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
        rng = np.random.default_rng(0)
        w.add_tensor("token_embd.weight", rng.standard_normal((3, 8)).astype(np.float32))
        w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _copy_into(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def _seed_safetensors(d: Path) -> str:
    shutil.copy(_checkpoint(d.parent.parent / "scratch") / "block-0000.safetensors", d / "x.safetensors")
    return "x.safetensors"


def _seed_copy(make: Callable[[Path], Path], into: str, target: str | None = None):
    """A seed: the directory `make` writes (made once, in the shared scratch) copied to `into`; a
    mutation replaces `into/target` (default: its packed file)."""
    def seed(d: Path) -> str:
        _copy_into(make(d.parent.parent / "scratch"), d / into)
        name = target or next(f.name for f in (d / into).iterdir() if f.name.endswith(".packed.safetensors"))
        return f"{into}/{name}"

    return seed


def _seed_recipe(d: Path) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from faults import RECIPE

    (d / "r.yaml").write_text(RECIPE)
    return "r.yaml"


def _seed_gguf(d: Path) -> str:
    shutil.copy(_gguf(d.parent.parent / "scratch"), d / "m.gguf")
    return "m.gguf"


# ---------------------------------------------------------------- the calls

def _read_safetensors(d: Path):
    from compressor.safetensors_file import read_header, read_tensors

    read_header(d / "x.safetensors")
    return read_tensors(d / "x.safetensors")


def _read_manifest(d: Path):
    from compressor.formats import manifest

    return manifest.check(d / "a")


def _read_ct(d: Path):
    import torch

    from compressor.formats import artifact

    return artifact.load_quantized_state(d / "a", torch.float32)


def _read_packed(d: Path):
    from compressor.formats import packed

    out = []
    for f in sorted((d / "p").glob("*.packed.safetensors")):
        out.append(packed.decode_file(f))
    return out


def _read_checkpoint(d: Path):
    from compressor.pipeline.checkpoint import RunDirectory

    run = RunDirectory(d / "run", "fingerprint", 3)
    done = run.resume_point(run.completed(), needs_inputs=True)
    return [run.load_block(i) for i in range(done)], run.load_carry(done - 1) if done else None


def _read_recipe(d: Path):
    from compressor.recipes import load_recipe

    return load_recipe(d / "r.yaml")


def _read_gguf(d: Path):
    """Our structure check, then the gguf library's reader (what transformers reads it with)."""
    from gguf import GGUFReader

    from compressor.models.gguf_file import check_gguf

    check_gguf(d / "m.gguf")
    reader = GGUFReader(d / "m.gguf")
    return len(reader.tensors), len(reader.fields)


READERS: dict[str, Reader] = {r.name: r for r in [
    Reader("safetensors", _seed_safetensors, _read_safetensors, "safetensors"),
    Reader("manifest", _seed_copy(_quantized, "a", "manifest.json"), _read_manifest, "json"),
    Reader("compressed-tensors", _seed_copy(_quantized, "a", "config.json"), _read_ct, "json"),
    Reader("compressed-tensors-weights", _seed_copy(_quantized, "a", "model.safetensors"), _read_ct, "safetensors"),
    Reader("packed", _seed_copy(_packed, "p"), _read_packed, "safetensors"),
    Reader("checkpoint", _seed_copy(_checkpoint, "run", "block-0001.safetensors"), _read_checkpoint, "safetensors"),
    Reader("checkpoint-state", _seed_copy(_checkpoint, "run", "run.json"), _read_checkpoint, "json"),
    Reader("recipe", _seed_recipe, _read_recipe, "yaml"),
    Reader("gguf", _seed_gguf, _read_gguf),
]}


# ---------------------------------------------------------------- mutations

INTERESTING = [0, 1, -1, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 63 - 1, 2 ** 64 - 1, 10 ** 12, 255, 256,
               65535, 1 << 40]
VALUES = [None, True, 0, -1, 2 ** 63, 10 ** 30, 1e308, float("nan"), "", "../../x", "/etc/passwd", "x" * 300, [],
          {}, [[[[[[[[[[]]]]]]]]]], {"a": {"b": {"c": []}}}, "F64", "I8", [2 ** 40, 2 ** 40], [0, 2 ** 62],
          [-1, 3], "NaN", "${HOME}", "!!python/object/apply:os.system ['true']"]


def mutate_bytes(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(9)
        n = len(b)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            b[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("]"), ord("9")))
        elif op == 2 and n >= 8:  # an interesting 8- or 4-byte integer (lengths, counts, offsets)
            i = rng.randrange(n - 7)
            if rng.random() < 0.5:
                b[i:i + 8] = struct.pack("<Q", rng.choice(INTERESTING) % 2 ** 64)
            else:
                b[i:i + 4] = struct.pack("<I", rng.choice(INTERESTING) % 2 ** 32)
        elif op == 3:  # truncate
            del b[rng.randrange(n + 1):]
        elif op == 4 and n:  # delete a range
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif op == 5:  # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == 6 and n:  # duplicate a chunk
            i = rng.randrange(n)
            chunk = b[i:i + rng.randint(1, 256)]
            j = rng.randrange(n + 1)
            b[j:j] = chunk
        elif op == 7 and pool:  # splice with another input
            other = rng.choice(pool)
            i, j = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif op == 8 and n >= 8:  # the first 8 bytes (a length prefix, a magic) interesting
            b[0:8] = struct.pack("<Q", rng.choice(INTERESTING) % 2 ** 64)
    return bytes(b)


def _mutate_tree(node, rng: random.Random, depth: int = 0):
    """A copy of a JSON-like tree with one node replaced (or a key added, dropped or renamed)."""
    if isinstance(node, dict) and node and depth < 12 and rng.random() < 0.75:
        key = rng.choice(list(node))
        out = dict(node)
        r = rng.random()
        if r < 0.08:
            del out[key]
        elif r < 0.14:
            out[rng.choice(["../evil", "__metadata__", "zzz", "", "a/b"])] = rng.choice(VALUES)
        elif r < 0.2:
            out[key + rng.choice(["x", "/..", "\x00"])] = out.pop(key)
        else:
            out[key] = _mutate_tree(node[key], rng, depth + 1)
        return out
    if isinstance(node, list) and node and depth < 12 and rng.random() < 0.75:
        out = list(node)
        i = rng.randrange(len(out))
        out[i] = _mutate_tree(out[i], rng, depth + 1)
        return out
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.6:
        return rng.choice([node + 1, node - 1, -node, node * 2 ** rng.randint(1, 40), rng.choice(INTERESTING)])
    if isinstance(node, str) and rng.random() < 0.5:
        try:
            inner = json.loads(node)  # JSON inside a string (safetensors metadata)
            if isinstance(inner, (dict, list)):
                return json.dumps(_mutate_tree(inner, rng, depth + 1))
        except ValueError:
            pass
    return rng.choice(VALUES)


def mutate_structured(data: bytes, kind: str, rng: random.Random) -> bytes | None:
    try:
        if kind == "json":
            return json.dumps(_mutate_tree(json.loads(data), rng), allow_nan=True).encode()
        if kind == "yaml":
            import yaml

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
            out = yaml.dump(_mutate_tree(yaml.load(data, Loader=loader), rng), Dumper=dumper, allow_unicode=True)
            return out.encode()
        if kind == "safetensors":
            (n,) = struct.unpack("<Q", data[:8])
            header = _mutate_tree(json.loads(data[8:8 + n]), rng)
            raw = json.dumps(header).encode()
            return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    except (ValueError, struct.error, TypeError, RecursionError, OverflowError, UnicodeDecodeError):
        return None
    except Exception:  # yaml's own errors
        return None
    return None


# ---------------------------------------------------------------- the worker

def _alarm(signum, frame):
    raise Hang()


def run_reader(reader: Reader, work: Path, inputs: int, seed: int, timeout_s: float, memory_mb: int,
               seconds: float | None = None, findings: Path | None = None) -> dict:
    """Fuzz `reader` in this process: up to `inputs` inputs (or `seconds`). Returns counts."""

    work = Path(work)
    seeds_dir = work / "seed"
    if not seeds_dir.is_dir():
        seeds_dir.mkdir(parents=True)
    target = reader.seed(seeds_dir)
    original = (seeds_dir / target).read_bytes()
    reader.read(seeds_dir)  # the seed itself reads cleanly
    case = work / "case"
    _copy_into(seeds_dir, case)
    rng = random.Random(seed)
    pool = [original]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_bytes()
    limit = vm + memory_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"inputs": 0, "errors": 0, "ok": 0, "crashes": 0, "hangs": 0, "multiline": 0, "retried": 0}
    memory = Memory(_tree_bytes(seeds_dir) - len(original))
    examples: list[dict] = []
    started = time.perf_counter()
    try:
        for i in range(inputs):
            if seconds is not None and time.perf_counter() - started > seconds:
                break
            data = None
            if reader.structured and rng.random() < 0.5:
                data = mutate_structured(original if rng.random() < 0.7 else rng.choice(pool), reader.structured, rng)
            if data is None:
                data = mutate_bytes(original if rng.random() < 0.7 else rng.choice(pool), rng, pool)
            (case / target).write_bytes(data)
            memory.before()
            outcome, error = _attempt(reader, case, timeout_s)
            memory.after(len(data))
            if outcome == "hangs":  # on a loaded machine a stall is not a hang: once more, given 12x the time
                counts["retried"] += 1
                outcome, error = _attempt(reader, case, 12 * timeout_s)
            counts["inputs"] += 1
            counts[outcome] += 1
            if outcome in ("crashes", "hangs", "multiline") and len(examples) < 20:
                examples.append({"input": i, "outcome": outcome, "error": error[-1500:]})
                if findings is not None:
                    findings.mkdir(parents=True, exist_ok=True)
                    (findings / f"{reader.name}-{seed}-{i}").write_bytes(data)
            if outcome == "ok" and len(pool) < 64 and rng.random() < 0.05:
                pool.append(data)  # inputs that read cleanly breed further inputs
            if i % 997 == 0:
                _copy_into(seeds_dir, case)  # undo whatever a reader may have left
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    counts["wall_s"] = time.perf_counter() - started
    counts["memory"] = memory.summary()
    counts["examples"] = examples
    counts["memory_limit_mb"] = memory_mb
    counts["input_bytes"] = len(original)
    return counts


def _attempt(reader: Reader, case: Path, timeout_s: float) -> tuple[str, str]:
    """(outcome, error) of reading one input under a timeout."""
    from compressor.errors import CompressorError

    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        reader.read(case)
        return "ok", ""
    except CompressorError as exc:
        return ("errors" if "\n" not in str(exc) else "multiline"), str(exc)
    except Hang:
        return "hangs", traceback.format_exc(limit=-4)
    except Exception:  # MemoryError included: a forged size that got past the checks
        return "crashes", traceback.format_exc(limit=-4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# An input may make a reader grow by at most this multiple of the bytes it was given, plus a
# constant for the interpreter's own bookkeeping (parsed JSON objects, small arrays, page granularity).
MEMORY_MULTIPLE, MEMORY_CONSTANT = 8, 8 * 2 ** 20


class Memory:
    """Each input's peak memory growth against the bytes the reader was given (the mutated file
    and the unchanged files beside it)."""

    def __init__(self, other_bytes: int):
        self.other = other_bytes
        self.works = _reset_peak()
        self.rss = 0
        self.peak, self.peak_input, self.over, self.measured = 0, 0, 0, 0

    def before(self) -> None:
        if self.works:
            _trim()  # memory freed by earlier inputs goes back to the system: reusing it would hide growth
            _reset_peak()
            self.rss = _status_kb("VmRSS") * 1024

    def after(self, size: int) -> None:
        if not self.works:
            return
        grown = max(0, _status_kb("VmHWM") * 1024 - self.rss)
        given = size + self.other
        self.measured += 1
        if grown > self.peak:
            self.peak, self.peak_input = grown, given
        self.over += grown > MEMORY_MULTIPLE * given + MEMORY_CONSTANT

    def summary(self) -> dict:
        return {"measured": self.measured, "peak_growth_bytes": self.peak, "input_bytes_at_peak": self.peak_input,
                "growth_per_input_byte_at_peak": round(self.peak / max(self.peak_input, 1), 2), "over_bound": self.over,
                "bound": f"{MEMORY_MULTIPLE} x input bytes + {MEMORY_CONSTANT // 2 ** 20} MiB"}


_LIBC: list = []


def _trim() -> None:
    """glibc's malloc_trim(0): free heap pages back to the system (a no-op elsewhere)."""
    if not _LIBC:
        import ctypes

        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(lambda _pad: 0)
    _LIBC[0](0)


def _reset_peak() -> bool:
    """Reset this process's peak resident size to its current one (Linux 4.0+)."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


_STATUS: list[int] = []  # /proc/self/status kept open: re-read from offset 0 for each input


def _status_kb(field: str) -> int:
    if not _STATUS:
        _STATUS.append(os.open("/proc/self/status", os.O_RDONLY))
    text = os.pread(_STATUS[0], 1 << 16, 0)
    at = text.find(field.encode() + b":")
    return int(text[at + len(field) + 1:text.index(b"\n", at)].split()[0]) if at >= 0 else 0


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main(argv: list[str]) -> None:
    """`python benchmarks/fuzz.py READER WORK INPUTS SEED TIMEOUT MEMORY_MB [SECONDS]`: one JSON line."""
    name, work, inputs, seed, timeout_s, memory_mb = argv[:6]
    seconds = float(argv[6]) if len(argv) > 6 else None
    sys.path.insert(0, str(ROOT))
    result = run_reader(READERS[name], Path(work), int(inputs), int(seed), float(timeout_s), int(memory_mb), seconds,
                        findings=Path(work) / "findings")
    print(json.dumps(result))


def campaign(name: str, work: Path, inputs: int, seconds: float | None = None, seed: int = 0,
             timeout_s: float = 5.0, memory_mb: int = 1024) -> dict:
    """Fuzz one reader in worker processes until `inputs` inputs or `seconds` have run; a worker
    that dies (an interpreter crash) is counted as a crash and a fresh one continues."""
    import subprocess

    total = {"reader": name, "inputs": 0, "errors": 0, "ok": 0, "crashes": 0, "hangs": 0, "multiline": 0,
             "retried": 0, "worker_deaths": 0, "examples": []}
    started = time.perf_counter()
    round_ = 0
    while total["inputs"] < inputs:
        left = None if seconds is None else seconds - (time.perf_counter() - started)
        if left is not None and left <= 0:
            break
        cmd = [sys.executable, __file__, name, str(work), str(inputs - total["inputs"]), str(seed + round_),
               str(timeout_s), str(memory_mb), *([str(left)] if left is not None else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        round_ += 1
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            total["worker_deaths"] += 1
            total["crashes"] += 1
            total["examples"].append({"outcome": "worker died", "code": proc.returncode,
                                      "error": proc.stderr[-1500:]})
            if total["worker_deaths"] > 5:
                break
            continue
        part = json.loads(lines[-1])
        for key in ("inputs", "errors", "ok", "crashes", "hangs", "multiline", "retried"):
            total[key] += part.get(key, 0)
        total["examples"] += part["examples"][:20 - len(total["examples"])]
        total["memory_limit_mb"] = part["memory_limit_mb"]
        total["input_bytes"] = part["input_bytes"]
        total["memory"] = _merge_memory(total.get("memory"), part["memory"])
    total["wall_s"] = time.perf_counter() - started
    return total


def _merge_memory(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    out = dict(a)
    if b["peak_growth_bytes"] > a["peak_growth_bytes"]:
        out["peak_growth_bytes"], out["input_bytes_at_peak"] = b["peak_growth_bytes"], b["input_bytes_at_peak"]
    out["measured"] = a["measured"] + b["measured"]
    out["over_bound"] = a["over_bound"] + b["over_bound"]
    out["growth_per_input_byte_at_peak"] = round(out["peak_growth_bytes"] / max(out["input_bytes_at_peak"], 1), 2)
    return out


if __name__ == "__main__":
    worker_main(sys.argv[1:])
