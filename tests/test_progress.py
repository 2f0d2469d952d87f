"""Progress: plain periodic lines when stderr is not a terminal (CI logs), silence under --quiet."""

from __future__ import annotations

import io
import re

from compressor.progress import LineProgress, Progress, RichProgress, for_terminal


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_line_progress_prints_periodic_lines_with_eta():
    out, clock = io.StringIO(), Clock()
    progress = LineProgress(out, interval=10, clock=clock)
    with progress.task("gptq: blocks", total=30) as bar:
        for _ in range(30):
            clock.now += 2
            bar.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "gptq: blocks 1/30 elapsed 2s eta 58s"
    assert lines[-1] == "gptq: blocks 30/30 elapsed 1m00s done"
    # one line per 10 seconds of a 60-second stage, plus the first and the last
    assert 6 <= len(lines) <= 8
    for line in lines[1:-1]:
        assert re.fullmatch(r"gptq: blocks \d+/30 elapsed \d+s eta \d+s", line)


def test_line_progress_reports_an_unfinished_stage_when_it_ends():
    out, clock = io.StringIO(), Clock()
    progress = LineProgress(out, interval=100, clock=clock)
    with progress.task("evaluating windows", total=8) as bar:
        clock.now += 1
        bar.advance(4)
        clock.now += 1
        bar.advance(2)
    assert out.getvalue().splitlines() == ["evaluating windows 4/8 elapsed 1s eta 1s",
                                           "evaluating windows 6/8 elapsed 2s eta 1s"]


def test_terminal_choice(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(for_terminal(), LineProgress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(for_terminal(), RichProgress)


def test_silent_progress_prints_nothing(capsys):
    with Progress().task("x", 3) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_non_interactive_quantize_prints_block_lines(tiny_llama, tmp_path):
    """What a CI log of `compress quantize` shows: per-block lines with elapsed time."""
    from helpers import cli

    result = cli("quantize", tiny_llama, "-o", tmp_path / "q", "--bits", "4", "--group-size", "32")
    assert result.exit_code == 0, result.output
    assert re.search(r"rtn: blocks 3/3 elapsed \d+s done", result.stderr)
