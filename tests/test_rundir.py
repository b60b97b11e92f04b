"""The run directory: one run at a time (a lock a killed run cannot leave stuck), files
never half-written, and an unwritable directory named in one line."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unet_jax import rundir
from unet_jax.rundir import RunDirError

# rundir.py loaded by path: the holder starts in a fraction of a second, without the
# package's JAX imports.
HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("rundir", sys.argv[1])
    rundir = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rundir)
    with rundir.lock(sys.argv[2]):
        print("locked", flush=True)
        time.sleep(120)
""")


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_a_second_run_is_refused_until_the_first_is_killed(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, rundir.__file__, str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as e:
            with rundir.lock(workdir):
                pass
        text = one_line(e.value)
        assert text.startswith(f"--workdir {workdir} is in use by another training run "
                               f"(pid {holder.pid}, started ")
        assert text.endswith("); wait for it to finish or choose another --workdir")
        # A new run there is told the same, not "pass --resume" (which meets the lock).
        (workdir / "metrics.csv").write_text("epoch\n")
        with pytest.raises(RunDirError, match=r"is in use by another training run \(pid "
                           f"{holder.pid}, started "):
            rundir.check_start(workdir, resume=False)
        with pytest.raises(RunDirError, match=r"\); choose another OUT_DIR$"):  # no waiting
            rundir.check_start(workdir, resume=False, what="OUT_DIR", resumable=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead process's flock: no stale lock to remove by hand.
    with rundir.lock(workdir) as path:
        assert path == workdir / ".lock"
        assert path.read_text().startswith(f"pid {os.getpid()}, started ")
        # Its own lock is no other run's: checked again under it, the run is named
        # as one to resume.
        with pytest.raises(RunDirError, match="run already holds a run; choose another"):
            rundir.check_start(workdir, resume=False)


def test_the_lock_is_exclusive_within_a_process_too_and_released_on_exit(tmp_path):
    workdir = tmp_path / "a" / "b"  # created as needed
    with rundir.lock(workdir):
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            with rundir.lock(workdir):
                pass
    with pytest.raises(KeyError):
        with rundir.lock(workdir):
            raise KeyError("the run failed")
    with rundir.lock(workdir):  # released by both exits
        pass


def test_write_text_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.csv"
    rundir.write_text_atomic(path, "epoch\n1\n")
    rundir.write_text_atomic(path, "epoch\n1\n2\n")
    assert path.read_text() == "epoch\n1\n2\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


@pytest.mark.parametrize("failure", ["encode", "fsync"])
def test_write_text_atomic_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch, failure):
    path = tmp_path / "config.json"
    path.write_text("old")
    text = "new"
    if failure == "encode":  # fails halfway through writing: a lone surrogate
        text = "x" * 100_000 + "\udcff"
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises((UnicodeEncodeError, OSError)):
        rundir.write_text_atomic(path, text)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_check_writable_creates_the_directory(tmp_path):
    out = rundir.check_writable(tmp_path / "x" / "y", "--output")
    assert out.is_dir() and list(out.iterdir()) == []


def test_an_unwritable_directory_is_one_line(tmp_path, monkeypatch):
    """Read-only for root too: os.open in the directory fails with EROFS, as on a
    read-only mount (root ignores a chmod, and tests cannot mount)."""
    target = tmp_path / "ro"
    target.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == target:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunDirError) as e:
        rundir.check_writable(target)
    assert one_line(e.value) == (f"--workdir {target} is not writable (Read-only file "
                                 "system); choose a writable --workdir")
    with pytest.raises(RunDirError, match="--workdir .* is not writable"):
        with rundir.lock(target):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 directory")
def test_a_read_only_directory_is_one_line(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match=r"--output .* is not writable \(Permission "
                           r"denied\); choose a writable --output"):
            rundir.check_writable(target / "sub", "--output")
    finally:
        target.chmod(0o755)


def test_a_file_in_the_way_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(RunDirError, match=r"--workdir .*run is a file, not a directory"):
        rundir.check_writable(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"--workdir .* is not writable \(Not a directory\)"):
        rundir.check_writable(tmp_path / "run" / "sub")


def test_a_folder_of_other_files_is_refused_and_a_stopped_run_is_not(tmp_path):
    """A dataset (or a folder of runs) given as --workdir would get a run's files
    scattered among its own; a run that stopped before its first checkpoint left only
    a run's files, and may start again."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    with pytest.raises(RunDirError) as e:
        rundir.check_start(data, resume=False)
    assert one_line(e.value) == (f"--workdir {data} holds files that are not a run's "
                                 "(images and 1 more); choose a new or empty directory "
                                 "for --workdir")
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "tensorboard").mkdir()
    for name in ("config.json", "split.json", ".lock"):
        (stopped / name).write_text("{}")
    rundir.check_start(stopped, resume=False)
    rundir.check_start(tmp_path / "new", resume=False)
