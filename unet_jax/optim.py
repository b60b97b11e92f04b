"""The optimiser around the train step: AdamW, its learning-rate schedule, gradient
clipping, and an exponential moving average (EMA) of the weights.

The guide trains at one AdamW rate (3e-4) from the first step to the last, and that
stays the default. The trainers practitioners compare with do more, and each is one
setting here (``Config``):

* **Warm-up** (``--warmup-epochs``): the rate climbs linearly from near zero, ``lr /
  W`` at the first of W warm-up updates, to ``lr``. Adam's first steps are its least
  informed (its second-moment estimate rests on a handful of gradients), and a full
  rate then can throw a fresh network far off.
* **Schedules** (``--schedule``), after the warm-up, over the T - W updates left of a
  run of T (j counts them from 0):

  ==========  ===================================================  ======================
  constant    ``lr``                                               the guide
  cosine      ``lr * (1 + cos(pi * j / (T - W))) / 2``             big_vision
  poly        ``lr * (1 - j / (T - W)) ** 0.9``                    nnU-Net
  plateau     ``lr * factor ** k``, k the times validation Dice   milesial/Pytorch-UNet
              went ``patience`` epochs without a new best          (ReduceLROnPlateau)
  ==========  ===================================================  ======================

  A decaying rate takes large steps while the loss is far from a minimum and small
  ones near it, where a constant rate keeps bouncing around. (torch's
  ReduceLROnPlateau cuts after ``patience`` + 1 epochs without a new best, and
  milesial's calls it with factor 0.1 and patience 5; here 0.5 and 3 are the defaults.)
* **Gradient clipping** (``--clip-norm``): a batch whose gradients have a global L2
  norm above the limit is scaled down to it, so one odd batch cannot wreck the weights.
* **Weight averaging** (``--ema``): besides the weights AdamW trains, the state keeps
  their exponential moving average, ``ema = d * ema + (1 - d) * params`` after every
  update. The average of the last few hundred steps sits nearer the middle of the
  valley the optimiser bounces around in, and often scores better than the last
  step's weights. Its decay ramps up as ``d = min(DECAY, (1 + n) / (10 + n))`` after n
  updates (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``): with a fixed
  0.999 from the start, the random initial weights would still count 9% after 2,400
  steps. Validation, the best checkpoint, predict, evaluate, submit and export then
  use the averaged weights.

All of it is optax: the schedule is an ``optax`` schedule under the one AdamW of the
train step, clipping is ``optax.clip_by_global_norm`` chained before it. The plateau
rule needs validation Dice, which only the host sees once per epoch; its factor is a
hyperparameter in the optimizer state (``optax.inject_hyperparams``) that the trainer
sets before each epoch from the run's history (``plateau_scale``), so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

SCHEDULES = ("constant", "cosine", "poly", "plateau")
POLY_POWER = 0.9  # nnU-Net's exponent
EMA_RAMP = 10  # the decay after n updates is at most (1 + n) / (EMA_RAMP + n)


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, AdamW state, ``apply_fn``, ``tx``) and, for a
    run with ``--ema``, the averaged weights and their decay (None without)."""

    ema_params: Any = None
    ema_decay: float | None = struct.field(pytree_node=False, default=None)


# --- The learning rate -----------------------------------------------------------------

def learning_rate_schedule(config, steps_per_epoch: int | None = None):
    """The rate of each update (its index from 0) of a run of ``config.epochs`` epochs
    of ``steps_per_epoch`` updates: warm-up, then ``config.schedule`` (the plateau
    rule's factor comes on top, see ``create_optimizer``). A plain number for a
    constant rate without warm-up, the guide's AdamW exactly."""
    return _schedule(config.learning_rate, config.schedule, *_steps(config, steps_per_epoch))


def _steps(config, steps_per_epoch: int | None) -> tuple[int, int]:
    """(warm-up updates, updates in the run; 0 where the schedule does not need it)."""
    decays = config.schedule in ("cosine", "poly")
    if not (decays or config.warmup_epochs):
        return 0, 0
    if not steps_per_epoch:
        raise ValueError(f"--schedule {config.schedule} with --warmup-epochs "
                         f"{config.warmup_epochs} needs the number of steps per epoch: "
                         "pass steps_per_epoch (batches in an epoch)")
    warmup = max(round(config.warmup_epochs * steps_per_epoch), 1) if config.warmup_epochs else 0
    return warmup, config.epochs * steps_per_epoch if decays else 0


