"""Helpers shared by the tests."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from compressor.cli import app


def cli(*args):
    """Run `compress ARGS` in-process; returns typer's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def compress_command() -> list[str]:
    exe = Path(sys.executable).with_name("compress")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "compressor.cli"]


def run_compress(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*compress_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def error_line(stderr: str) -> str:
    """stderr ends in exactly one line `error: ...` (progress lines of work done before the problem
    showed may precede it, tracebacks may not); returns the message."""
    lines = [ln for ln in ANSI.sub("", stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last, got:\n{stderr}"
    assert errors[0].startswith("error: "), errors[0]
    assert "Traceback" not in stderr
    return errors[0][len("error: "):]


def assert_cli_error(result, *phrases: str) -> str:
    """Exit code 2, nothing on stdout, one `error:` line on stderr containing every phrase."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    message = error_line(result.stderr)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


def snapshot(path: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `path` (or of `path` itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def leftovers(out: Path) -> list[str]:
    """Temporary siblings an artifact write may leave behind (there must be none)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.tmp-")
                  or p.name.startswith(f"{out.name}.old-"))


# The fault is injected here, in the test's own subprocess, never by a hook in production code:
# block `kill_after` is saved, then the process SIGKILLs itself.
_KILLABLE_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
{setup}
from compressor import api
from compressor.pipeline.checkpoint import RunDirectory
kill_after = {kill_after!r}
if kill_after is not None:
    save_block = RunDirectory.save_block
    def save_then_die(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    RunDirectory.save_block = save_then_die
api.{command}(*{args!r}, **{kwargs!r})
"""


def api_in_subprocess(command: str, *args, kill_after: int | None = None, setup: str = "",
                      **kwargs) -> subprocess.CompletedProcess:
    """`api.<command>(*args, **kwargs)` in a fresh process that SIGKILLs itself after saving block
    `kill_after` (paths are passed as strings)."""
    args = tuple(str(a) if isinstance(a, Path) else a for a in args)
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    code = _KILLABLE_SCRIPT.format(tests=str(Path(__file__).parent), setup=setup, kill_after=kill_after,
                                   command=command, args=args, kwargs=kwargs)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def artifact_files(directory: Path) -> dict[str, bytes]:
    """Every file of an artifact except build.json (when and where it was built)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "build.json"}
