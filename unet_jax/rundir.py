"""A run directory that one run owns at a time, and files in it that are never half-written.

Two training runs writing into one directory interleave their checkpoints and files
and leave neither usable, so a run holds an exclusive lock on ``RUN_DIR/.lock`` while
it trains. The lock is an ``flock``: the kernel releases it when its process ends, also
when the process is killed, so a crashed run never leaves the directory stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path


class RunDirError(RuntimeError):
    """The run directory cannot be used: busy, or not writable. One line, with the fix."""


def check_writable(directory, what: str = "--workdir") -> Path:
    """Creates ``directory`` if needed and checks that a file can be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise RunDirError(f"{what} {directory} is not writable ({e.strerror or e}); choose a "
                          f"writable {what}") from None
    return directory


@contextlib.contextmanager
def lock(directory):
    """Holds ``directory``'s run lock, or raises RunDirError at once if another process
    holds it."""
    path = check_writable(directory) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"--workdir {directory} is in use by another training run "
                              f"({holder}); wait for it to finish or choose another "
                              "--workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a crash) sees the old file or
    the new one, never half of one, and no temporary file is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
