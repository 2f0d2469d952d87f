"""Security and data-loss regressions (issue 10): crafted artifacts never write outside the output
or pass verification, outputs never delete the source or files we did not write, tampered
artifacts are errors rather than wrong numbers, problems show before the work, and every failure
is one line with exit code 2. Crafted files are built here, in the tests; there are no fixtures
on disk."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.formats.manifest import build_manifest, write_manifest
from compressor.outputs import check_output, clean_stale_temporaries, safe_name
from compressor.safetensors_file import read_header, read_tensors, write_tensors
from helpers import assert_cli_error, cli, compress_command, error_line, leftovers, run_compress, snapshot

RTN = ["--method", "rtn", "--group-size", "32"]


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "q"
    api.quantize(str(tiny_llama), "rtn", out, {"bits": 4, "group_size": 32})
    return out


@pytest.fixture(scope="module")
def packed(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "p"
    assert cli("pack", tiny_llama, "-o", out, "--lanes", "8", "--steps", "32").exit_code == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reseal(directory: Path) -> None:
    """Rewrite the manifest over the directory as it is now, as an attacker who controls it can."""
    old = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, build_manifest(directory, kind=old["kind"], source=old["source"],
                                             method=old["method"], calibration=old["calibration"],
                                             metrics=old["metrics"]))


def _set_source_file(packed_dir: Path, name: str) -> None:
    f = packed_dir / "model.packed.safetensors"
    _, metadata = read_header(f)
    tensors = read_tensors(f)
    write_tensors(f, tensors, {**metadata, "source_file": name})
    _reseal(packed_dir)


# ---------------------------------------------------------------- 1. crafted packed artifacts


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_unpack_never_writes_outside_the_output(kind, packed, tmp_path):
    crafted = _copy(packed, tmp_path / "crafted")
    victim = tmp_path / "victim" / "evil.safetensors"
    victim.parent.mkdir()
    name = "../victim/evil.safetensors" if kind == "relative" else str(victim)
    _set_source_file(crafted, name)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    assert_cli_error(cli("unpack", crafted, "-o", out), "source file", "crafted")
    assert not victim.exists() and not out.exists() and list(victim.parent.iterdir()) == []
    assert leftovers(out) == []
    assert_cli_error(cli("verify", crafted), "crafted")


def test_unpacked_file_name_comes_from_the_packed_file_name(packed, tmp_path):
    assert cli("unpack", packed, "-o", tmp_path / "u").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "u").glob("*.safetensors")) == ["model.safetensors"]
    assert cli("verify", tmp_path / "u").exit_code == 0  # the rebuilt directory is an artifact too


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "a\\b", "x\x00y"])
def test_safe_name_refuses_paths(name):
    with pytest.raises(CompressorError, match="unsafe"):
        safe_name(name)


def test_manifest_entries_outside_the_artifact_are_refused_not_followed(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = "0" * 64
    manifest["files"]["/etc/hostname"] = "0" * 64
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    message = assert_cli_error(cli("verify", crafted), "unsafe path")
    assert "../outside.txt" in message or "/etc/hostname" in message
    with pytest.raises(CompressorError, match="unsafe path"):
        api.load(crafted)


# ---------------------------------------------------------------- 2. outputs that would lose data


def test_overwrite_of_a_directory_holding_the_source_is_refused(tiny_llama, tmp_path):
    parent = tmp_path / "parent"
    source = _copy(tiny_llama, parent / "tiny")
    (parent / "notes.txt").write_text("x")
    before = snapshot(parent)
    assert_cli_error(cli("quantize", source, "-o", parent, "--overwrite", *RTN), "contains the source")
    assert snapshot(parent) == before


@pytest.mark.parametrize("where, phrase", [("same", "is the source"), ("inside", "lies inside the source")])
def test_output_that_is_or_lies_inside_the_source_is_refused(where, phrase, tiny_llama, tmp_path):
    source = _copy(tiny_llama, tmp_path / "tiny")
    before = snapshot(source)
    out = source if where == "same" else source / "q"
    assert_cli_error(cli("quantize", source, "-o", out, "--overwrite", *RTN), phrase)
    assert snapshot(source) == before


@pytest.mark.parametrize("out", [".", "..", "./", "sub/.."])
def test_dot_outputs_are_refused_before_any_work(out, tiny_llama, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "sub").mkdir()
    before = snapshot(tmp_path)
    result = run_compress("quantize", tiny_llama, "-o", out, "--overwrite", *RTN, cwd=work)
    assert result.returncode == 2, result.stderr
    assert "'.' or '..'" in error_line(result.stderr)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "sub"]


def test_output_containing_the_current_directory_is_refused(tiny_llama, tmp_path):
    work = tmp_path / "w" / "inner"
    work.mkdir(parents=True)
    result = run_compress("quantize", tiny_llama, "-o", tmp_path / "w", "--overwrite", *RTN, cwd=work)
    assert result.returncode == 2
    assert "current directory" in error_line(result.stderr)
    assert work.is_dir()


def test_pack_and_unpack_refuse_outputs_over_their_source(packed, tiny_llama, tmp_path):
    source = _copy(tiny_llama, tmp_path / "m")
    assert_cli_error(cli("pack", source, "-o", source / "p"), "lies inside the source")
    p = _copy(packed, tmp_path / "p")
    before = snapshot(p)
    assert_cli_error(cli("unpack", p, "-o", p, "--overwrite"), "is the source")
    assert snapshot(p) == before


# ---------------------------------------------------------------- 3. verify covers headers and the file list


def _retype_first(path: Path, suffix: str, old: str, new: str) -> str:
    """Change one tensor's dtype code in the header, in place (same length, so offsets stay)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k.endswith(suffix) and v["dtype"] == old)
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    return name


