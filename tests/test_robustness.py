"""Robustness, the fast subset of benchmarks/robustness.py: kills at random points with resume,
damaged checkpoints, a disk that fills or turns read-only mid-run, two writers of one output,
and fuzzed readers (mutated real files and hypothesis-made headers)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor import api
from compressor.errors import CompressorError
from helpers import api_in_subprocess, artifact_files, assert_cli_error, cli, leftovers, snapshot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz  # noqa: E402

GPTQ = {"bits": 4, "group_size": 32}
CALIB = {"samples": 4, "seq_len": 32}


# ---------------------------------------------------------------- kills at random points

def test_random_kills_lose_nothing_and_resume_byte_identical(tmp_path):
    # In a fresh process: the campaign forks its runs from a parent that has done no torch work.
    code = ("import json, faults; print(json.dumps(faults.campaign("
            f"{str(tmp_path / 'ws')!r}, ['rtn', 'pack'], kills_per_trial=2, trials=2, seed=1, layers=2)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    for row in result["rows"]:
        assert row["problems"] == [] and row["lost"] == 0, row
        assert row["recovered"] == row["runs"], row
    assert sum(row["runs"] for row in result["rows"]) >= 1  # at least one kill landed in the work


# ---------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def killed_gptq(tiny_llama, text_file, tmp_path_factory) -> dict:
    """A GPTQ run SIGKILLed after its second block (its run directory kept aside), and the
    artifact of the same run uninterrupted."""
    root = tmp_path_factory.mktemp("killed")
    clean = root / "clean"
    api.quantize(str(tiny_llama), "gptq", clean, GPTQ, calib=str(text_file), **CALIB)
    out = root / "q"
    killed = api_in_subprocess("quantize", str(tiny_llama), "gptq", out, GPTQ, calib=str(text_file), kill_after=1,
                               **CALIB)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return {"run": api.run_directory_for(out), "clean": artifact_files(clean)}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["block-data", "inputs", "state", "missing-block"])
def test_damaged_checkpoint_is_detected_and_the_run_recomputed(damage, killed_gptq, tiny_llama, text_file, tmp_path):
    out = tmp_path / "q"
    run = api.run_directory_for(out)
    shutil.copytree(killed_gptq["run"], run)
    block = run / "block-0000.safetensors"
    if damage == "block-data":
        _flip(block, block.stat().st_size - 3)  # a tensor's bytes: the header still parses
    elif damage == "inputs":
        f = run / "inputs-0002.safetensors"
        _flip(f, f.stat().st_size - 5)
    elif damage == "state":
        (run / "run.json").write_text("{not json")
    else:
        block.unlink()
    from compressor.progress import Progress

    warnings = []

    class Recording(Progress):
        def warn(self, message):
            warnings.append(message)

    api.quantize(str(tiny_llama), "gptq", out, GPTQ, calib=str(text_file), resume=True, progress=Recording(), **CALIB)
    assert any("recomputing from the first block" in w for w in warnings), warnings
    assert artifact_files(out) == killed_gptq["clean"]
    assert not run.exists()


def test_intact_checkpoints_resume_without_recomputing(killed_gptq, tiny_llama, text_file, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(killed_gptq["run"], api.run_directory_for(out))
    from compressor.progress import Progress

    logged = []

    class Recording(Progress):
        def log(self, message):
            logged.append(message)

        def warn(self, message):
            raise AssertionError(message)

    api.quantize(str(tiny_llama), "gptq", out, GPTQ, calib=str(text_file), resume=True, progress=Recording(), **CALIB)
    assert any("resuming after block 2/3" in m for m in logged), logged
    assert artifact_files(out) == killed_gptq["clean"]


# ---------------------------------------------------------------- two writers, one output

def test_second_writer_of_an_output_is_refused(tiny_llama, tmp_path):
    out = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from compressor.outputs import output_lock\n"
        f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("quantize", tiny_llama, "-o", out, "--group-size", "32")
        assert_cli_error(result, f"{out} is being written by another compress process (pid {holder.pid})",
                         "wait for it to finish")
        assert not out.exists() and leftovers(out) == []
    finally:
        holder.kill()
        holder.wait()
    assert cli("quantize", tiny_llama, "-o", out, "--group-size", "32").exit_code == 0  # the lock died with it


def test_lock_is_reentrant_within_a_process_and_released(tmp_path):
    from compressor.outputs import lock_path, output_lock

    out = tmp_path / "x"
    with output_lock(out):
        with output_lock(out):  # a recipe's stage inside the recipe's own lock
            pass
    with output_lock(out):
        assert lock_path(out).read_text() == str(os.getpid())
    assert lock_path(out).read_text() == ""


# ---------------------------------------------------------------- the disk fills or turns read-only mid-run

@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("no permission to mount a small tmpfs here")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _when_running(run: Path, act, done: threading.Event) -> None:
    """Call `act` once the run directory has its first block (a watcher beside the command)."""
    while not done.is_set():
        if (run / "block-0000.safetensors").is_file():
            act()
            return
        time.sleep(0.005)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_disk_full_or_read_only_mid_run_is_one_line_and_loses_nothing(fault, small_disk, tiny_llama, text_file):
    previous = small_disk / "q"
    api.quantize(str(tiny_llama), "rtn", previous, {"group_size": 32})
    before = snapshot(previous)
    args = ["quantize", tiny_llama, "-o", previous, "-m", "gptq", "--group-size", "32", "--calib", text_file,
            "--samples", "16", "--seq-len", "64", "--overwrite"]
    injected = []

    def fill():
        with open(small_disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                injected.append("full")

    def read_only():
        for _ in range(2000):
            if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode == 0:
                injected.append("read-only")
                return
            time.sleep(0.005)

    done = threading.Event()
    watcher = threading.Thread(target=_when_running, args=(api.run_directory_for(previous),
                                                          fill if fault == "full" else read_only, done))
    watcher.start()
    try:
        result = cli(*args)
    finally:
        done.set()
        watcher.join()
    if not injected:
        pytest.skip("the run finished before the fault could be injected")
    assert_cli_error(result, "no space left on the device" if fault == "full" else "read-only")
    assert snapshot(previous) == before  # the previous artifact is intact
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    else:
        (small_disk / "filler").unlink()
    resumed = cli(*args, "--resume")  # room again: the run continues from its checkpoints
    assert resumed.exit_code == 0, resumed.stderr
    assert leftovers(previous) == [] and cli("verify", previous).exit_code == 0


# ---------------------------------------------------------------- fuzzed readers

@pytest.mark.parametrize("reader", sorted(fuzz.READERS))
def test_fuzzed_reader_fails_only_with_one_line_errors(reader, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    scratch = Path(os.environ.get("ROBUSTNESS_SCRATCH", "/dev/shm" if Path("/dev/shm").is_dir() else tmp_path))
    work = Path(fuzz_root(scratch)) / reader
    counts = fuzz.run_reader(fuzz.READERS[reader], work, inputs=150, seed=3, timeout_s=10.0, memory_mb=1024)
    assert counts["inputs"] == 150
    assert counts["crashes"] == counts["hangs"] == counts["multiline"] == 0, counts["examples"][:3]
    memory = counts["memory"]  # every input's peak growth, against the bytes the reader was given
    assert memory["measured"] in (0, 150) and memory["over_bound"] == 0, memory


def test_memory_per_input_sees_an_allocation_and_its_size():
    """The fuzzer's per-input memory measure catches what a reader allocates (and not what came before)."""
    memory = fuzz.Memory(other_bytes=0)
    if not memory.works:
        pytest.skip("no /proc/self/clear_refs here")
    block = bytearray(64 * 2 ** 20)  # allocated before the input: not the input's
    memory.before()
    grown = bytearray(32 * 2 ** 20)
    memory.after(1000)
    del block, grown
    summary = memory.summary()
    assert 30 * 2 ** 20 < summary["peak_growth_bytes"] < 40 * 2 ** 20, summary
    assert summary["over_bound"] == 1 and summary["input_bytes_at_peak"] == 1000


