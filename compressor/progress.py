"""Progress reporting for long runs, shared by every layer: a rich bar with ETA, or silence for --quiet/--json."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class Progress:
    """Silent progress; the base for richer ones."""

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        """Warnings reach stderr even under --quiet and --json (which keep stdout for the result)."""
        print(f"warning: {message}", file=sys.stderr)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Progress"]:
        yield self

    def advance(self, steps: int = 1) -> None:
        pass


class RichProgress(Progress):
    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self._bar = None
        self._task = None

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Progress"]:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                 console=self.console, transient=not sys.stderr.isatty()) as bar:
            self._bar, self._task = bar, bar.add_task(description, total=total)
            try:
                yield self
            finally:
                self._bar = self._task = None

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, steps)
