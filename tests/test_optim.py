"""Schedules, clipping and weight averaging (``unet_jax.optim``): each rate and decay
against a hand computation, and a run killed midway that resumes to the very same
weights and metrics as one that was not."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_pipeline
import unet_jax
from unet_jax import checkpoints, configs, optim, trainer
from unet_jax.config import Config, ConfigError

unet_jax.setup_platform("cpu")

LR = 1e-3


def schedule(steps_per_epoch=10, **settings):
    config = Config(learning_rate=LR, **settings)
    return lambda step: optim.learning_rate_at(config, step, steps_per_epoch)


def test_constant_is_the_guides_rate_at_every_step():
    rate = schedule()
    assert [rate(s) for s in (0, 7, 10_000)] == [LR, LR, LR]
    assert optim.learning_rate_schedule(Config(learning_rate=LR)) == LR  # plain AdamW


def test_warmup_climbs_from_near_zero_to_the_rate():
    rate = schedule(epochs=4, warmup_epochs=1)  # 10 warm-up steps of 40
    assert rate(0) == pytest.approx(LR / 10)
    assert rate(4) == pytest.approx(LR * 5 / 10)
    assert rate(9) == pytest.approx(LR) and rate(30) == pytest.approx(LR)
    half = schedule(epochs=4, warmup_epochs=0.5)  # fractions of an epoch
    assert half(0) == pytest.approx(LR / 5) and half(4) == pytest.approx(LR)


def test_cosine_after_warmup_is_the_hand_computed_curve():
    rate = schedule(epochs=4, warmup_epochs=1, schedule="cosine")
    for step in (10, 17, 25, 39):
        j = step - 10
        assert rate(step) == pytest.approx(LR * (1 + math.cos(math.pi * j / 30)) / 2, rel=1e-5)
    assert rate(40) == pytest.approx(0.0, abs=1e-12)  # zero at the end of the run


def test_poly_is_nnunets_curve():
    rate = schedule(epochs=5, schedule="poly")
    for step in (0, 13, 49):
        assert rate(step) == pytest.approx(LR * (1 - step / 50) ** 0.9, rel=1e-5)


def test_plateau_lowers_the_rate_only_after_patience_epochs_without_a_new_best():
    scale = lambda dices: optim.plateau_scale(dices, patience=2, factor=0.5)  # noqa: E731
    assert scale([]) == 1.0
    assert scale([0.5, 0.6, 0.7, 0.8]) == 1.0  # always improving
    assert scale([0.5, 0.6, 0.6]) == 1.0  # one epoch without a new best
    assert scale([0.5, 0.6, 0.6, 0.55]) == 0.5  # two
    assert scale([0.5, 0.6, 0.6, 0.55, 0.58]) == 0.5  # the count starts again
    assert scale([0.5, 0.6, 0.6, 0.55, 0.58, 0.59]) == 0.25
    assert scale([0.5, 0.6, 0.6, 0.55, 0.7, 0.6]) == 0.5  # a new best resets the count


def test_the_plateau_factor_scales_every_update():
    config = dataclasses.replace(configs.tiny(), schedule="plateau")
    tx = optim.create_optimizer(config)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(params)
    full, _ = tx.update(grads, state, params)
    lowered, _ = tx.update(grads, optim.set_plateau_scale(state, 0.25), params)
    np.testing.assert_allclose(lowered["w"], 0.25 * full["w"], rtol=1e-6)


@pytest.mark.parametrize("norm,scale", [(0.5, 1.0), (50.0, 10 / 50)])
def test_clipping_leaves_small_gradients_and_scales_large_ones_to_the_norm(norm, scale):
    """Adam's first moment after one update is 0.1 x the gradient it was given: the
    gradient as clipped before AdamW."""
    tx = optim.create_optimizer(dataclasses.replace(configs.tiny(), clip_norm=10.0))
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0]) * norm / 5}
    _, state = tx.update(grads, tx.init(params), params)
    adam = state[1][0]
    np.testing.assert_allclose(adam.mu["w"], 0.1 * grads["w"] * scale, rtol=1e-6)


def test_adamw_updates_as_torchs_algorithm_by_hand():
    """Three updates of torch.optim.AdamW's documented algorithm (betas 0.9 and 0.999,
    eps 1e-8, decoupled decay lr * wd * p), which the guide's optimizer runs; the
    gradients grow and change sign, and the last one is as small as eps, so each
    hyperparameter moves the result."""
    config = Config(learning_rate=LR, weight_decay=0.05)
    tx = optim.create_optimizer(config)
    p = np.array([0.5, -1.0, 2.0, 1.0], np.float64)
    grads = [np.array([0.1, -0.2, 0.3, 1e-8]), np.array([-0.3, 0.01, 1.0, -2e-8]),
             np.array([2.0, -0.5, 0.0, 1e-8])]
    params, opt_state = jnp.asarray(p, jnp.float32), tx.init(jnp.asarray(p, jnp.float32))
    m = v = np.zeros(4)
    for t, g in enumerate(grads, start=1):
        updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, params)
        params = params + updates
        p = p - LR * 0.05 * p
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        p = p - LR * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(params), p, rtol=0, atol=1e-6)


def test_the_ema_decay_ramps_up_as_tensorflows():
    decay = lambda step: float(optim.ema_decay(step, 0.999))  # noqa: E731
    assert decay(0) == pytest.approx(1 / 10)
    assert decay(10) == pytest.approx(11 / 20)
    assert decay(1000) == pytest.approx(1001 / 1010)
    assert decay(100_000) == pytest.approx(0.999)
    assert float(optim.ema_decay(0, 0.05)) == pytest.approx(0.05)  # the cap holds early too


def test_the_ema_update_by_hand_and_with_decay_zero():
    ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
    d = 11 / 20
    np.testing.assert_allclose(optim.update_ema(ema, params, 10, 0.999)["w"],
                               d * ema["w"] + (1 - d) * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(optim.update_ema(ema, params, 10, 0.0)["w"], params["w"])


def test_a_train_step_with_decay_zero_averages_to_the_raw_weights():
    config = configs.tiny()
    model = unet_jax.create_model(config)
    params = unet_jax.init_params(jax.random.key(0), config, model)
    state = optim.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=optim.create_optimizer(config),
                                    ema_params=jax.tree.map(jnp.copy, params), ema_decay=0.0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((2, 32, 48, 3), np.float32),
             "mask": (rng.random((2, 32, 48, 1)) > 0.5).astype(np.float32)}
    state, _ = unet_jax.train_step(state, batch)
    for raw, averaged in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(raw, averaged)


def _pixelwise(variables, images):
    """A stand-in model that compiles in a blink: one logit per pixel, linear in its
    colour."""
    p = variables["params"]
    return images @ p["w"] + p["b"]


def test_a_train_step_averages_the_new_weights_with_the_ramped_decay():
    """ema = d * ema + (1 - d) * params after the update, with d = min(0.999, (1 + n) /
    (10 + n)) and n the updates before this one: 0 at the first step (d = 0.1), 1 at
    the second (2/11); far into a run, the 0.999 asked for."""
    decay = 0.999
    params = {"w": jnp.array([[0.3], [-0.2], [0.1]]), "b": jnp.array([0.05])}
    ema = {"w": jnp.array([[1.0], [2.0], [-1.0]]), "b": jnp.array([0.5])}  # not the params
    state = optim.TrainState.create(apply_fn=_pixelwise, params=params,
                                    tx=optim.create_optimizer(configs.tiny()),
                                    ema_params=ema, ema_decay=decay)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((2, 4, 6, 3), np.float32),
             "mask": (rng.random((2, 4, 6, 1)) > 0.5).astype(np.float32)}

    def step_and_check(state, n):
        old_ema, old_params = jax.device_get((state.ema_params, state.params))  # donated
        assert int(state.step) == n
        state, _ = unet_jax.train_step(state, batch)
        new_params, new_ema = jax.device_get((state.params, state.ema_params))
        d = min(decay, (1 + n) / (10 + n))
        for key in ("w", "b"):
            assert np.abs(new_params[key] - old_params[key]).min() > 1e-3  # AdamW moved it
            np.testing.assert_allclose(new_ema[key],
                                       d * old_ema[key] + (1 - d) * new_params[key],
                                       rtol=1e-6, atol=1e-7)
        return state

    state = step_and_check(state, 0)  # d = 0.1
    state = step_and_check(state, 1)  # d = 2/11
    step_and_check(state.replace(step=jnp.asarray(100_000, jnp.int32)), 100_000)  # d = 0.999


@pytest.mark.parametrize("settings,fix", [
    (dict(plateau_patience=5), "--plateau-patience 5 needs --schedule plateau"),
    (dict(schedule="plateau", plateau_factor=1.5), "--plateau-factor 1.5: give a factor"),
    (dict(warmup_epochs=12), "--warmup-epochs 12.0: give 0 or more and fewer than --epochs 12"),
    (dict(ema=1.0), "--ema 1.0: give a decay in \\[0, 1\\)"),
    (dict(clip_norm=-1), "--clip-norm -1.0: give a norm above 0"),
    (dict(schedule="step"), "--schedule 'step': choose one of constant, cosine"),
])
def test_bad_settings_name_their_flag(settings, fix):
    with pytest.raises(ConfigError, match="^" + fix):
        Config(**settings)


# --- A run with a schedule and averaged weights, killed and resumed ---------------------

RECIPE = dict(schedule="cosine", warmup_epochs=1, ema=0.9, clip_norm=1.0, epochs=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data_pipeline.sample_dataset_dir(tmp_path_factory.mktemp("data") / "sample",
                                            num_cars=4, size=(96, 64), seed=5)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    config = dataclasses.replace(configs.tiny(), data_dir=str(data_dir), **RECIPE)
    workdir = tmp_path_factory.mktemp("runs") / "whole"
    return config, workdir, unet_jax.train_and_evaluate(config, workdir, log=lambda *a: None)


class Killed(Exception):
    pass


def _weights(run_dir, item, epoch=None):
    """``item`` of checkpoint ``epoch`` (the latest by default), as saved."""
    manager = checkpoints.checkpoint_manager(run_dir, read_only=True)
    try:
        step = manager.latest_step() if epoch is None else epoch
        return manager.restore(step, args=checkpoints.ocp.args.Composite(
            **{item: checkpoints.ocp.args.StandardRestore()}))[item]
    finally:
        manager.close()


def test_a_run_killed_midway_resumes_to_the_same_weights_and_metrics(uninterrupted, tmp_path):
    config, whole_dir, whole = uninterrupted
    workdir = tmp_path / "killed"

    def kill_after_epoch_2(line):
        if line.startswith("epoch 2:"):  # checkpoint 2 is saved before this line
            raise Killed

    with pytest.raises(Killed):
        unet_jax.train_and_evaluate(config, workdir, log=kill_after_epoch_2)
    resumed = unet_jax.train_and_evaluate(config, workdir, resume=True, log=lambda *a: None)

    columns = ("train_loss", "val_loss", "val_dice", "learning_rate")
    assert [[r[k] for k in columns] for r in resumed["history"]] == \
        [[r[k] for k in columns] for r in whole["history"]]
    for item in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(_weights(workdir, item)),
                        jax.tree.leaves(_weights(whole_dir, item))):
            np.testing.assert_array_equal(a, b)


def test_an_ema_run_is_scored_and_used_by_its_averaged_weights(uninterrupted):
    config, workdir, summary = uninterrupted
    history = summary["history"]
    # metrics.csv stays all numbers, so any reader can parse every column as float.
    assert all(isinstance(v, (int, float)) for r in history for v in r.values())
    # The rate in effect at each epoch's last update: warm-up, then cosine.
    steps = len(trainer.build_data(config, workdir, resume=True)[0])
    assert [r["learning_rate"] for r in history] == pytest.approx(
        [optim.learning_rate_at(config, e * steps - 1, steps) for e in (1, 2, 3)])
    params, _, epoch = checkpoints.restore_params(workdir, "latest")
    ema = _weights(workdir, "ema_params")
    raw = _weights(workdir, "params")
    for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(p, e)
    assert any(not np.array_equal(p, r) for p, r in
               zip(jax.tree.leaves(params), jax.tree.leaves(raw)))
    # Validation scored exactly those weights, and not the raw ones: the loss tells
    # them apart where a tiny model's Dice may not.
    _, val_data, _ = trainer.build_data(config, workdir, resume=True)
    scores = {}
    for name, weights in (("ema", params), ("raw", raw)):
        state = optim.TrainState.create(apply_fn=unet_jax.create_model(config).apply,
                                        params=weights, tx=optim.create_optimizer(config, steps))
        scores[name], _ = trainer.validate(config, state, val_data,
                                           unet_jax.parallel.make_mesh())
    recorded = history[epoch - 1]
    assert scores["ema"]["dice"] == pytest.approx(recorded["val_dice"], abs=1e-6)
    assert scores["ema"]["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)
    assert scores["raw"]["loss"] != pytest.approx(recorded["val_loss"], rel=1e-3)


def test_a_decaying_schedule_cannot_be_stretched_on_resume(uninterrupted):
    config, workdir, _ = uninterrupted
    with pytest.raises(ConfigError, match="^--epochs 5 differs from the run's 3 .* its "
                                          "cosine schedule decays to zero at epoch 3"):
        unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=5), workdir,
                                    resume=True, log=lambda *a: None)


def test_a_plateau_run_logs_the_lowered_rate(data_dir, tmp_path):
    config = dataclasses.replace(configs.tiny(), data_dir=str(data_dir), schedule="plateau",
                                 plateau_patience=1, plateau_factor=0.5, epochs=4,
                                 learning_rate=1e-12)  # too small to change a float32 weight
    lines = []
    history = unet_jax.train_and_evaluate(config, tmp_path / "run", log=lines.append)["history"]
    dices = [r["val_dice"] for r in history]
    assert len(set(dices)) == 1  # no new best after the first epoch
    assert [r["learning_rate"] for r in history] == pytest.approx(
        [1e-12, 1e-12, 5e-13, 2.5e-13], rel=1e-6, abs=0)
    assert sum(line.startswith("validation Dice has not improved for an epoch: learning "
                               "rate lowered to ") for line in lines) == 2
    # The factor reached the optimizer, not only the log: the state each checkpoint
    # saved (after its epoch's updates) holds the factor those updates were scaled by,
    # in the last link of the chain, optax.inject_hyperparams(optax.scale)'s step_size.
    for epoch, factor in ((3, 0.5), (4, 0.25)):
        opt_state = _weights(tmp_path / "run", "opt_state", epoch)
        assert float(opt_state[-1]["hyperparams"]["step_size"]) == factor, epoch