_FUZZ_ROOT: list[str] = []


def fuzz_root(base: Path) -> str:
    """One scratch directory per test session (the seed files are made once)."""
    if not _FUZZ_ROOT:
        import tempfile

        _FUZZ_ROOT.append(tempfile.mkdtemp(prefix="compressor-fuzz-", dir=base))
    return _FUZZ_ROOT[0]


@pytest.fixture(scope="module", autouse=True)
def _remove_fuzz_root():
    yield
    if _FUZZ_ROOT:
        shutil.rmtree(_FUZZ_ROOT.pop(), ignore_errors=True)


_DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "X9", 7]
_COUNT = st.one_of(st.integers(0, 64), st.sampled_from([2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 64]),
                   st.integers(-5, -1))
_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(_DTYPES), "shape": st.lists(_COUNT, max_size=5),
                                "data_offsets": st.lists(_COUNT, min_size=0, max_size=3)})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=st.dictionaries(st.text(max_size=8), _ENTRY, max_size=4), tail=st.binary(max_size=300),
       declared=st.one_of(st.none(), _COUNT))
def test_hypothesis_safetensors_headers(header, tail, declared, tmp_path_factory):
    from compressor.safetensors_file import read_header, read_tensors

    raw = json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    path = tmp_path_factory.getbasetemp() / "h.safetensors"
    path.write_bytes(struct.pack("<Q", n % 2 ** 64) + raw + tail)
    try:
        read_header(path)
        read_tensors(path)
    except CompressorError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(counts=st.lists(_COUNT, min_size=3, max_size=3), body=st.binary(max_size=400),
       version=st.sampled_from([1, 2, 3, 2 ** 31]))
