"""Progress reporting for long stages, shared by every layer (pipeline, evaluation, formats).

`Progress` is silent (--quiet/--json). On a terminal `RichProgress` draws a bar with ETA;
elsewhere (CI logs, pipes) `LineProgress` prints a plain line per stage every few seconds:
`stage i/N elapsed 12s eta 40s`. `for_terminal()` picks one of the two.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

INTERVAL_ENV = "COMPRESSOR_PROGRESS_INTERVAL"


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

    def detail(self, message: str) -> None:
        """A line for logs only (per-step timings); silent where a bar shows progress."""

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress(Progress):
    """Plain periodic lines for logs: the first step, then at most one line per `interval`
    seconds, and the last step, each `description i/N elapsed Xs eta Ys`."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None,
                 clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.interval = interval if interval is not None else float(os.environ.get(INTERVAL_ENV, "10"))
        self.clock = clock
        self._stack: list[dict] = []

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def log(self, message: str) -> None:
        self._print(message)

    def detail(self, message: str) -> None:
        self._print(message)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Progress"]:
        now = self.clock()
        self._stack.append({"description": description, "total": max(int(total), 0), "done": 0,
                            "started": now, "printed": None, "printed_done": 0})
        try:
            yield self
        finally:
            state = self._stack.pop()
            if state["done"] != state["printed_done"] or state["printed"] is None:
                self._line(state, self.clock())

    def advance(self, steps: int = 1) -> None:
        if not self._stack:
            return
        state = self._stack[-1]
        state["done"] += steps
        now = self.clock()
        if state["printed"] is None or now - state["printed"] >= self.interval or state["done"] >= state["total"]:
            self._line(state, now)

    def _line(self, state: dict, now: float) -> None:
        done, total = state["done"], state["total"]
        elapsed = now - state["started"]
        text = f"{state['description']} {done}/{total} elapsed {_duration(elapsed)}"
        if 0 < done < total:
            text += f" eta {_duration(elapsed / done * (total - done))}"
        elif done >= total:
            text += " done"
        self._print(text)
        state["printed"], state["printed_done"] = now, done


def for_terminal() -> Progress:
    """A rich bar where stderr (where progress goes) is a terminal, plain lines elsewhere."""
    return RichProgress() if sys.stderr.isatty() else LineProgress()
