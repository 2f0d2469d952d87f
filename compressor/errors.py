"""The one error type users see: what went wrong and what to do about it."""

from __future__ import annotations

import errno


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


# Failures of the disk under a running command: the user's to fix, not bugs.
_DISK = {errno.ENOSPC: ("no space left on the device", "free some space or choose another -o location, then rerun "
                        "with --resume where the command has it"),
         errno.EDQUOT: ("disk quota exceeded", "free some space or choose another -o location"),
         errno.EROFS: ("the file system is read-only", "choose a writable -o location"),
         errno.EACCES: ("permission denied", "check that path's permissions, or choose a writable -o location"),
         errno.EPERM: ("operation not permitted", "check that path's permissions, or choose a writable -o location")}


def disk_error(exc: OSError) -> CompressorError | None:
    """The one-line error for a disk that filled up or turned read-only mid-run, else None."""
    if exc.errno not in _DISK:
        return None
    problem, fix = _DISK[exc.errno]
    where = f" at {exc.filename}" if exc.filename else ""
    return CompressorError(f"{problem}{where}", fix)
