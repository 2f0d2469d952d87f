"""The one error type users see: what went wrong and what to do about it."""

from __future__ import annotations


class CompressorError(Exception):
    """A problem the user can fix. The CLI prints it on one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(". ")
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()
