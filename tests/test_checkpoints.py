"""Checkpoints: damaged ones are one line and fall back to intact ones; a killed save
never leaves a checkpoint listed as complete; save_params writes all or nothing.

The states are random values in the shapes of ``create_train_state`` (its
``jax.eval_shape``): compiling the real initialisation takes half a minute on a
2-core CPU, and the values only have to tell one checkpoint from another.
"""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from unet_jax import checkpoints, rundir  # noqa: E402
from unet_jax.checkpoints import CheckpointError  # noqa: E402
from unet_jax.config import Config  # noqa: E402
from unet_jax.train import TrainState, create_train_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Config(base_features=4, depth=2, image_size=(32, 48))
SCORES = {1: 0.5, 2: 0.9, 3: 0.7}  # best: 2, then 3, then 1
DAMAGE = ("truncate", "delete", "manifest")  # each makes the params unreadable


def random_state(config: Config, seed: int):
    abstract = jax.eval_shape(lambda: create_train_state(jax.random.key(0), config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype)), abstract)


def params_of(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(params_of(a), params_of(b), strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with checkpoints 1, 2, 3 (validation Dice in SCORES), and the
    parameters saved in each."""
    run = tmp_path_factory.mktemp("saved") / "run"
    run.mkdir()
    (run / "config.json").write_text(CONFIG.to_json())
    manager = checkpoints.checkpoint_manager(run, keep=3)
    states = {}
    for epoch, dice in SCORES.items():
        states[epoch] = random_state(CONFIG, epoch)
        checkpoints.save(manager, epoch, states[epoch],
                         {"epoch": epoch, "step": epoch, "history": []}, {"val_dice": dice})
    manager.close()
    return run, states


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved run, to damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "run"))


def damage(run: Path, epoch: int, kind: str) -> None:
    """Truncates half of the largest array file of checkpoint ``epoch``'s params,
    deletes it, or deletes the params' OCDBT root (``manifest.ocdbt``) or orbax's
    ``_METADATA``."""
    params = run / "checkpoints" / str(epoch) / "params"
    data = max((f for f in params.rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)
    if kind == "truncate":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif kind == "delete":
        data.unlink()
    elif kind == "manifest":
        (params / "manifest.ocdbt").unlink()
    else:
        (params / "_METADATA").unlink()


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text and "TensorStore({" not in text
    return text


# --- Intact runs ----------------------------------------------------------------------

def test_restore_params_picks_best_latest_or_an_epoch(run, saved):
    states = saved[1]
    params, config, epoch = checkpoints.restore_params(run)
    assert (epoch, config) == (2, CONFIG) and same(params, states[2].params)
    assert checkpoints.restore_params(run, "latest")[2] == 3
    params, _, epoch = checkpoints.restore_params(run, "1")
    assert epoch == 1 and same(params, states[1].params)
    with pytest.raises(CheckpointError, match=r"--epoch 7: .* has no checkpoint for it; it has 1, 2, 3"):
        checkpoints.restore_params(run, 7)
    with pytest.raises(CheckpointError, match="--epoch 'newest': give 'best', 'latest'"):
        checkpoints.restore_params(run, "newest")


def test_a_failed_background_write_is_one_line(run, monkeypatch):
    """A full disk during a save ended a run with about 1,200 lines of orbax and
    TensorStore traceback and exit 1."""
    import orbax.checkpoint as ocp

    def full(self):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\"\n"
                         "[source locations='tensorstore/...']\n")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full)
    manager = checkpoints.checkpoint_manager(run, keep=3)
    with pytest.raises(CheckpointError) as e:
        manager.wait_until_finished()
    assert one_line(e.value) == (
        f"a checkpoint could not be written in {run / 'checkpoints'} (ValueError: "
        'RESOURCE_EXHAUSTED: Error writing local file "x"); free space or fix the disk, '
        "then continue with --resume: the checkpoints before it are intact")
    # Orbax names a failed save at the next one, an epoch later: it is named by its own.
    failing = []
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                        lambda self: full(self) if failing else None)
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, step, **kw: True)
    manager.save(4, args=None)
    failing.append(True)  # epoch 4's background write fails
    with pytest.raises(CheckpointError, match="^the checkpoint of epoch 4 could not be "
                                              "written in "):
        manager.save(5, args=None)
    monkeypatch.undo()
    manager.close()
    # orbax's background threads log their failures with tracebacks: the messages stay;
    # another library's traceback is left alone.
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        failure = sys.exc_info()
    for path, kept in (("site-packages/orbax/checkpoint/_src/futures/future.py", False),
                       ("site-packages/other/module.py", True)):
        record = logging.LogRecord("absl", logging.ERROR, path, 1, "[process=0] Failed to "
                                   "run 6 Handler Commit operations", (), failure)
        assert checkpoints._one_line(record)  # the message is kept
        assert (record.exc_info is not None) is kept
    assert checkpoints._one_line in logging.getLogger("absl").filters
    # asyncio's note of each failed write's future, which nobody awaited: dropped.
    note = logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1,
                             "Task exception was never retrieved\nfuture: <Task "
                             "exception=ValueError('RESOURCE_EXHAUSTED: Error writing "
                             "\"x\" in OCDBT database')>", (), None)
    assert not checkpoints._one_line(note)
    other = logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1,
                              "Task exception was never retrieved\nfuture: <Task "
                              "exception=KeyError('mine')>", (), None)
    assert checkpoints._one_line(other)  # another library's: kept


def test_a_failed_background_write_leaves_no_other_output(run, monkeypatch, capsys):
    """A full disk at epoch 3 of a tiny run printed, around the one-line error, 8
    lines of orbax's background threads' errors, up to 39 six-line 'Event loop is
    closed' tracebacks and a 'coroutine was never awaited' warning."""
    import asyncio
    import types

    for words in ("[process=0][thread=array_type_handler][operation_id=3] "
                  "_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED: ...",
                  "[process=0] Failed to run 6 Handler Commit operations or the Commit "
                  "callback in background save thread, directory: /x/checkpoints/3",
                  "[process=0][thread=MainThread][step=3][wait_until_finished] Save "
                  "Finalize thread (save_finalize) failed."):
        record = logging.LogRecord("absl", logging.ERROR, "site-packages/orbax/checkpoint/"
                                   "_src/futures/future.py", 1, words, (), None)
        assert not checkpoints._one_line(record)
    other = logging.LogRecord("absl", logging.ERROR, "site-packages/orbax/checkpoint/"
                              "_src/checkpoint_manager.py", 1, "Some other failure", (), None)
    assert checkpoints._one_line(other)

    passed = []
    previous = passed.append  # the hook before unet-jax's: what it hands on
    monkeypatch.setattr(sys, "unraisablehook", previous)
    checkpoints.checkpoint_manager(run, keep=3, read_only=True).close()
    assert sys.unraisablehook is previous  # a reader changes nothing
    checkpoints.checkpoint_manager(run, keep=3).close()
    checkpoints.checkpoint_manager(run, keep=3).close()  # a second manager: one hook
    loop = asyncio.new_event_loop()
    loop.close()
    try:  # what TensorStore's callback does once orbax gave the write up
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    try:
        raise RuntimeError("Event loop is closed")  # not asyncio's
    except RuntimeError as e:
        mine = e
    unraisable = lambda error, owner=None: types.SimpleNamespace(  # noqa: E731
        exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__,
        err_msg=None, object=owner)
    for error, owner in ((closed, None), (mine, None), (closed, "an object")):
        sys.unraisablehook(unraisable(error, owner))
    assert [(u.exc_value, u.object) for u in passed] == [(mine, None),
                                                         (closed, "an object")]
    with warnings.catch_warnings(record=True) as seen:  # the write's, at exit
        warnings.warn("coroutine 'async_serialize_from_host.<locals>.write_fragment' "
                      "was never awaited", RuntimeWarning)
        warnings.warn("coroutine 'mine' was never awaited", RuntimeWarning)
    assert [str(w.message) for w in seen] == ["coroutine 'mine' was never awaited"]


def test_a_checkpoint_removed_while_it_is_read_is_not_called_damaged(run, monkeypatch,
                                                                      caplog):
    """predict on a run still training: the run removed its oldest checkpoint between
    predict's listing and its reading, and predict called it damaged (exit 2)."""
    real = checkpoints._restore

    def rotated(manager, epoch, items, config=None):
        if epoch == 3 and (run / "checkpoints" / "3").exists():
            shutil.rmtree(run / "checkpoints" / "3")
            raise checkpoints.DamagedCheckpoint(f"{run}/checkpoints/3 is damaged (not found)")
        return real(manager, epoch, items, config)

    monkeypatch.setattr(checkpoints, "_restore", rotated)
    with caplog.at_level("WARNING"):
        _, _, epoch = checkpoints.restore_params(run, "latest")
    assert epoch == 2 and "damaged" not in caplog.text


def test_a_damaged_config_is_one_line(run):
    (run / "config.json").write_text('{"base_features": 4, "dep')
    with pytest.raises(CheckpointError, match=r"config.json is damaged") as e:
        checkpoints.restore_params(run)
    one_line(e.value)


# --- Damaged checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_the_intact_ones(run, kind):
    damage(run, 3, kind)
    with pytest.raises(CheckpointError) as e:
        checkpoints.restore_params(run, "latest")
    text = one_line(e.value)
    assert text.startswith(f"{(run / 'checkpoints' / '3').absolute()} is damaged (its params "
                           "cannot be read: ")
    assert text.endswith("intact checkpoints: 1, 2 — pass --epoch 2")


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_best_falls_back_to_the_next_best_with_a_warning(run, saved, kind, caplog):
    damage(run, 2, kind)
    with caplog.at_level(logging.WARNING, logger="unet_jax.checkpoints"):
        params, _, epoch = checkpoints.restore_params(run, "best")
    assert epoch == 3 and same(params, saved[1][3].params)
    [record] = [r for r in caplog.records if r.name == "unet_jax.checkpoints"]
    warning = one_line(record.getMessage())
    assert f"{Path('checkpoints') / '2'} is damaged" in warning
    assert warning.endswith("using the next best, epoch 3")


@pytest.mark.parametrize("scores", ['{"val_di', "{}", '{"val_dice": NaN}', "[0.9]", None])
def test_damaged_scores_rank_their_checkpoint_last_and_stop_nothing(run, saved, scores,
                                                                     caplog):
    """Orbax reads every checkpoint's scores as a manager opens: one file it could not
    parse stopped predict, evaluate and --resume with a JSON traceback. A missing one
    (None) made 'best' another epoch without a word."""
    if scores is None:
        shutil.rmtree(run / "checkpoints" / "2" / "metrics")
    else:
        (run / "checkpoints" / "2" / "metrics" / "metrics").write_text(scores)
    with caplog.at_level(logging.WARNING, logger="unet_jax.checkpoints"):
        params, _, epoch = checkpoints.restore_params(run, "best")
    assert epoch == 3 and same(params, saved[1][3].params)  # 2 ranks last, params intact
    [record] = [r for r in caplog.records if r.name == "unet_jax.checkpoints"]
    warning = one_line(record.getMessage())
    assert str(Path("checkpoints") / "2" / "metrics") in warning
    assert warning.endswith("it ranks last for 'best'")
    assert checkpoints.restore_params(run, "2")[2] == 2
    manager = checkpoints.checkpoint_manager(run, keep=3)  # what --resume opens
    try:
        assert checkpoints.restore_latest_intact(manager, random_state(CONFIG, 9))[2] == 3
    finally:
        manager.close()


def test_a_missing_metadata_file_is_no_damage(run, saved):
    """Orbax's _METADATA describes the tree, which the restore target gives as well:
    the arrays themselves (the OCDBT files) restore exactly without it."""
    damage(run, 3, "metadata")
    params, _, epoch = checkpoints.restore_params(run, "latest")
    assert epoch == 3 and same(params, saved[1][3].params)
    manager = checkpoints.checkpoint_manager(run, keep=3)
    try:
        state, _, epoch, damaged = checkpoints.restore_latest_intact(
            manager, random_state(CONFIG, 99))
    finally:
        manager.close()
    assert (epoch, damaged) == (3, []) and same(state.params, saved[1][3].params)


def test_a_run_trained_on_more_devices_restores_on_one(tmp_path):
    """Without a sharding in the target orbax reuses the saved one: parameters saved
    replicated over 2 devices failed ("damaged") on a machine with 1."""
    script = textwrap.dedent("""
        import shutil, sys
        from pathlib import Path
        import jax, numpy as np
        from unet_jax import checkpoints
        from unet_jax.config import Config
        from unet_jax.train import create_train_state

        run = Path(sys.argv[1])
        config = Config(base_features=4, depth=2, image_size=(32, 48))
        run.mkdir()
        (run / "config.json").write_text(config.to_json())
        abstract = jax.eval_shape(lambda: create_train_state(jax.random.key(0), config))
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(lambda s: jax.device_put(np.ones(s.shape, s.dtype), replicated),
                             abstract)
        manager = checkpoints.checkpoint_manager(run)
        checkpoints.save(manager, 1, state, {"epoch": 1, "step": 1, "history": []},
                         {"val_dice": 0.5})
        manager.close()
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=ROOT,
                   check=True, capture_output=True, timeout=300, env=env)
    params, _, epoch = checkpoints.restore_params(tmp_path / "run")
    assert epoch == 1 and all((x == 1).all() for x in params_of(params))
    assert {d for x in jax.tree.leaves(params) for d in x.devices()} == {jax.local_devices()[0]}


def test_every_checkpoint_damaged(run):
    for epoch in SCORES:
        damage(run, epoch, "truncate")
    with pytest.raises(CheckpointError, match="no intact checkpoint is left") as e:
        checkpoints.restore_params(run)
    one_line(e.value)


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_skips_a_damaged_newest_checkpoint(run, saved, kind):
    damage(run, 3, kind)
    manager = checkpoints.checkpoint_manager(run, keep=3)
    try:
        fresh = random_state(CONFIG, 99)
        state, progress, epoch, damaged = checkpoints.restore_latest_intact(manager, fresh)
        assert (epoch, damaged, progress["epoch"], int(state.step)) == (2, [3], 2, 2)
        assert same(state.params, saved[1][2].params)
        assert same(state.opt_state, saved[1][2].opt_state)
        # The damaged checkpoint is kept aside, and the resumed run can save epoch 3.
        [aside] = (run / "checkpoints" / checkpoints.DAMAGED).iterdir()
        assert aside.name.startswith("3-")
        checkpoints.save(manager, 3, state, {"epoch": 3, "step": 3, "history": []},
                         {"val_dice": 0.8})
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2, 3]
    finally:
        manager.close()


def test_resume_with_every_checkpoint_damaged_is_one_line(run):
    for epoch in SCORES:
        damage(run, epoch, "delete")
    manager = checkpoints.checkpoint_manager(run, keep=3)
    try:
        with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged "
                           r"\(epochs 1, 2, 3\); start a new run") as e:
            checkpoints.restore_latest_intact(manager, random_state(CONFIG, 0))
    finally:
        manager.close()
    one_line(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_our_own_errors_are_not_passed_off_as_damage(run, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(checkpoints, "init_params", broken)
    with pytest.raises(TypeError, match="a bug of ours"):
        checkpoints.restore_params(run)


@pytest.mark.parametrize("damage", ["truncated", "removed", "index truncated",
                                    "index removed"])
def test_a_failed_restore_prints_one_line(tmp_path, damage):
    """When one array fails, orbax closed its event loop with the other reads still
    running: they printed hundreds of lines of 'Event loop is closed' tracebacks after
    the error (seen with arrays of a few MB, hence the wider model here), and asyncio
    logged each read's error again as a task whose exception was never retrieved.
    The checkpoint's top folder d/ holds the index of the arrays: with it damaged or
    gone, every array's open fails at once, the worst case."""
    script = textwrap.dedent("""
        import shutil, sys
        from pathlib import Path
        import jax, numpy as np
        from unet_jax import checkpoints
        from unet_jax.config import Config
        from unet_jax.train import init_params

        run, damage = Path(sys.argv[1]), sys.argv[2]
        config = Config(base_features=32, depth=4, image_size=(32, 48))
        rng = np.random.default_rng(0)
        abstract = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)
        checkpoints.save_params(run, params, config)
        params_dir = run / "checkpoints/0/params"
        files = (params_dir / "d").glob("*") if damage.startswith("index") else [
            max((f for f in params_dir.rglob("*") if f.is_file() and f.parent.name == "d"),
                key=lambda f: f.stat().st_size)]
        for data in list(files):
            if damage.endswith("removed"):
                shutil.rmtree(data.parent, ignore_errors=True)
            else:
                with open(data, "r+b") as f:
                    f.truncate(data.stat().st_size // 2)
        try:
            checkpoints.restore_params(run, "latest")
        except checkpoints.CheckpointError as e:
            sys.stderr.write(f"error: {e}\\n")
            sys.exit(2)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), damage],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert "checkpoints/0 is damaged (its params cannot be read" in lines[-1]
    if damage == "index removed":
        assert "its data file" in lines[-1] and "is missing" in lines[-1]


def test_a_read_collected_while_the_restore_fails_is_not_logged(caplog):
    """A read's task that failed can be collected, and asyncio log its error, while the
    restore's own failure still unwinds through orbax: the one-line error then came
    after a page of traceback (1 run in 25 of the test above)."""
    import asyncio
    import gc

    async def async_deserialize():  # named as orbax's read, which the filter matches
        raise ValueError("Error reading the OCDBT database")

    logger = logging.getLogger("asyncio")
    filters = list(logger.filters)
    try:
        with pytest.raises(ValueError, match="the restore failed"):
            with checkpoints._reads_finish_before_loops_close():
                loop = asyncio.new_event_loop()
                task = loop.create_task(async_deserialize())
                loop.run_until_complete(asyncio.wait([task]))
                loop.close()
                del task
                gc.collect()
                raise ValueError("the restore failed")
    finally:
        logger.filters[:] = filters
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# --- A save killed midway -------------------------------------------------------------

SAVER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from unet_jax import checkpoints
    from unet_jax.train import TrainState

    run, hook = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)

    def tree(n):  # random floats: zstd cannot shrink them, so writing takes a while
        return {f"w{i}": rng.standard_normal(n, dtype=np.float32) for i in range(4)}

    state = TrainState(step=0, apply_fn=None, tx=None, params=tree(1_000_000),
                       opt_state=tree(3_000_000))
    manager = checkpoints.checkpoint_manager(run, keep=1)
    for epoch in (1, 2, 3):
        if epoch == 2:
            print("saving", flush=True)
            if hook == "unlink":  # the first file removed: stop here, to be killed
                unlink = os.unlink
                def stop(*args, **kwargs):
                    unlink(*args, **kwargs)
                    print("removing", flush=True)
                    time.sleep(60)
                os.unlink = stop
            elif hook.startswith("rename"):  # stop inside the write of checkpoint 2
                rename = os.rename
                def stop_at_rename(src, dst, *args, **kwargs):
                    src_path = str(src)
                    item = hook == "rename-item" and "2.orbax-checkpoint-tmp/" in src_path
                    final = hook == "rename-final" and src_path.endswith("2.orbax-checkpoint-tmp")
                    if item or final:
                        print("renaming", flush=True)
                        time.sleep(60)
                    return rename(src, dst, *args, **kwargs)
                os.rename = stop_at_rename
        checkpoints.save(manager, epoch, state, {"epoch": epoch, "step": epoch, "history": []},
                         {"val_dice": epoch / 10})
        manager.wait_until_finished()
    manager.close()
""")


def kill_saver(run: Path, hook: str, wait_for: str, delay: float) -> None:
    """Runs SAVER and kills it with SIGKILL ``delay`` seconds after it prints ``wait_for``."""
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run), hook], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in proc.stdout:
            if line.strip() == wait_for:
                break
        else:
            pytest.fail(f"the saver ended before printing {wait_for!r}")
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def check_listed_checkpoints(run: Path) -> list[int]:
    """Every checkpoint a fresh manager lists is complete: it has orbax's commit marker
    and restores."""
    tree = lambda n: {f"w{i}": jax.ShapeDtypeStruct((n,), np.float32) for i in range(4)}
    state = TrainState(step=0, apply_fn=None, tx=None, params=tree(1_000_000),
                       opt_state=tree(3_000_000))
    manager = checkpoints.checkpoint_manager(run, read_only=True)
    try:
        steps = manager.all_steps()
        for step in steps:
            assert (run / "checkpoints" / str(step) / "commit_success.txt").is_file(), step
            _, progress = checkpoints.restore_state(manager, state, step)
            assert progress["epoch"] == step
    finally:
        manager.close()
    return steps


@pytest.mark.parametrize("hook", ["rename-item", "rename-final"])
def test_a_save_killed_while_writing_is_never_listed(tmp_path, hook):
    """Orbax writes into <epoch>.orbax-checkpoint-tmp and renames it when complete:
    a kill with one item of checkpoint 2 written ("rename-item"), or with all of
    them but before the final rename, leaves checkpoint 1 alone listed."""
    run = tmp_path / "run"
    kill_saver(run, hook, "renaming", 0.0)
    assert "2.orbax-checkpoint-tmp" in {p.name for p in (run / "checkpoints").iterdir()}
    assert check_listed_checkpoints(run) == [1]


def test_a_save_killed_while_removing_an_old_checkpoint_leaves_it_unlisted(tmp_path):
    """Orbax removed the checkpoint the keep policy drops file by file, in place: a
    kill meanwhile left a half-deleted checkpoint 1 that orbax listed as complete. It
    is renamed into checkpoints/.deleting/ first now; the next writing manager
    removes what is left there."""
    run = tmp_path / "run"
    kill_saver(run, "unlink", "removing", 0.0)
    assert check_listed_checkpoints(run) == [2]  # 2 committed: killed while removing 1
    assert (run / "checkpoints" / checkpoints.DELETING / "1").is_dir()
    checkpoints.checkpoint_manager(run).close()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]


