"""Checkpoints with orbax: the last few epochs and the best one by validation Dice.

A run directory looks like::

    RUN_DIR/config.json          the Config the run was made with
    RUN_DIR/checkpoints/<epoch>/ params/, opt_state/, progress/ (JSON), metrics/

Parameters, optimizer state and progress (epoch, step, metric history) are separate
orbax items, so inference restores the parameters alone, without reading (or even
knowing the structure of) the optimizer state. Orbax writes each checkpoint into a
temporary directory and renames it when complete: a run killed while saving keeps its
previous checkpoints intact, and the half-written one is never picked up.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from unet_jax.config import Config
from unet_jax.train import TrainState, init_params

BEST_METRIC = "val_dice"


class CheckpointError(RuntimeError):
    """A run directory has no usable checkpoint."""


def checkpoint_manager(run_dir, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager for ``RUN_DIR/checkpoints`` keeping the last ``keep`` and the best."""
    keep_policy = policies.AnyPreservationPolicy([
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep_policy, best_fn=lambda m: m[BEST_METRIC],
        best_mode="max", read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state: TrainState, progress: dict,
         metrics: dict) -> None:
    """Saves ``state`` as checkpoint ``epoch``; ``metrics`` must hold ``val_dice``.

    Asynchronous: returns once the arrays are copied off the device, and writes in the
    background while training goes on; ``manager.wait_until_finished()`` or ``close()``
    waits for it.
    """
    manager.save(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.JsonSave(progress),
    ), metrics={k: float(v) for k, v in metrics.items()})


def restore_state(manager: ocp.CheckpointManager, state: TrainState, epoch: int | None = None):
    """(state, progress) from checkpoint ``epoch`` (latest by default).

    ``state`` is a freshly created TrainState; it gives the structure, shapes and
    shardings to restore into.
    """
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = manager.restore(epoch, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(state.params)),
        opt_state=ocp.args.StandardRestore(abstract(state.opt_state)),
        progress=ocp.args.JsonRestore(),
    ))
    progress = dict(restored["progress"])
    state = state.replace(params=restored["params"], opt_state=restored["opt_state"],
                          step=progress["step"])
    return state, progress


def load_config(run_dir) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: it has no config.json "
                              "(pass the directory that experiments.train wrote)")
    return Config.load(path)


def restore_params(run_dir, which: str | int = "best"):
    """(params, config, epoch) of a run directory, without the optimizer state.

    ``which`` is 'best' (highest validation Dice), 'latest' or an epoch number.
    """
    config = load_config(run_dir)
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{Path(run_dir) / 'checkpoints'} holds no checkpoint")
        if which == "best":
            epoch = manager.best_step()
            epoch = manager.latest_step() if epoch is None else epoch
        elif which == "latest":
            epoch = manager.latest_step()
        else:
            try:
                epoch = int(which)
            except ValueError:
                raise CheckpointError(f"--epoch {which!r}: give 'best', 'latest' or an epoch "
                                      "number") from None
            if epoch not in steps:
                raise CheckpointError(f"{run_dir} has no checkpoint for epoch {epoch}; "
                                      f"it has {', '.join(map(str, steps))}")
        abstract = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
        restored = manager.restore(epoch, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))
    finally:
        manager.close()
    return restored["params"], config, epoch


def save_params(run_dir, params, config: Config, metrics: dict | None = None,
                epoch: int = 0) -> Path:
    """Writes a run directory holding ``params`` alone (for imported weights).

    predict and evaluate accept it like any training run's directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json())
    manager = checkpoint_manager(run_dir)
    try:
        manager.save(epoch, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            progress=ocp.args.JsonSave({"epoch": epoch, "step": 0, "history": []}),
        ), metrics={BEST_METRIC: float((metrics or {}).get(BEST_METRIC, 0.0))})
        manager.wait_until_finished()
    finally:
        manager.close()
    return run_dir
