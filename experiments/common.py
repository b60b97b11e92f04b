"""What every command shares: one-line errors, the platform flag, image sizes.

A user's mistake (a bad flag, a broken file, a missing checkpoint) ends the command
with one line that names the flag or file and the fix, and exit status 2; never a
traceback. Programming errors still raise with their traceback, so they can be
reported.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import textwrap
import threading

USER_ERROR = 2


class UserError(Exception):
    """A problem with the command's input that the user can fix; exit status 2."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt.

    A scheduler stopping a job (Slurm, Kaggle, ``docker stop``, ``timeout``) sends
    SIGTERM, which by default ends Python at once: a checkpoint being written is
    lost and a run that had not started yet leaves its folder behind. Raised instead,
    it unwinds like Ctrl-C: the checkpoint in flight is finished and every cleanup
    runs. A second SIGTERM ends the process at once, as before.
    """


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def _signals_redelivered(previous_hook):
    """A ``sys.unraisablehook`` that delivers Ctrl-C and SIGTERM again when Python
    swallowed them.

    A signal's exception is raised in whatever Python code runs when it arrives. If
    that is a finalizer (TensorFlow's ``__del__`` methods, JAX's garbage-collector
    callback), Python prints "Exception ignored in ..." and carries on: the run
    trained to its end and exited 0 after the user pressed Ctrl-C. The signal is sent
    again a moment later, to land in the command's own code, which unwinds as it
    should; if it lands in a finalizer again, this repeats.
    """
    def send_again(signum):
        # Sent at once, it would land in this hook, whose exceptions are lost as well.
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()

    def hook(unraisable):
        if (unraisable.exc_type is KeyboardInterrupt
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            send_again(signal.SIGINT)
        elif unraisable.exc_type is Terminated and signal.getsignal(signal.SIGTERM) in (
                signal.SIG_DFL, _terminated):
            signal.signal(signal.SIGTERM, _terminated)  # the lost one was the first
            send_again(signal.SIGTERM)
        else:
            previous_hook(unraisable)

    return hook


# milesial/Pytorch-UNet's flags, which many users bring along: for each, what it is
# here, as (the flag the command must have for this answer, or None; the answer), the
# first that fits the command.
_RUN = "--checkpoint RUN_DIR (the folder a training run wrote)"
_LOAD = ("--resume --workdir RUN (to continue a run) or --init-from RUN (to fine-tune "
         "from its weights)")
FOREIGN_FLAGS = {
    "--learning-rate": [("--lr", "is --lr")], "-l": [("--lr", "is --lr")],
    "--load": [("--init-from", f"is {_LOAD}"), ("--checkpoint", f"is {_RUN}")],
    "-f": [("--init-from", f"is {_LOAD}")],
    "--amp": [("--dtype", "is --dtype bfloat16")],
    "--bilinear": [(None, "has no counterpart: the U-Net upsamples with transposed "
                          "convolutions, as the guide's does")],
    "--validation": [("--val-fraction", "is --val-fraction, a fraction (10% is 0.1)")],
    "-v": [("--val-fraction", "is --val-fraction, a fraction (10% is 0.1)"),
           ("--viz", "is --viz")],
    "--classes": [("--num-classes", "is --num-classes (1 for binary masks)"),
                  ("--checkpoint", "has no counterpart: the class count is the run's")],
    "-c": [("--num-classes", "is --num-classes (1 for binary masks)")],
    "--model": [("--checkpoint", f"is {_RUN}")], "-m": [("--checkpoint", f"is {_RUN}")],
    "--mask-threshold": [("--threshold", "is --threshold")],
    "-t": [("--threshold", "is --threshold")],
    "--no-save": [("--viz", "has no counterpart: masks are always written (--viz adds "
                            "the figure)")],
    "-i": [("--input", "is --input")], "-o": [("--output", "is --output")],
    "-e": [("--epochs", "is --epochs")], "-b": [("--batch-size", "is --batch-size")],
    "-s": [("--crop", "is --scale, with --crop (see --help)"),
           ("--checkpoint", "has no counterpart: the scale is the run's")],
}


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (argparse prints the usage too), with
    the flag meant where a mistyped one or another tool's is given."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        hint = self._foreign(getattr(self, "_given", []))
        if not hint and message.startswith("unrecognized arguments:"):
            hint = self._did_you_mean(message.split(":", 1)[1].split())
        sys.stderr.write(f"{self.prog}: error: {message}{hint} (see --help)\n")
        sys.exit(USER_ERROR)

    def _flags(self) -> set[str]:
        return {f for action in self._actions for f in action.option_strings}

    def _foreign(self, words: list[str]) -> str:
        """"; from milesial/Pytorch-UNet: -i is --input; ..." for milesial's flags
        that this command does not take (where the one meant is this command's, or
        there is none), all at once: a pasted command line holds several."""
        flags, found = self._flags(), {}
        for word in words:
            name = word.split("=")[0]
            if name in FOREIGN_FLAGS and name not in flags:
                found[name] = next((advice for needs, advice in FOREIGN_FLAGS[name]
                                    if needs is None or needs in flags), None)
        found = {name: advice for name, advice in found.items() if advice}
        return ("; from milesial/Pytorch-UNet: " + "; ".join(
            f"{name} {advice}" for name, advice in found.items())) if found else ""

    def _did_you_mean(self, words: list[str]) -> str:
        """"; did you mean --crops-per-image?" for the first mistyped flag; for a
        command that reads a run, a training setting given to it is named as one."""
        import difflib

        flags = sorted(f for f in self._flags() if f.startswith("--"))
        for word in words:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.7)
                if close:
                    return f"; did you mean {close[0]}?"
        if "--checkpoint" in flags:  # predict, evaluate, submit, export: a run's readers
            import dataclasses

            from unet_jax.config import Config, flag

            settings = {flag(f.name) for f in dataclasses.fields(Config)}
            settings |= {"--no-" + name[2:] for name in settings}
            for word in words:
                if word.split("=")[0] in settings:
                    return (f"; {word.split('=')[0]} is a setting of training, which this "
                            "command does not take (the run's own are in its config.json)")
        return ""


def make_parser(prog: str, doc: str, examples: str) -> Parser:
    # No abbreviations: train's --epoch was read as --epochs without a word, while
    # predict, evaluate and export take --epoch for the checkpoint to use.
    return Parser(prog=f"python -m {prog}", description=doc, allow_abbrev=False,
                  epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def add_platform_flag(parser) -> None:
    """--platform, and --compile-cache (``unet_jax.compile_cache``), which every command
    that runs JAX shares."""
    parser.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where JAX runs; 'gpu' fails unless JAX sees a GPU (default: auto)")
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="folder of JAX's persistent compilation cache, so a second run "
                        "loads its compiled programs instead of compiling them again; 'off' "
                        "turns it off (default: $UNET_JAX_COMPILE_CACHE, else JAX's own "
                        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/unet-jax/jax-cache)")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def add_checkpoint_flags(parser) -> None:
    """--checkpoint, --epoch, --batch-size, --skip-bad, how to predict (--tile, --overlap,
    --tta, --threshold) and --platform: the flags of the tools that use a run."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                        help="run directory written by experiments.train or experiments.import_torch")
    parser.add_argument("--epoch", default="best",
                        help="'best' (by validation Dice, default), 'latest' or an epoch number")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per model call")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images (listed as a warning) instead of stopping")
    g = parser.add_argument_group("how to predict (default: as the run was trained)")
    g.add_argument("--tile", action=argparse.BooleanOptionalAction, default=None,
                   help="--tile: images at native resolution (times the run's --scale), "
                   "tile by tile with mirrored borders; --no-tile: in one pass, whole "
                   "(runs trained with --crop) or resized (default: resized, or for runs "
                   "trained with --crop whole, and tiled if the pass would not fit in "
                   "memory)")
    g.add_argument("--overlap", type=float, metavar="F",
                   help="tiled prediction: fraction of a tile its neighbour shares "
                   "(default: the run's, 0.25 unless set)")
    from unet_jax.tiling import TTA

    g.add_argument("--tta", choices=TTA,
                   help="test-time augmentation: average with the left-right mirror "
                   "(hflip) or every flip (flips) (default: the run's, none unless set)")
    g.add_argument("--threshold", type=float, metavar="P",
                   help="one-class runs: a pixel is foreground where its probability is "
                   "over P (default: 0.5); evaluate --thresholds scores several, to choose")
    add_platform_flag(parser)