def test_hypothesis_gguf_headers(counts, body, version, tmp_path_factory):
    from compressor.models.gguf_file import check_gguf

    path = tmp_path_factory.getbasetemp() / "h.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, counts[0] % 2 ** 64, counts[1] % 2 ** 64) + body)
    try:
        check_gguf(path)
    except CompressorError as exc:
        assert "\n" not in str(exc)


def test_gguf_with_forged_counts_is_refused_before_the_library_reads_it(tmp_path):
    from compressor.models.gguf_file import check_gguf

    seed = tmp_path / "seed"
    seed.mkdir()
    good = seed / fuzz._seed_gguf(seed)
    assert check_gguf(good)["tensors"] == 2
    data = bytearray(good.read_bytes())
    for offset, what in ((8, "tensor count"), (16, "metadata count")):
        forged = bytearray(data)
        forged[offset:offset + 8] = struct.pack("<Q", 2 ** 62)
        bad = tmp_path / f"forged-{offset}.gguf"
        bad.write_bytes(bytes(forged))
        with pytest.raises(CompressorError, match=f"{what} .* is more than the file can hold"):
            check_gguf(bad)


# ---------------------------------------------------------------- what the fuzzers found (regressions)

@pytest.fixture(scope="module")
def small_artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    api.quantize(str(tiny_llama), "rtn", root / "w4", {"group_size": 32})
    api.pack(tiny_llama, root / "packed")
    return {"w4": root / "w4", "packed": root / "packed"}


@pytest.mark.parametrize("config", [b'{"a": "\xff\xfe"}', b"[1, 2]", b'"text"', b"[" * 100000,
                                    b'{"quantization_config": [1]}', b'{"model_type": "llama"}',
                                    b'{"quantization_config": {"quant_method": "compressed-tensors", '
                                    b'"format": ["pack-quantized"]}}',
                                    b'{"quantization_config": {"quant_method": "compressed-tensors", '
                                    b'"format": "pack-quantized", "config_groups": {"g": {"weights": 3}}}}'],
                         ids=["utf8", "list", "string", "deep", "qconfig-list", "no-qconfig", "format-list", "weights"])
def test_damaged_compressed_tensors_config_is_one_line(config, small_artifacts, tmp_path):
    import torch

    from compressor.formats import artifact

    a = tmp_path / "a"
    shutil.copytree(small_artifacts["w4"], a)
    (a / "config.json").write_bytes(config)
    with pytest.raises(CompressorError) as info:
        artifact.load_quantized_state(a, torch.float32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tensors", ["[1]", "3.5", '{"x": [1]}', "{", '{"x": 1}'])
def test_damaged_packing_metadata_is_one_line(tensors, small_artifacts, tmp_path):
    from compressor.formats import packed
    from compressor.safetensors_file import read_header, read_tensors, write_tensors

    f = next(small_artifacts["packed"].glob("*.packed.safetensors"))
    _, metadata = read_header(f)
    bad = tmp_path / f.name
    write_tensors(bad, read_tensors(f), {**metadata, "tensors": tensors})
    with pytest.raises(CompressorError, match="damaged packing metadata|is missing"):
        packed.decode_file(bad)


@pytest.mark.parametrize("text, phrase", [(b"name: x\xff\nstages: []\n", "not UTF-8"),
                                          (b"a: &x [1]\nb: *x\n", "aliases"),
                                          (b"[" * 5000 + b"]" * 5000, "nested too deeply|not valid YAML"),
                                          (b"stages: " + b"[" * 65 + b"]" * 65, r"nested too deeply \(more than 64"),
                                          (b"x: " + b"a" * (2 << 20), "more than a recipe can need")],
                         ids=["utf8", "alias", "deep", "deeper-than-a-recipe", "huge"])
def test_damaged_recipe_is_one_line(text, phrase, tmp_path):
    from compressor.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    with pytest.raises(CompressorError, match=phrase) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_gguf_with_an_empty_dimension_beside_a_huge_one_is_refused(tmp_path):
    """Found by the fuzzer: dims [2**63 + 8, 0] hold no bytes, so the sizes check out, but no array
    can have that shape (the gguf library failed with numpy's ValueError)."""
    from compressor.models.gguf_file import check_gguf

    seed = tmp_path / "seed"
    seed.mkdir()
    data = bytearray((seed / fuzz._seed_gguf(seed)).read_bytes())
    name = b"token_embd.weight"
    dims = data.index(name) + len(name) + 4  # after the name: n_dims (u32), then the dims (u64 each)
    data[dims:dims + 16] = struct.pack("<QQ", 2 ** 63 + 8, 0)
    bad = tmp_path / "empty-dim.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CompressorError, match="has an empty dimension"):
        check_gguf(bad)
