"""Checkpoints with orbax: the last few epochs and the best one by validation Dice.

``RUN_DIR/checkpoints/<epoch>/`` holds params/, opt_state/, progress/ (epoch, step,
metric history as JSON), metrics/ and, for a run with ``--ema``, ema_params/ (the
averaged weights) as separate orbax items, so inference restores the weights alone.
What a crash or a damaged file costs (orbax 0.12.8):

* A run killed while saving keeps its previous checkpoints: orbax writes into
  ``<epoch>.orbax-checkpoint-tmp`` and renames it when complete.
* Orbax deletes checkpoints that fall out of the keep policy file by file, in place,
  and a run killed meanwhile left a half-deleted ``<epoch>`` listed as complete; so
  they are first renamed into ``checkpoints/.deleting/`` (one atomic rename).
* A checkpoint whose files cannot be read raises ``DamagedCheckpoint`` naming it and
  the intact ones; ``--epoch best`` and ``--resume`` fall back to an intact one. One
  that reads but was made with other settings (shapes in its metadata differ from
  what config.json builds) is named as such: every checkpoint of the run would fail.

``restore_params`` (predict, evaluate) restores onto one device, whatever devices the
run trained on; ``restore_latest_intact`` (``--resume``) into the shardings of the
state it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import jax

from unet_jax import rundir
from unet_jax.config import Config, ConfigError, flag, shown
from unet_jax.optim import TrainState, weights_name
from unet_jax.train import init_params

# orbax logs through absl as it is imported, and absl then calls logging.basicConfig(),
# giving the root logger a handler: a user's own basicConfig afterwards did nothing.
# Importing unet_jax leaves the process's logging as it was.
_handlers = list(logging.root.handlers)
import orbax.checkpoint as ocp  # noqa: E402
from orbax.checkpoint import checkpoint_managers as policies  # noqa: E402

for _added in [h for h in logging.root.handlers if h not in _handlers]:
    logging.root.removeHandler(_added)

BEST_METRIC = "val_dice"
DELETING = ".deleting"  # under checkpoints/: old checkpoints on their way out
DAMAGED = "damaged"  # under checkpoints/: damaged checkpoints --resume moved aside
_WEIGHTS = {"raw": "params", "ema": "ema_params"}  # the orbax item of each kind of weights

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A run directory has no usable checkpoint; the message is one line with the fix."""


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, removing the checkpoints it renamed into ``.deleting/``.

    Every save waits for the previous one (orbax's ``save`` calls
    ``wait_until_finished``), as does ``close``, so what the previous save dropped
    is removed then. A run killed meanwhile leaves them in ``.deleting/``, which is
    never listed, and the next writing manager removes them.
    """

    deletes = False  # a read-only manager never removes anything

    def __init__(self, *args, **kwargs):
        self._warned = set()  # steps named by _unscored: orbax asks more than once
        self._writing = None  # the step of the last save begun: the one a failure names
        super().__init__(*args, **kwargs)  # which reads every checkpoint's scores

    def save(self, step, *args, **kwargs):
        # The previous save's failure surfaces here, an epoch later: named by its step
        # before this one's is recorded.
        self.wait_until_finished()
        self._writing = step
        return super().save(step, *args, **kwargs)

    def metrics(self, step: int) -> dict | None:
        """The validation scores saved with checkpoint ``step``; None, with a warning,
        when their file is missing, damaged or holds no usable ``val_dice``.

        Orbax reads every checkpoint's scores as a manager opens, and a file it cannot
        parse (a run copied while it wrote, a full disk) stopped every command that
        opened the run with a JSON traceback, the intact checkpoints with it. None is
        what orbax gives a checkpoint saved without scores: it is kept, and ranks after
        the scored ones for 'best' (the warning says why another epoch is used).
        """
        try:
            metrics = super().metrics(step)
        except Exception as e:  # noqa: BLE001 - any unreadable file: rank it last
            problem = (str(e).splitlines() or [type(e).__name__])[0]
            return self._unscored(step, f"its scores are unreadable ({problem})")
        if metrics is None:  # every checkpoint unet-jax writes has them: a damaged one
            return self._unscored(step, "its scores are missing")
        score = metrics.get(BEST_METRIC) if isinstance(metrics, dict) else None
        if (isinstance(score, bool) or not isinstance(score, (int, float))
                or not math.isfinite(score)):
            return self._unscored(step, f"it holds no {BEST_METRIC} score")
        return metrics

    def _unscored(self, step: int, problem: str) -> None:
        if not (Path(self.directory) / str(step)).exists():
            return None  # removed meanwhile by the run that wrote it: no damage to name
        if step not in self._warned:
            self._warned.add(step)
            log.warning("%s: %s; it ranks last for 'best'",
                        Path(self.directory) / str(step) / "metrics", problem)

    def wait_until_finished(self):
        try:
            super().wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a background write failed: a full disk, say
            # Orbax reports it here, at the next save or at the end, as a ValueError of
            # TensorStore's status with pages of context; the run stops with one line.
            problem = next((line.strip() for line in str(e).splitlines() if line.strip()),
                           "")
            disk = isinstance(e, OSError) or any(
                word in problem for word in ("RESOURCE_EXHAUSTED", "No space", "Errno"))
            then = ("continue with --resume: the checkpoints before it are intact"
                    if rundir.has_checkpoint(Path(self.directory).parent) else
                    "start the run again")
            fix = "free space or fix the disk" if disk else "fix what it names"
            which = ("a checkpoint" if self._writing is None
                     else f"the checkpoint of epoch {self._writing}")
            raise CheckpointError(f"{which} could not be written in {self.directory} "
                                  f"({type(e).__name__}: {_clipped(problem, 300)}); {fix}, then "
                                  f"{then}") from None
        if self.deletes:
            _empty_deleting(Path(self.directory))


def remove_partial(workdir) -> None:
    """Removes the folders of checkpoint writes that never finished (a full disk, a
    killed run): they would keep a full disk full, and the next --resume, which writes
    config.json first, failing for it. Called by the run's one writer of such things
    (process 0) where no write is running: at the start of a run, and after its
    manager closed in a run of one process."""
    for partial in (Path(workdir) / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)


def _empty_deleting(directory: Path) -> None:
    # Called only when no save of this manager is running, and on process 0 alone (the
    # one orbax deletes on), so nothing is being renamed into .deleting/ meanwhile.
    for entry in sorted((directory / DELETING).glob("*")):
        shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):
        (directory / DELETING).rmdir()


# Orbax's reports, from its background threads, of a write that failed: the run gets
# the same failure as one line at its next save or at the end (``wait_until_finished``).
_BACKGROUND_FAILURE = ("_SignalingThread.run() raised an exception",
                       "in background save thread", "Save Finalize thread")


def _one_line(record: logging.LogRecord) -> bool:
    """Drops orbax's background threads' reports of a failed write, and asyncio's notes
    of that write's futures nobody awaited (a full disk left one per array, two lines
    each): the failure itself reaches the run as one line
    (``_Manager.wait_until_finished``). Orbax's other errors keep their message, not
    their pages of traceback."""
    message = record.getMessage()
    if record.name == "asyncio" and "exception was never retrieved" in message and any(
            word in message for word in ("orbax", "OCDBT", "tensorstore")):
        return False
    from_orbax = "orbax" in (record.pathname or "") or "orbax" in message
    if from_orbax and any(words in message for words in _BACKGROUND_FAILURE):
        return False
    if record.exc_info and from_orbax:
        record.exc_info, record.exc_text = None, None
    return True


for _name in ("absl", "asyncio"):  # asyncio: its writes' futures nobody awaited
    logging.getLogger(_name).addFilter(_one_line)


def _closed_loop(unraisable) -> bool:
    """True for TensorStore's callbacks into the event loop of a write orbax gave up
    on: Python prints each, a 6-line 'Event loop is closed' traceback with no owner,
    dozens of them after a full disk."""
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback \
        else []
    return (unraisable.object is None and type(unraisable.exc_value) is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"
            and any(frame.name == "call_soon_threadsafe" for frame in frames))


def _quiet_failed_writes() -> None:
    """Keeps a failed background write to the one line the run reports: installed by
    the first writing manager, not at import (importing changes nothing)."""
    if getattr(sys.unraisablehook, "unet_jax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop(unraisable):
            previous(unraisable)

    hook.unet_jax = True
    sys.unraisablehook = hook
    # The same write's coroutines, collected unawaited as the interpreter exits.
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message="coroutine 'async_serialize_from_host")


def checkpoint_manager(run_dir, keep: int = 2, read_only: bool = False,
                       asynchronous: bool = True) -> ocp.CheckpointManager:
    """A manager for ``RUN_DIR/checkpoints`` keeping the last ``keep`` and the best.

    ``read_only`` (predict, evaluate) never creates, changes or deletes anything.
    ``asynchronous`` saves write in the background (see ``save``).
    """
    keep_policy = policies.AnyPreservationPolicy([
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1),
    ])
    directory = Path(run_dir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep_policy, best_fn=lambda m: m[BEST_METRIC],
        best_mode="max", read_only=read_only, create=not read_only,
        # Spelled out for a read-only manager, which orbax would otherwise warn about.
        save_interval_steps=0 if read_only else 1,
        todelete_subdir=None if read_only else DELETING,
        enable_async_checkpointing=asynchronous)
    # orbax logs a note for every read-only manager that its directory is read only.
    quiet = lambda record: not record.getMessage().startswith("Given directory is read only")  # noqa: E731
    absl = logging.getLogger("absl")
    absl.addFilter(quiet)
    try:
        manager = _Manager(directory, options=options)
    finally:
        absl.removeFilter(quiet)
    manager.deletes = not read_only and jax.process_index() == 0
    if not read_only:
        _quiet_failed_writes()
    if manager.deletes:
        _empty_deleting(directory)  # left by a run killed while removing them
    return manager


def save(manager: ocp.CheckpointManager, epoch: int, state: TrainState, progress: dict,
         metrics: dict) -> None:
    """Saves ``state`` as checkpoint ``epoch``; ``metrics`` must hold ``val_dice``.

    Asynchronous: returns once the arrays are copied off the device, and writes in the
    background while training goes on; ``manager.wait_until_finished()`` or ``close()``
    waits for it.
    """
    items = dict(params=ocp.args.StandardSave(state.params),
                 opt_state=ocp.args.StandardSave(state.opt_state),
                 progress=ocp.args.JsonSave(progress))
    if state.ema_params is not None:
        items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    manager.save(epoch, args=ocp.args.Composite(**items),
                 metrics={k: float(v) for k, v in metrics.items()})


# --- Restoring, and telling a damaged checkpoint from one that does not fit -----------

class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read; callers may fall back to another."""


