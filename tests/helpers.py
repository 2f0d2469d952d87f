"""Helpers shared by the CLI tests."""

from __future__ import annotations

from typer.testing import CliRunner

from compressor.cli import app


def cli(*args):
    """Run `compress ARGS` in-process; returns typer's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])