def make_predictor(args):
    """The ``Predictor`` of a tool's --checkpoint, --epoch, --batch-size, --tile,
    --overlap, --tta and --threshold."""
    from unet_jax.inference import Predictor

    return Predictor(args.checkpoint, args.epoch, args.batch_size, tile=args.tile,
                     overlap=args.overlap, tta=args.tta, threshold=args.threshold)


def add_distributed_flags(parser) -> None:
    g = parser.add_argument_group("several processes (multi-host); see README")
    g.add_argument("--coordinator", help="ADDRESS:PORT of process 0, e.g. node0:1234")
    g.add_argument("--num-processes", type=int, help="number of processes in the run")
    g.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run described by the environment (Slurm, "
                   "Open MPI), as jax.distributed.initialize() detects it")


def start_platform(platform: str, args=None) -> str:
    """Chooses the JAX platform and its XLA settings (``unet_jax.setup_platform``, before
    any JAX work), turns on the persistent compilation cache (``--compile-cache``), and
    joins a multi-process run when asked to."""
    # orbax and tfds log routine notes through absl as warnings; the tools say what
    # matters themselves.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # TensorFlow's C++ start-up notes (oneDNN, CPU features) are read from the
    # environment when TF is first imported, whichever module imports it first.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from unet_jax import compile_cache
    from unet_jax.platform import PlatformError, configure_platform, setup_platform

    try:
        configure_platform(platform)
        compile_cache.enable(getattr(args, "compile_cache", None))
        explicit = [getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")]
        if any(v is not None for v in explicit):
            if any(v is None for v in explicit):
                raise UserError("--coordinator, --num-processes and --process-id go together")
            _initialize_distributed(*explicit)
        elif getattr(args, "distributed", False):
            _initialize_distributed()
        return setup_platform(platform)
    except (PlatformError, compile_cache.CompileCacheError) as e:
        raise UserError(str(e)) from None


def _initialize_distributed(*args) -> None:
    from unet_jax import parallel

    ours = signal.getsignal(signal.SIGTERM) is _terminated
    try:
        parallel.initialize(*args)
    except Exception as e:  # jax raises ValueError/RuntimeError with long messages
        raise UserError(f"cannot join the multi-process run: {str(e).splitlines()[0]}") from None
    # jax.distributed.initialize installs its own SIGTERM handler (for its preemption
    # notices, which the trainer does not use); without ours a stopped job would die
    # mid-checkpoint instead of unwinding like Ctrl-C.
    if ours and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _second_ctrl_c_exits_at_once() -> None:
    """Run first of the exit callbacks (the last registered): the command's own
    cleanups are done, and a Ctrl-C pressed again while JAX's callbacks shut down would
    print their traceback ("Exception ignored in atexit callback") under the one-line
    "interrupted". It ends the process at once instead, with the same status."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _stopped(prog: str, signal_error: BaseException) -> int:
    """Says that Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated) stopped the
    command, in one line, and returns its exit status: 130 or 143, as a shell gives."""
    ctrl_c = isinstance(signal_error, KeyboardInterrupt)
    sys.stderr.write(f"{prog}: {'interrupted' if ctrl_c else 'terminated'}\n")
    sys.stderr.flush()
    return 130 if ctrl_c else 128 + signal.SIGTERM


def _distributed() -> bool:
    """Whether this process is one of several of a JAX run (jax.distributed)."""
    jax = sys.modules.get("jax")
    try:
        return jax is not None and jax.process_count() > 1
    except Exception:  # noqa: BLE001 - a backend that failed to start: one process
        return False


def check_output_file(out: Path, example: str, ours, what: str) -> Path:
    """``--output`` of a command that writes one file, checked before any work: not a
    folder (``example`` names a file in it instead), not a link (the file would take
    the link's place), a file only where ``ours(out)`` says this command wrote it (so
    ``--output RUN/config.json`` replaces nothing: ``what`` the command writes names
    it), in a writable folder."""
    from unet_jax import rundir

    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file name, such as "
                        f"{out / example}")
    if out.is_symlink():
        raise UserError(f"--output {out} is a link (to {os.readlink(out)}); give the file "
                        "it points to, or a new file name")
    if out.exists() and not ours(out):
        raise UserError(f"--output {out} is a file that is not {what}: give a new file "
                        "name, or remove it first")
    rundir.check_writable(out.parent, "--output's folder")
    return out


# What decides each command's memory, for the out-of-memory line.
_MEMORY_FLAGS = {
    "train": "lower --batch-size, --image-size or --crop, or --base-features; on a GPU, "
             "--remat convs or full also helps",
    "recipes": "lower --batch-size or --image-size",
    "benchmark": "lower --batch-size or --image-size",
    "predict": "lower --batch-size, or predict in tiles (--tile)",
    "evaluate": "lower --batch-size, or predict in tiles (--tile)",
    "submit": "lower --batch-size, or predict in tiles (--tile)",
}


def _resource_error(e: Exception, prog: str = "") -> str | None:
    """One line for running out of disk or memory, whatever raised it (a file write,
    TensorStore, numpy, XLA, a tf.data worker), with what decides it for the command
    ``prog``; None for other errors, which keep their traceback."""
    text = str(e)
    errno_ = getattr(e, "errno", None)
    disk = (isinstance(e, OSError) and errno_ in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
            or any(sign in text for sign in ("No space left", "os_error_code='28'",
                                             "Errno 28", "Read-only file system")))
    if disk:  # TensorStore says RESOURCE_EXHAUSTED for a full disk too: disk first
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        why = e.strerror if isinstance(e, OSError) and e.strerror else (
            "read-only file system" if "Read-only" in text else "no space left on device")
        return (f"cannot write{where} ({why}); free space on that disk, or make it "
                "writable, and run the command again")
    if isinstance(e, MemoryError) or any(sign in text for sign in (
            "RESOURCE_EXHAUSTED", "Unable to allocate", "Out of memory", "out of memory")):
        size = re.search(r"Unable to allocate [\d.]+ \w+|allocating \d+ bytes", text)
        first = size.group(0) if size else type(e).__name__
        command = prog.rsplit(".", 1)[-1]
        fix = _MEMORY_FLAGS.get(command, "free memory, or run it on a larger machine")
        return f"out of memory ({first}); {fix}"
    return None


def run(main, argv=None, prog: str = "") -> None:
    """Runs ``main(argv)``; user errors become one line on stderr and exit status 2,
    Ctrl-C exits 130 and SIGTERM 143, each after the command's cleanups ran."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    for stream in (sys.stdout, sys.stderr):
        # A console that cannot show a path's letters (PYTHONIOENCODING=ascii, a
        # Windows code page) escapes them rather than failing after the work is done;
        # a stream that already has a way (surrogateescape: a C locale) keeps it.
        if getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")
    # The commands' warnings (skipped files, checks) as "WARNING:<module>:<message>";
    # the library itself leaves the process's logging alone.
    logging.basicConfig(format=logging.BASIC_FORMAT)
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    previous_hook = sys.unraisablehook
    if in_main_thread:
        sys.unraisablehook = _signals_redelivered(previous_hook)
    try:
        # These import JAX, a second or two, whose GC callbacks run meanwhile (the
        # hook above re-sends a signal they swallow): a Ctrl-C ends the command as at
        # any later point, not with the import's traceback. Nothing has run yet, so
        # there is nothing to clean up, and a half-imported JAX's exit callbacks are
        # not run.
        from data_pipeline.errors import DataError, SettingError
        from data_pipeline.preprocess import max_image_pixels
        from unet_jax.checkpoints import CheckpointError
        from unet_jax.config import ConfigError
        from unet_jax.export import ExportError
        from unet_jax.rundir import RunDirError
        from unet_jax.trainer import TrainingError
    except (KeyboardInterrupt, Terminated) as e:
        os._exit(_stopped(prog, e))
    try:
        max_image_pixels()  # the variable's mistake once, not as every image's fault
        code = main(argv)
    except (UserError, DataError, SettingError, CheckpointError, ConfigError, ExportError,
            RunDirError, TrainingError) as e:
        sys.stderr.write(f"{prog or 'error'}: error: {e}\n")
        sys.exit(USER_ERROR)
    except Exception as e:
        if (line := _resource_error(e, prog)) is None:
            raise
        sys.stderr.write(f"{prog or 'error'}: error: {line}\n")
        sys.exit(USER_ERROR)
    except (KeyboardInterrupt, Terminated) as e:
        code = _stopped(prog, e)
        if argv is None and not _distributed():
            # The command's own cleanups have run. Stopped in the middle of its first
            # compile, JAX's shutdown frees the compiler's threads while they still
            # work, and the process died of SIGSEGV (139) instead of 130 or 143: a
            # process that is the command ends here, its output flushed. (One of
            # several processes shuts down as usual, so that the others are released.)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):  # a closed pipe (| head)
                    stream.flush()
            os._exit(code)
        atexit.register(_second_ctrl_c_exits_at_once)  # a caller's process goes on
        sys.exit(code)
    finally:
        sys.unraisablehook = previous_hook
        if previous is not None:  # None: the handler was set outside Python
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