_RESTORE_LOCK = threading.Lock()


def _restore(manager: ocp.CheckpointManager, epoch: int, items: dict,
             config: Config | None = None) -> dict:
    """``manager.restore`` of the ``items`` of checkpoint ``epoch``.

    First the checkpoint's own metadata is compared with what ``config`` builds
    (``_misfit``): parameters of other shapes are the wrong settings, not damage, and
    no other checkpoint of the run would fit either. After that, whatever the restore
    raises (orbax and TensorStore raise many kinds for a truncated or missing file)
    is damage: one DamagedCheckpoint naming the checkpoint.
    """
    path = Path(manager.directory) / str(epoch)
    what = f"its {next(iter(items))}" if len(items) == 1 else "it"
    for name in items:  # before any read: see _missing_data_file
        missing = _missing_data_file(path / name)
        if missing:
            raise DamagedCheckpoint(f"{path} is damaged ({what} cannot be read: its data "
                                    f"file {missing} is missing)")
    weights = "params" if "params" in items else next(iter(items))
    with _RESTORE_LOCK, _reads_finish_before_loops_close():  # the metadata's reads too
        misfit = _misfit(path / weights, items[weights], config)
        if not misfit:
            try:
                return manager.restore(epoch, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 (see above)
                error = e
    if misfit:
        raise CheckpointError(f"{path} does not fit the run's settings ({misfit}); "
                              "restore the run's config.json, or pass the run directory "
                              "this checkpoint belongs to")
    inner = error
    while inner.__cause__ or inner.__context__:
        inner = inner.__cause__ or inner.__context__
    message = _clipped((str(inner).strip().splitlines() or [type(inner).__name__])[0], 200)
    raise DamagedCheckpoint(f"{path} is damaged ({what} cannot be read: {message})") from error


def _clipped(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word's end, marked with "...":
    a library's message quoted in one line, readable where it is cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 4]
    space = cut.rfind(" ")
    if space > len(cut) - 20:  # a word's end near the limit; else a long path, cut as is
        cut = cut[:space]
    return cut.rstrip(" ,;:") + " ..."


def _missing_data_file(item_dir: Path) -> Path | None:
    """The first data file that an item's OCDBT manifest names and the disk lacks.

    The manifest names its data files in plain text (``d/<32 hex digits>``). When one
    is gone (a copy that left out a folder), TensorStore fails every array's open at
    once, and orbax closes its event loop under the reads still answering: tracebacks
    follow the error. Checked first, such damage is named without them; a manifest
    that names no file this way leaves the check to the restore.
    """
    try:
        names = set(re.findall(rb"d/[0-9a-f]{32}", (item_dir / "manifest.ocdbt").read_bytes()))
    except OSError:
        return None
    for name in sorted(names):
        if not (item_dir / name.decode()).is_file():
            return item_dir / name.decode()
    return None


def _misfit(params_dir: Path, target, config: Config | None) -> str | None:
    """Why the parameters saved in ``params_dir`` cannot restore into ``target``
    (shapes or names differ), naming the settings that differ where they can be read
    off the saved shapes; None if they fit, or if the metadata cannot be read (a
    restore then tells whether the files are intact)."""
    try:
        saved = _shapes(ocp.StandardCheckpointHandler().metadata(params_dir))
    except Exception:  # noqa: BLE001 (no or unreadable metadata: let the restore decide)
        return None
    wanted = _shapes(target.item if hasattr(target, "item") else target)
    unlike = _unlike(saved, wanted, config)
    if unlike is None:
        return None
    kind, theirs, ours = unlike
    if kind == "settings":
        return f"it was trained with {theirs}; config.json says {ours}"
    return f"parameter {theirs} in it, {ours} for the run's settings"


def _unlike(saved: dict, wanted: dict, config: Config | None):
    """None where parameter shapes ``saved`` are ``wanted`` (``_shapes``); else
    ("settings", theirs, the config's): the model settings that differ, where the
    saved shapes reveal them; or ("parameter", "<name> is <shape>", wanted shape)."""
    if saved == wanted:
        return None
    inferred = _settings_of(saved) if config is not None else {}
    differ = [name for name, value in inferred.items() if getattr(config, name) != value]
    if differ:
        return ("settings", " and ".join(f"{flag(n)} {shown(inferred[n])}" for n in differ),
                " and ".join(f"{flag(n)} {shown(getattr(config, n))}" for n in differ))
    name = sorted(set(saved) ^ set(wanted) or
                  [k for k in saved if saved[k] != wanted[k]])[0]
    return ("parameter", f"{name} is {saved.get(name, 'absent')}",
            str(wanted.get(name, "absent")))


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _settings_of(shapes: dict) -> dict:
    """The model settings that parameter shapes reveal: width, depth, channels,
    classes, separable convolutions and attention gates (see ``models.UNet``)."""
    separable = any("depthwise" in k for k in shapes)
    first = "['down_1']['conv']['conv1']" + ("['depthwise']" if separable else "")
    out = "['down_1']['conv']['conv1']" + ("['pointwise']" if separable else "")
    settings = {"depth": len({k.split("]")[0] for k in shapes if k.startswith("['down_")}),
                "separable": separable,
                "attention": any("['attention']" in k for k in shapes)}
    with contextlib.suppress(KeyError, IndexError):
        settings["in_channels"] = shapes[first + "['kernel']"][-1 if separable else -2]
        settings["base_features"] = shapes[out + "['bias']"][0]
        settings["num_classes"] = shapes["['head']['bias']"][0]
    return settings


@contextlib.contextmanager
def _reads_finish_before_loops_close():
    """Orbax restores in a fresh asyncio loop and closes it at the first failed read
    while TensorStore's other reads go on: pages of "Event loop is closed" follow the
    one-line error. Loops made in this thread meanwhile first let their tasks end, and
    a closed loop drops the callbacks TensorStore still hands it (reads of a missing
    file answer after the loop is gone) instead of raising in TensorStore's threads,
    as nothing waits for them any more: during the restore, and after a failed one
    for the rest of the process, since its reads may answer later still."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # loop policies: 3.14
        policy = asyncio.get_event_loop_policy()
    thread, new_loop = threading.get_ident(), policy.new_event_loop

    def new_event_loop():
        loop = new_loop()
        if threading.get_ident() == thread:
            close = loop.close

            def drain_then_close():
                pending = [] if loop.is_closed() or loop.is_running() else asyncio.all_tasks(loop)
                if pending:
                    done, _ = loop.run_until_complete(asyncio.wait(pending, timeout=120))
                    for task in done:  # their errors are the one already raised
                        if not task.cancelled():
                            task.exception()
                close()

            loop.close = drain_then_close
        return loop

    base = asyncio.BaseEventLoop
    call_soon_threadsafe = base.call_soon_threadsafe

    def call_unless_closed(loop, *args, **kwargs):
        return None if loop.is_closed() else call_soon_threadsafe(loop, *args, **kwargs)

    policy.new_event_loop = new_event_loop
    base.call_soon_threadsafe = call_unless_closed
    # The reads' own errors (the one about to be raised, once per array) are not logged
    # again: a read's task can be collected, and logged, while the failure is still
    # unwinding through orbax, before this function sees it.
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(_not_a_failed_read)
    try:
        yield
    finally:
        del policy.new_event_loop  # back to the class's method
    # Reached after a successful restore only. The reads of a failed one may answer
    # after it has raised: the closed loops keep dropping their callbacks, and the
    # filter stays, for the rest of the process.
    base.call_soon_threadsafe = call_soon_threadsafe
    asyncio_log.removeFilter(_not_a_failed_read)


def _not_a_failed_read(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" of an orbax read
    (its coroutine or TensorStore's error names it, depending on the versions)."""
    message = record.getMessage()
    return not ("exception was never retrieved" in message and any(
        mark in message for mark in ("async_deserialize", "tensorstore_spec", "OCDBT")))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _state_items(state: TrainState) -> dict:
    items = dict(params=ocp.args.StandardRestore(_abstract(state.params)),
                 opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
                 progress=ocp.args.JsonRestore())
    if state.ema_params is not None:
        items["ema_params"] = ocp.args.StandardRestore(_abstract(state.ema_params))
    return items


def restore_state(manager: ocp.CheckpointManager, state: TrainState, epoch: int | None = None,
                  config: Config | None = None):
    """(state, progress) from checkpoint ``epoch`` (latest by default).

    ``state`` is a freshly created TrainState (or its ``jax.eval_shape``); it gives the
    structure, shapes and shardings to restore into; ``config``, the settings it was
    made from, lets a checkpoint that does not fit name the setting that differs. A
    damaged checkpoint raises DamagedCheckpoint.
    """
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    items = _state_items(state)
    restored = _restore(manager, epoch, items, config)
    progress = dict(restored["progress"])
    step = progress["step"]
    if isinstance(state.step, jax.Array):
        # The step as the caller placed it (replicated, weakly typed), not a Python int:
        # that traced the train step anew, and its first result once more.
        step = state.step * 0 + step
    state = state.replace(params=restored["params"], opt_state=restored["opt_state"],
                          step=step,
                          ema_params=restored["ema_params"] if "ema_params" in items else None)
    return state, progress


def restore_latest_intact(manager: ocp.CheckpointManager, state: TrainState,
                          config: Config | None = None):
    """(state, progress, epoch, damaged epochs) from the newest checkpoint that reads.

    What ``--resume`` uses: a checkpoint damaged after it was written costs the epochs
    since the previous one, not the run. The damaged checkpoints newer than the one
    returned are moved to ``checkpoints/damaged/<epoch>-<time>`` (kept, not deleted),
    since the resumed run saves those epochs again. The caller reports them, e.g.
    "resuming from epoch 2 (checkpoint 3 is damaged)". No intact checkpoint (or none
    at all) raises CheckpointError.
    """
    damaged = []
    for epoch in sorted(manager.all_steps(), reverse=True):
        try:
            restored, progress = restore_state(manager, state, epoch, config)
        except DamagedCheckpoint as e:
            log.debug("%s", e)
            damaged.append(epoch)
            continue
        if damaged:
            _set_aside(manager, damaged)
        return restored, progress, epoch, sorted(damaged)
    if not damaged:
        raise CheckpointError(f"--resume: {manager.directory} holds no checkpoint; drop "
                              "--resume to start a new run")
    if not any((Path(manager.directory) / str(epoch) / "opt_state").exists()
               for epoch in damaged):  # save_params' weights, not a damaged run
        raise CheckpointError(
            f"--resume: {Path(manager.directory).parent} holds weights alone (imported, "
            "or saved by save_params), without the optimizer state a training run "
            "continues from; predict, evaluate and export use them as they are, and "
            f"a new run in another --workdir trains on from them with --init-from "
            f"{Path(manager.directory).parent}")
    raise CheckpointError(f"--resume: every checkpoint in {manager.directory} is damaged "
                          f"(epochs {', '.join(map(str, sorted(damaged)))}); start a new "
                          "run in another --workdir")


def _set_aside(manager: ocp.CheckpointManager, epochs: list[int]) -> None:
    directory = Path(manager.directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for epoch in epochs:
        try:
            (directory / DAMAGED).mkdir(exist_ok=True)
            (directory / str(epoch)).rename(directory / DAMAGED / f"{epoch}-{stamp}")
        except OSError as e:
            raise CheckpointError(f"--resume: cannot move the damaged checkpoint "
                                  f"{directory / str(epoch)} aside ({e.strerror or e}); move "
                                  "it out of the run directory and resume again") from None
    manager.reload()


def _run_dir_hint(given) -> str:
    """Why ``given`` is not a run directory and which is: a file or a folder inside a
    run (its checkpoints/, one checkpoint) names the run above it."""
    given = Path(given)
    for above in list(given.parents)[:3]:
        if (above / "config.json").is_file():
            if given.parent == above / "checkpoints" and given.name.isdigit():
                return (f"it is checkpoint {given.name} of the run {above}; pass that, "
                        f"with --epoch {given.name}")
            return f"it is inside the run {above}; pass that"
    if given.is_file() and given.suffix in (".pth", ".pt"):
        return ("it is a PyTorch weights file; weights the guide's notebook saved become a "
                "run directory with python -m experiments.import_torch")
    if given.is_file():
        return "it is a file; pass the directory that experiments.train wrote"
    try:  # a folder of runs (runs/, where train puts them by default)
        runs = [d for d in given.iterdir() if (d / "config.json").is_file()]
    except OSError:
        runs = []
    if runs:
        newest = max(runs, key=lambda d: (d / "config.json").stat().st_mtime)
        return (f"it is a folder of {len(runs)} run(s); pass one of them, such as the "
                f"newest, {newest}")
    return "it has no config.json (pass the directory that experiments.train wrote)"


def load_config(run_dir) -> Config:
    """The Config a run directory was made with (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).exists():
        raise CheckpointError(f"{run_dir}: no such directory (pass the run directory that "
                              "experiments.train wrote)")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: {_run_dir_hint(run_dir)}")
    try:
        return Config.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); restore it from the run's "
                              "settings or a copy") from None
    except ConfigError as e:  # a value edited by hand: named as the file's, not a flag's
        raise CheckpointError(f"{path} holds a setting unet-jax refuses ({e}); restore "
                              "the file from the run's settings or a copy") from None


def _candidates(manager: ocp.CheckpointManager, which) -> list[int]:
    """The epochs to try for ``which``, in order: 'best' falls back to the next best
    (then the newest) when the best is damaged; 'latest' and a number name one."""
    steps = manager.all_steps()
    if which == "best":
        scores = {}
        for step in steps:
            metrics = manager.metrics(step)  # None where damaged: ranked last
            if metrics is not None:
                scores[step] = float(metrics[BEST_METRIC])
        ranked = sorted(scores, key=lambda s: (-scores[s], -s))
        return ranked + sorted(set(steps) - set(ranked), reverse=True)
    if which == "latest":
        return [manager.latest_step()]
    try:
        epoch = int(which)
    except (TypeError, ValueError):
        raise CheckpointError(f"--epoch {which!r}: give 'best', 'latest' or an epoch "
                              "number") from None
    if epoch not in steps:
        raise CheckpointError(f"--epoch {epoch}: {Path(manager.directory)} has no "
                              f"checkpoint for it; it has {', '.join(map(str, steps))}")
    return [epoch]


def restore_params(run_dir, which: str | int = "best"):
    """(params, config, epoch) of a run directory, without the optimizer state: the
    averaged weights of a run trained with ``--ema`` (``optim.weights_name``), the
    trained ones otherwise.

    ``which`` is 'best' (highest validation Dice), 'latest' or an epoch number. A
    damaged best checkpoint falls back to the next best (a one-line warning on this
    module's logger names both); a damaged checkpoint asked for by name raises
    CheckpointError naming the intact ones, as does a directory without config.json
    or checkpoints, or an epoch it does not have.
    """
    config = load_config(run_dir)
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} holds no checkpoint (no checkpoints/ directory)")
    # A run still training removes its older checkpoints as it saves new ones: one
    # gone between the listing and the reading is looked for again, never called damaged.
    for _ in range(3):
        try:
            return _restore_params(run_dir, config, which)
        except _Removed:
            pass
    raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: its checkpoints were removed "
                          "as they were read (by a run still training there?); try again")


class _Removed(Exception):
    """A checkpoint was removed as it was read (by the run that wrote it, keeping its
    newest): the listing it came from is out of date."""


def _restore_params(run_dir, config: Config, which):
    """``restore_params`` from one listing of the run's checkpoints."""
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        if not manager.all_steps():
            raise CheckpointError(f"{Path(run_dir) / 'checkpoints'} holds no checkpoint")
        # Onto this process's first device, whatever devices the run trained on: with
        # no sharding given, orbax reuses the saved one, and a run trained on two
        # devices failed to restore on a machine with one.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
            jax.eval_shape(lambda: init_params(jax.random.key(0), config)))
        weights = _WEIGHTS[weights_name(config)]
        items = {weights: ocp.args.StandardRestore(abstract)}
        errors = []
        for epoch in _candidates(manager, which):
            try:
                restored = _restore(manager, epoch, items, config)
            except DamagedCheckpoint as e:
                if not (Path(manager.directory) / str(epoch)).exists():
                    raise _Removed from None  # rotated out meanwhile: list them again
                errors.append(str(e))
                continue
            if errors:
                log.warning("%s; using the next best, epoch %d", "; ".join(errors), epoch)
            return restored[weights], config, epoch
        intact = [s for s in manager.all_steps() if _readable(manager, s, items)]
        hint = (f"intact checkpoints: {', '.join(map(str, intact))} — pass --epoch "
                f"{intact[-1]}" if intact else "no intact checkpoint is left")
        raise CheckpointError(f"{errors[0]}; {hint}")
    finally:
        manager.close()


def _readable(manager, epoch, items) -> bool:
    try:
        _restore(manager, epoch, items)
    except DamagedCheckpoint:
        return False
    return True


def save_params(run_dir, params, config: Config, metrics: dict | None = None,
                epoch: int = 0) -> Path:
    """Writes a run directory holding ``params`` alone (for imported weights).

    predict and evaluate accept it like any training run's directory. Everything is
    written into a hidden sibling directory first and moved into place when complete,
    so a failure (or a kill) never leaves a half run directory; one that already holds
    a run raises RunDirError. ``params`` must be the U-Net's parameters for ``config``
    (``state.params``, not the whole TrainState), and ``config`` a run without
    ``ema`` (the weights saved are the ones predict reads): anything else is a
    CheckpointError here, rather than a run that predict cannot load.
    """
    if config.ema:
        raise CheckpointError(f"--ema {config.ema:g}: save_params writes one set of "
                              "weights, read as the raw ones; pass a config with ema=0 "
                              "(dataclasses.replace(config, ema=0.0))")
    if hasattr(params, "params") or (isinstance(params, dict) and set(params) == {"params"}):
        raise CheckpointError("params holds a train state or {'params': ...}; pass the "
                              "parameters alone (state.params)")
    wanted = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    unlike = _unlike(_shapes(params), _shapes(wanted), config)
    if unlike is not None:
        kind, theirs, ours = unlike
        why = (f"they are a U-Net's with {theirs}, the config says {ours}" if kind ==
               "settings" else f"{theirs} in them, {ours} for the config")
        raise CheckpointError(f"params do not fit the config's U-Net ({why}); pass the "
                              "config that built them")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file; choose a directory for the run")
    rundir.check_start(run_dir, resume=False, what="run_dir", resumable=False)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.",
                                        suffix=".tmp"))
    except OSError as e:
        raise rundir.RunDirError(f"{run_dir}: cannot create it ({e.strerror or e}); choose "
                                 "a writable place for the run directory") from None
    try:
        # Synchronous: a save that fails asynchronously went on creating directories
        # in the background (into the staging directory just removed) and left a
        # thread waiting minutes for a signal that never came.
        manager = checkpoint_manager(staging, asynchronous=False)
        try:
            manager.save(epoch, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                progress=ocp.args.JsonSave({"epoch": epoch, "step": 0, "history": []}),
            ), metrics={BEST_METRIC: float((metrics or {}).get(BEST_METRIC, 0.0))})
            manager.wait_until_finished()
        finally:
            manager.close()
        (staging / "config.json").write_text(config.to_json())
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the run from other users
        if run_dir.exists():  # an empty (or unrelated) directory: move the run into it
            (staging / "checkpoints").rename(run_dir / "checkpoints")
            (staging / "config.json").rename(run_dir / "config.json")
        else:
            staging.rename(run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run_dir
