"""Where an output may be written, checked before any work so that nothing is ever lost.

An output is refused when it is the current directory (or contains it), when it overlaps a
source it is built from (is it, lies inside it or contains it), when its parent cannot be
written or lacks room, and when it exists and is anything but a compressor artifact: `--overwrite`
replaces only a directory that we wrote (its manifest says so and it holds nothing else).
Names read from files (tensor names, file names in metadata and manifests) are untrusted and
must pass `safe_name` before they become part of a path. One process at a time writes an output
(`writes_output`): a second one is refused while the first runs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from compressor.errors import CompressorError
from compressor.util import human_bytes

MANIFEST = "manifest.json"
# Files of an artifact that its manifest does not list (it cannot hash itself; build.json varies).
UNLISTED = (MANIFEST, "build.json")


def safe_name(name: object, what: str = "file name") -> str:
    """`name` if it is a bare file name (no separators, not absolute, not `.`/`..`), else an error."""
    if not is_safe_name(name):
        raise CompressorError(f"unsafe {what} {name!r}: only a bare file name is allowed",
                              "the file was crafted or damaged; do not use it")
    return name  # type: ignore[return-value]


def is_safe_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not os.path.isabs(name) and len(name) <= 255)


def manifest_names(path: Path) -> set[str] | None:
    """Names the manifest of a compressor artifact lists, or None if `path` is not one."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != "compressor":
        return None
    names = set(UNLISTED)
    for key in ("files", "tensors"):
        if isinstance(manifest.get(key), dict):
            names.update(manifest[key])
    return names


def foreign_entries(path: Path) -> list[str] | None:
    """Entries of directory `path` that compressor did not write; None if it is not our artifact."""
    names = manifest_names(path)
    if names is None:
        return None
    return sorted(p.name for p in Path(path).iterdir()
                  if p.name not in names or p.is_symlink() or not p.is_file())


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, *, overwrite: bool, sources: Iterable[Path] = (), needs_bytes: int = 0,
                 kind: str = "output") -> Path:
    """Refuse an output location that could lose data or fail after the work; clear stale temporaries."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise CompressorError(f"{kind} {str(out)!r} names a directory by '.' or '..', which would be replaced",
                              "name a new directory for it, e.g. -o out/model-w4")
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, target):
        raise CompressorError(f"{kind} {out} is the current directory or contains it",
                              "name a new directory for it, e.g. -o out/model-w4")
    for source in sources:
        source = Path(source).resolve()
        if _inside(target, source) or _inside(source, target):
            relation = ("is" if target == source else "lies inside" if _inside(target, source) else "contains")
            raise CompressorError(f"{kind} {out} {relation} the source {source}",
                                  "write it to a path apart from the source, e.g. -o out/model-w4")
    if out.is_symlink():
        raise CompressorError(f"{kind} {out} is a symbolic link", "name a plain directory for it")
    if out.exists():
        if not overwrite:
            raise CompressorError(f"{kind} {out} already exists", "choose another -o path or pass --overwrite")
        if not out.is_dir():
            raise CompressorError(f"{kind} {out} exists and is not a directory", "choose another -o path")
        if any(out.iterdir()):
            foreign = foreign_entries(out)
            if foreign is None:
                raise CompressorError(
                    f"{kind} {out} exists and is not a compressor artifact; --overwrite only replaces artifacts "
                    "compressor wrote", "choose another -o path, or move that directory away yourself")
            if foreign:
                raise CompressorError(
                    f"{kind} {out} holds files compressor did not write ({', '.join(foreign[:3])}); "
                    "--overwrite would delete them", "choose another -o path, or move those files away yourself")
    clean_stale_temporaries(out)
    check_writable(out.parent, needs_bytes, kind)
    return out


def check_writable(directory: Path, needs_bytes: int = 0, kind: str = "output") -> None:
    """The directory (created if missing) accepts a new entry and has room for `needs_bytes`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".compressor-probe-", dir=directory)
        os.rmdir(probe)
    except OSError as exc:
        raise CompressorError(f"cannot write the {kind} into {directory} ({exc.strerror or exc})",
                              "choose a writable -o location") from None
    free = shutil.disk_usage(directory).free
    if needs_bytes > free:
        raise CompressorError(
            f"{directory} has {human_bytes(free)} free but the {kind} needs about {human_bytes(needs_bytes)}",
            "free some space or choose another -o location")


def report_path(path: Path, *, overwrite: bool = True) -> Path:
    """A single output file (a report): checked before the work that produces it."""
    path = Path(path)
    if path.is_dir():
        raise CompressorError(f"report path {path} is a directory", "pass a file name, e.g. --report out/eval.md")
    if path.exists() and not overwrite:
        raise CompressorError(f"report {path} already exists", "choose another path")
    check_writable(path.parent, kind="report")
    return path


def temporary_name(out: Path, pid: int, token: str) -> str:
    return f"{out.name}.tmp-{pid}-{token}"


def old_name(out: Path, pid: int, token: str) -> str:
    return f"{out.name}.old-{pid}-{token}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[str]:
    """Remove the temporaries a killed run of this output left beside it (only ours: by exact
    name pattern and a dead writer PID). A previous artifact moved aside and never replaced is
    put back under its name."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    cleaned = []
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists():
            entry.rename(out)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        cleaned.append(entry.name)
    return cleaned


@contextmanager
def atomic_dir(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh sibling temporary directory; on success it takes `target`'s name at once.

    An existing `target` is replaced only after the new directory is complete, by one atomic
    exchange of the two names where the system has it (Linux renameat2), so a kill at any point
    leaves the old or the new directory under the final name, never none and never a half one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = target.with_name(temporary_name(target, os.getpid(), token))
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        tmp.rename(target)
        return
    if not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(target)
    if _exchange(tmp, target):  # tmp now holds the old directory
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(old_name(target, os.getpid(), token))
    target.rename(old)  # a kill before the next line is undone by clean_stale_temporaries
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths' names in one step; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# ---------------------------------------------------------------- one writer per output

_HELD: set[str] = set()  # outputs this process holds the lock of (a nested call may write the same one)


def lock_path(out: Path) -> Path:
    """The lock file of an output: in a per-user directory, not beside the output, so that it never
    appears among the user's files; named by the output's absolute path."""
    key = hashlib.sha256(os.fsencode(Path(out).absolute().resolve())).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"compressor-locks-{os.getuid()}" / f"{key}.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output's lock for the block (released by the system if the process dies);
    CompressorError at once if another process holds it."""
    path = lock_path(out)
    key = str(path)
    # The other ranks of one torchrun job write the same output with rank 0, which holds the lock.
    if key in _HELD or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # no lock directory to be had: work unlocked rather than not at all
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CompressorError(f"{out} is being written by another compress process (pid {holder})",
                                  "wait for it to finish, or choose another -o path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def writes_output(function: Callable) -> Callable:
    """Run `function` holding the lock of the output its `out` argument names."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args, **kwargs):
        out = signature.bind_partial(*args, **kwargs).arguments.get("out")
        if out is None:
            return function(*args, **kwargs)
        with output_lock(Path(out)):
            return function(*args, **kwargs)

    return locked
