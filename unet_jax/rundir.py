"""A run directory: what state it is in, one run at a time in it, no half-written files.

The state of a directory decides what ``train`` may do with it, and is decided here
alone (``check_start``), in one vocabulary:

* **free**: nothing in it, or only a run that stopped before its first checkpoint
  (a NaN loss, a bad file found while reading the data): nothing finished is lost by
  starting it again, so a new run may start there;
* **someone else's**: it holds files no run writes (a dataset, a folder of runs): a
  run there would scatter its files among them, so it is refused;
* **resumable**: it holds at least one checkpoint; ``--resume`` continues it, and a
  new run is refused, since it would overwrite finished work;
* **finished work without checkpoints**: ``metrics.csv`` is there but the checkpoints
  are gone: nothing to resume from, and the metrics are never overwritten.

Two training runs writing into one directory interleave their checkpoints and files
and leave neither usable, so a run holds an exclusive lock on ``RUN_DIR/.lock`` while
it trains. The lock is an ``flock``: the kernel releases it when its process ends, also
when the process is killed, so a crashed run never leaves the directory stuck.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path


class RunDirError(RuntimeError):
    """The run directory cannot be used: busy, or not writable. One line, with the fix."""


# What a run writes at its top level (hidden files, such as the lock, aside).
RUN_ENTRIES = frozenset({"checkpoints", "tensorboard", "config.json", "split.json",
                         "metrics.csv", "loss.png", "predictions.png"})


def has_checkpoint(directory) -> bool:
    """Whether ``directory/checkpoints`` holds a finished checkpoint: orbax names one
    by its epoch alone, and a save still in progress ``<epoch>.orbax-checkpoint-tmp``."""
    folder = Path(directory) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_start(directory, resume: bool, what: str = "--workdir", *,
                resumable: bool = True) -> None:
    """Raises RunDirError unless a run may start in ``directory`` (``resume`` False) or
    be resumed from it (``resume`` True); see the module's docstring for the states.
    ``resumable`` False: the command cannot resume (importing weights), so the
    message offers no --resume."""
    directory = Path(directory)
    checkpoint = has_checkpoint(directory)
    finished = (directory / "metrics.csv").exists()
    if resume and not checkpoint:
        if not (directory / "config.json").is_file():
            raise RunDirError(f"--resume: {directory} holds no run (no config.json); check "
                              f"{what}, or drop --resume to start a new run")
        if finished:
            raise RunDirError(f"--resume: {directory} has metrics.csv but no checkpoint to "
                              f"resume from (checkpoints/ was removed); start a new run in "
                              f"another {what}")
        raise RunDirError(f"--resume: {directory} holds no checkpoint (its run stopped "
                          "before finishing an epoch); drop --resume to start it again")
    if not resume and (checkpoint or finished) and (holder := _holder(directory)):
        # "pass --resume" would only meet the lock: say why first.
        wait = "wait for it to finish or " if resumable else ""
        raise RunDirError(f"{what} {directory} is in use by another training run "
                          f"({holder}); {wait}choose another {what}")
    if not resume and (checkpoint or finished):
        # Without a checkpoint there is nothing --resume could continue.
        hint = "pass --resume to continue it, or " if resumable and checkpoint else ""
        raise RunDirError(f"{what} {directory} already holds a run; {hint}choose another "
                          f"{what}")
    if resume or not directory.is_dir():
        return
    foreign = sorted(p.name for p in directory.iterdir()
                     if p.name not in RUN_ENTRIES and not p.name.startswith("."))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise RunDirError(f"{what} {directory} holds files that are not a run's "
                          f"({foreign[0]}{more}); choose a new or empty directory for {what}")


def check_writable(directory, what: str = "--workdir") -> Path:
    """Creates ``directory`` if needed and checks that a file can be written in it.

    Done before any work, so that a read-only or full disk, or a path that is a file,
    is a one-line RunDirError naming the flag (``what``), not a traceback an epoch later.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{what} {directory} is a file, not a directory; choose a "
                          f"directory for {what}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno, str(e))
        raise RunDirError(f"{what} {directory} is not writable ({reason}); choose a "
                          f"writable {what}") from None
    return directory


def _holder(directory) -> str | None:
    """What the lock file says of another process holding ``directory``'s lock, or
    None where none does (this process's own lock is none: the trainer checks again
    under it). Tried without waiting, and released at once."""
    path = Path(directory) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if holder.startswith(f"pid {os.getpid()},"):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return holder or "pid unknown"
    except OSError:
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock(directory):
    """Holds ``directory``'s run lock (``directory/.lock``), creating the directory.

    Raises RunDirError at once, without waiting, if another process holds it. The
    lock file records the holder's pid and start time for that message.
    """
    path = check_writable(directory) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            raise RunDirError(f"--workdir {directory} is in use by another training run "
                              f"({holder}); wait for it to finish or choose another "
                              "--workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a crash) sees the old file or
    the new one, never half of one, and no temporary file is left behind."""
    path = Path(path)
    # A name as long as a file system allows leaves room for the temporary one's.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself reaches the disk with the directory's entry.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