def test_header_dtype_edit_fails_verify_and_load(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    _retype_first(crafted / "model.safetensors", "weight_scale", "F16", "I16")
    assert_cli_error(cli("verify", crafted), "header of model.safetensors changed")
    assert_cli_error(cli("eval", crafted, "--windows", "2", "--window-len", "16"), "failed verification")
    with pytest.raises(CompressorError, match="failed verification"):
        api.load(crafted)


def test_extra_and_missing_files_fail_verify(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    (crafted / "modeling_evil.py").write_text("import os\n")
    assert_cli_error(cli("verify", crafted), "unexpected file modeling_evil.py")
    (crafted / "modeling_evil.py").unlink()
    (crafted / "sub").mkdir()
    assert_cli_error(cli("verify", crafted), "unexpected directory sub")
    (crafted / "sub").rmdir()
    (crafted / "tokenizer.json").unlink()
    assert_cli_error(cli("verify", crafted), "missing file tokenizer.json")


def test_symlink_in_an_artifact_fails_verify(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    target = tmp_path / "elsewhere.json"
    shutil.move(crafted / "tokenizer.json", target)
    (crafted / "tokenizer.json").symlink_to(target)
    assert_cli_error(cli("verify", crafted), "symbolic link")


def test_tampered_artifact_loads_only_with_no_verify(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    (crafted / "stray.txt").write_text("x")
    assert_cli_error(cli("eval", crafted, "--windows", "2", "--window-len", "16"), "unexpected file stray.txt",
                     "--no-verify")
    loaded, intact = api.load(crafted, verify=False).model.state_dict(), api.load(artifact).model.state_dict()
    assert loaded.keys() == intact.keys() and all(torch.equal(loaded[k], intact[k]) for k in intact)


def test_old_manifest_format_is_named(artifact, tmp_path):
    crafted = _copy(artifact, tmp_path / "crafted")
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest.pop("headers")
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    assert_cli_error(cli("verify", crafted), "manifest format 1", "rebuild")


# ---------------------------------------------------------------- 4. failures before the work


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nothing can be created in, even by root (a read-only tmpfs where we may mount)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs: cannot make a read-only directory")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB file system, smaller than any artifact of the tiny model."""
    path = tmp_path / "tiny-disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("no permission to mount a small tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


def _no_work(monkeypatch):
    """Fail the test if calibration or evaluation starts."""
    import compressor.evaluation.perplexity as perplexity

    def started(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(api, "calibration_set", started)
    monkeypatch.setattr(perplexity, "evaluate_models", started)


@pytest.mark.parametrize("command", [["quantize", *RTN], ["prune", "--sparsity", "0.25"]])
def test_read_only_output_is_refused_before_any_work(command, readonly_dir, tiny_llama, monkeypatch):
    _no_work(monkeypatch)
    out = readonly_dir / "q"
    assert_cli_error(cli(command[0], tiny_llama, "-o", out, *command[1:]), "cannot write the output")
    assert not out.exists()


def test_eval_report_into_a_read_only_directory_fails_before_evaluating(readonly_dir, tiny_llama, monkeypatch):
    _no_work(monkeypatch)
    assert_cli_error(cli("eval", tiny_llama, "--report", readonly_dir / "r.md"), "cannot write the report")


def test_output_disk_without_room_is_refused_before_any_work(tiny_disk, tiny_llama, monkeypatch):
    _no_work(monkeypatch)
    out = tiny_disk / "q"
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, *RTN), "free but the output needs about")
    assert list(tiny_disk.iterdir()) == []


# ---------------------------------------------------------------- 5. one-line errors, exit 2


@pytest.mark.parametrize("device, phrase", [("cuda", "not available"), ("banana", "unknown device"),
                                            ("cuda:7", "not available"), ("meta", "unsupported device")])
def test_bad_device_is_one_line_and_leaves_no_run_directory(device, phrase, tiny_llama, tmp_path):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "q"
    assert_cli_error(cli("quantize", tiny_llama, "-o", out, "--device", device, *RTN), phrase, "use one of: cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert_cli_error(cli("eval", tiny_llama, "--device", device), phrase)


# `compress eval` runs packed artifacts from their packed weights (tests/test_universal.py).
@pytest.mark.parametrize("command", [["quantize", "-o", "OUT"], ["prune", "-o", "OUT"]])
def test_packed_artifact_where_weights_are_read_names_unpack(command, packed, tmp_path):
    args = [a if a != "OUT" else tmp_path / "o" for a in command]
    assert_cli_error(cli(args[0], packed, *args[1:]), "is a packed (lossless) artifact", "compress unpack")


def _write_raw_header(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
    {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]},
])
def test_malformed_safetensors_headers_are_errors_everywhere(entry, tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path / "m")
    _write_raw_header(model / "model.safetensors", {"x": entry}, b"\0" * 16)
    with pytest.raises(CompressorError, match="corrupted header entry"):
        read_header(model / "model.safetensors")
    assert_cli_error(cli("inspect", model), "corrupted header entry")
    assert_cli_error(cli("quantize", model, "-o", tmp_path / "q", *RTN), "corrupted header entry")


@pytest.mark.parametrize("layout, phrase", [
    ({"a": [0, 8], "b": [4, 12]}, "overlaps"),
    ({"a": [0, 4], "b": [8, 12]}, "leaves a gap"),
    ({"a": [0, 4], "b": [4, 8]}, "bytes after its last tensor"),
])
def test_safetensors_data_must_tile_the_file(layout, phrase, tmp_path):
    path = tmp_path / "x.safetensors"
    header = {k: {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
              for k, (begin, end) in layout.items()}
    _write_raw_header(path, header, b"\0" * 16)
    with pytest.raises(CompressorError, match=phrase):
        read_header(path)


def test_safetensors_metadata_must_be_strings(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw_header(path, {"__metadata__": {"format": ["pt"]}})
    with pytest.raises(CompressorError, match="metadata"):
        read_header(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/compressor-pwned",))


def test_malicious_pickle_with_allow_pickle_is_one_line(tiny_llama, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model / "config.json")
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    Path("/tmp/compressor-pwned").unlink(missing_ok=True)
    result = cli("quantize", model, "-o", tmp_path / "q", "--allow-pickle", *RTN)
    assert_cli_error(result, "refused to load", "weights-only")
    assert not Path("/tmp/compressor-pwned").exists()


def test_debug_adds_the_traceback_and_keeps_exit_code_2(tmp_path):
    result = run_compress("--debug", "inspect", tmp_path / "nope")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: ")
    after = run_compress("inspect", tmp_path / "nope", "--debug")
    assert after.returncode == 2 and "Traceback" in after.stderr


# ---------------------------------------------------------------- 6. leftovers of killed runs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    out = tmp_path / "q"
    dead = _dead_pid()
    stale = tmp_path / f"q.tmp-{dead}-0123abcd"
    live = tmp_path / f"q.tmp-{os.getpid()}-0123abcd"
    unrelated = [tmp_path / "q.tmp-notes", tmp_path / f"other.tmp-{dead}-0123abcd"]
    for d in (stale, live, *unrelated):
        d.mkdir()
        (d / "f").write_text("x")
    assert clean_stale_temporaries(out) == [stale.name]
    assert not stale.exists() and live.exists() and all(d.exists() for d in unrelated)


def test_old_artifact_moved_aside_by_a_killed_writer_is_put_back(artifact, tmp_path):
    out = tmp_path / "q"
    aside = _copy(artifact, tmp_path / f"q.old-{_dead_pid()}-0123abcd")
    before = snapshot(aside)
    check_output(out, overwrite=True)
    assert not aside.exists() and snapshot(out) == before


_KILL_WHILE_WRITING = """
import os, signal, sys
from compressor import api
from compressor.formats import artifact
save = artifact.save_tensors
def save_then_die(directory, tensors, *a, **k):
    save(directory, tensors, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
artifact.save_tensors = save_then_die
api.quantize(sys.argv[1], "rtn", sys.argv[2], {"group_size": 32}, overwrite=True)
"""


def test_kill_while_writing_leaves_old_artifact_and_next_run_cleans_up(artifact, tiny_llama, tmp_path):
    out = _copy(artifact, tmp_path / "q")
    before = snapshot(out)
    killed = subprocess.run([sys.executable, "-c", _KILL_WHILE_WRITING, str(tiny_llama), str(out)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(out) == before
    assert len(leftovers(out)) == 1  # the killed writer's temporary
    result = cli("quantize", tiny_llama, "-o", out, "--overwrite", "--resume", *RTN)
    assert result.exit_code == 0, result.stderr
    assert leftovers(out) == []
    assert cli("verify", out).exit_code == 0


# ---------------------------------------------------------------- 7. supply chain


def test_no_fault_injection_hooks_in_production_code():
    package = Path(api.__file__).parent
    for f in package.rglob("*.py"):
        assert "KILL_AFTER" not in f.read_text(), f


def test_codec_library_that_does_not_match_its_record_is_rebuilt(tmp_path, monkeypatch):
    from compressor.codecs import native

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_STATE", {})
    if native.library() is None:
        pytest.skip(f"no C codec here: {native.status()}")
    library = next((tmp_path / "cache" / "native").rglob("libtans.so"))
    assert (library.parent / "libtans.so.sha256").read_text().strip()
    tampered = library.with_name("tampered")
    tampered.write_bytes(library.read_bytes() + b"tampered")
    tampered.replace(library)  # a new file: the loaded one stays mapped unchanged in this process
    monkeypatch.setattr(native, "_STATE", {})
    assert native.library() is not None
    assert "did not match the sha256 recorded" in native.status()
    assert not library.read_bytes().endswith(b"tampered")


# ---------------------------------------------------------------- 8. a new user's stumbles


def test_quantize_help_lists_methods_and_defaults_conventionally():
    result = subprocess.run([*compress_command(), "quantize", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for method in ("rtn", "gptq", "awq+gptq", "smoothquant", "fp8"):
        assert method in result.stdout
    assert "default 4 " in result.stdout and "default 64 " in result.stdout
    assert "<bool>" not in result.stdout and "{model}" not in result.stdout
    assert "compress quantize [OPTIONS] MODEL" in result.stdout


@pytest.mark.parametrize("flag", ["-q", "--quiet", "--debug"])
def test_global_flags_work_after_the_command(flag, tiny_llama):
    result = run_compress("inspect", tiny_llama, flag)
    assert result.returncode == 0, result.stderr


def test_a_run_says_what_it_loads_before_the_work(tiny_llama, tmp_path):
    result = run_compress("quantize", tiny_llama, "-o", tmp_path / "q", *RTN)
    assert result.returncode == 0, result.stderr
    assert f"loading {tiny_llama}" in result.stderr