def _schedule(lr: float, schedule: str, warmup: int, total: int):
    if schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
    elif schedule == "poly":
        main = optax.polynomial_schedule(lr, 0.0, POLY_POWER, max(total - warmup, 1))
    elif not warmup:
        return lr
    else:
        main = optax.constant_schedule(lr)
    if not warmup:
        return main
    # lr / W at update 0, lr at update W - 1: no update is wasted at a rate of zero.
    ramp = optax.linear_schedule(lr / warmup, lr, max(warmup - 1, 1))
    return optax.join_schedules([ramp, main], [warmup])


def create_optimizer(config, steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """AdamW as in the guide (``optim.AdamW(model.parameters(), lr=3e-4)``), with the
    schedule, clipping and plateau factor ``config`` asks for.

    PyTorch's AdamW decays every parameter by ``lr * weight_decay`` per step, biases
    included, with weight_decay 0.01 by default; optax's ``adamw`` does the same with
    these arguments, so the two optimise identically. The schedule needs
    ``steps_per_epoch`` unless it is constant without warm-up.
    """
    return _optimizer(config.learning_rate, config.weight_decay, config.schedule,
                      *_steps(config, steps_per_epoch), config.clip_norm)


# The same settings give the very same optimizer object: jit keys its compiled train
# step on it (the state's ``tx``), so a second run in one process reuses the program.
@functools.lru_cache(maxsize=64)
def _optimizer(learning_rate: float, weight_decay: float, schedule: str, warmup: int,
               total: int, clip_norm: float) -> optax.GradientTransformation:
    rate = _schedule(learning_rate, schedule, warmup, total)
    adamw = optax.adamw(rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(adamw)
    if schedule == "plateau":
        # Scaling AdamW's update (decay included) by f is what lowering torch's lr to
        # f * lr does; the factor lives in the state, set by the host each epoch.
        parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def plateau_scale(val_dices, patience: int, factor: float) -> float:
    """The plateau rule's factor on the rate after the epochs whose validation Dice
    are ``val_dices``: multiplied by ``factor`` each time ``patience`` epochs in a row
    bring no new best (the count then starts again)."""
    best, waited, scale = -float("inf"), 0, 1.0
    for dice in val_dices:
        if dice > best:
            best, waited = dice, 0
            continue
        waited += 1
        if waited == patience:
            scale, waited = scale * factor, 0
    return scale


def set_plateau_scale(opt_state, scale: float):
    """``opt_state`` of a plateau run (``create_optimizer``) with its factor set to ``scale``."""
    *rest, last = opt_state
    current = last.hyperparams["step_size"]
    step_size = jax.device_put(jnp.asarray(scale, current.dtype), current.sharding)
    return type(opt_state)((*rest, last._replace(
        hyperparams={**last.hyperparams, "step_size": step_size})))


def learning_rate_at(config, step: int, steps_per_epoch: int | None, scale: float = 1.0) -> float:
    """The rate of update ``step`` (from 0) of a run of ``config``, times the plateau
    factor ``scale``: what metrics.csv logs as the rate in effect."""
    rate = learning_rate_schedule(config, steps_per_epoch)
    return float(rate(step) if callable(rate) else rate) * scale


# --- Weight averaging ------------------------------------------------------------------

def ema_decay(step, decay: float):
    """The EMA's decay at the update that follows ``step`` updates: ``decay``, but at
    most ``(1 + step) / (10 + step)``, so that the first updates replace most of the
    (random) average instead of being averaged into it."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (EMA_RAMP + step))


def update_ema(ema_params, params, step, decay: float):
    """The moving average after one more update: ``d * ema + (1 - d) * params`` with
    ``d = ema_decay(step, decay)``; ``step`` counts the updates before this one."""
    d = ema_decay(step, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)


def scored_params(state: TrainState):
    """The weights a run is judged and used by: the average with ``--ema``, else the
    trained weights."""
    return state.params if state.ema_params is None else state.ema_params


def weights_name(config) -> str:
    """'ema' for a run that keeps averaged weights, 'raw' for one that does not: what
    evaluate's JSON and the export sidecar say was scored."""
    return "ema" if config.ema else "raw"


def describe(config) -> str:
    """The optimisation of a run in a few words, for its first log line."""
    warmup = f" after {config.warmup_epochs:g} warm-up epoch(s)" if config.warmup_epochs else ""
    parts = [f"AdamW lr {config.learning_rate:g}, {config.schedule}{warmup}"]
    if config.schedule == "plateau":
        parts[0] += (f" (x{config.plateau_factor:g} after {config.plateau_patience} epochs "
                     "without a better Dice)")
    if config.clip_norm:
        parts.append(f"gradients clipped to norm {config.clip_norm:g}")
    if config.ema:
        parts.append(f"weights averaged (EMA {config.ema:g})")
    return ", ".join(parts)