# --- save_params ----------------------------------------------------------------------

def test_save_params_writes_a_run_that_restores(tmp_path, saved):
    params = saved[1][1].params
    out = checkpoints.save_params(tmp_path / "imported", params, CONFIG, {"val_dice": 0.4})
    restored, config, epoch = checkpoints.restore_params(out)
    assert (epoch, config) == (0, CONFIG) and same(restored, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"]
    # An empty directory made beforehand is filled; a run is never overwritten.
    (tmp_path / "empty").mkdir()
    checkpoints.save_params(tmp_path / "empty", params, CONFIG)
    assert checkpoints.restore_params(tmp_path / "empty")[2] == 0
    with pytest.raises(rundir.RunDirError, match="^run_dir .* already holds a run; choose "
                       "another run_dir$"):
        checkpoints.save_params(out, params, CONFIG)


def test_save_params_refuses_what_predict_could_not_load(tmp_path, saved):
    """A whole train state, parameters of another U-Net, or a config with --ema had
    been written, and predict then called the new run damaged or "trained with
    --depth 0"."""
    state = saved[1][1]
    for params, config, message in [
            (state, CONFIG, r"holds a train state .* \(state\.params\)$"),
            ({"params": state.params}, CONFIG, r"holds a train state"),
            (state.params, dataclasses.replace(CONFIG, depth=3),
             r"they are a U-Net's with --depth 2, the config says --depth 3\); pass"),
            (state.params, dataclasses.replace(CONFIG, ema=0.99), r"^--ema 0\.99: .* ema=0")]:
        with pytest.raises(CheckpointError, match=message):
            checkpoints.save_params(tmp_path / "run", params, config)
        assert list(tmp_path.iterdir()) == []


def test_resume_of_weights_alone_says_so_not_damaged(tmp_path, saved):
    """A run of imported weights has no optimizer state to continue: --resume called
    its intact checkpoint damaged."""
    out = checkpoints.save_params(tmp_path / "imported", saved[1][1].params, CONFIG)
    manager = checkpoints.checkpoint_manager(out)
    try:
        with pytest.raises(CheckpointError) as e:
            checkpoints.restore_latest_intact(manager, random_state(CONFIG, 0))
    finally:
        manager.close()
    assert one_line(e.value).startswith(f"--resume: {out} holds weights alone")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0"]  # nothing aside


@pytest.mark.parametrize("failing", ["save", "config"])
def test_save_params_leaves_nothing_when_it_fails(tmp_path, saved, monkeypatch, failing):
    params = saved[1][1].params
    if failing == "save":  # orbax cannot serialise the leaf
        params = {**params, "extra": object()}
    else:
        def full(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Config, "to_json", full)
    with pytest.raises(Exception):
        checkpoints.save_params(tmp_path / "imported", params, CONFIG)
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == []


def test_a_tied_best_is_the_epoch_whose_checkpoint_is_kept(tmp_path):
    """orbax's BestN keeps the latest of tied scores; the run's summary names that
    epoch, and restoring 'best' gives it."""
    from unet_jax import trainer

    (tmp_path / "config.json").write_text(CONFIG.to_json())
    manager = checkpoints.checkpoint_manager(tmp_path, keep=1)
    history, states = [], {}
    for epoch, dice in [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.7)]:
        history.append({"epoch": epoch, "val_dice": dice})
        states[epoch] = random_state(CONFIG, epoch)
        checkpoints.save(manager, epoch, states[epoch],
                         {"epoch": epoch, "step": epoch, "history": []}, {"val_dice": dice})
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
    manager.close()
    assert trainer._best(history)["epoch"] == 3
    params, _, epoch = checkpoints.restore_params(tmp_path)
    assert epoch == 3 and same(params, states[3].params)


def test_a_quoted_library_message_is_cut_at_a_word_end():
    """orbax's messages were cut at a fixed length, mid-word ('...: Er); using the next
    best'), in the one line that names a damaged checkpoint."""
    from unet_jax.checkpoints import _clipped

    assert _clipped("short message", 200) == "short message"
    long = "TensorStore could not read the array: " + "Error reading chunk, " * 20
    assert _clipped(long, 60) == "TensorStore could not read the array: Error reading ..."
    assert len(_clipped(long, 60)) <= 60
