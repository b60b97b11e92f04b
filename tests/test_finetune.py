"""Fine-tuning (``--init-from``): a run starts from another run's weights, converted
where the two U-Nets differ in classes or input channels, and refused where they
differ in anything else."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import data_pipeline
import unet_jax
from unet_jax import checkpoints, configs, finetune
from unet_jax.config import Config, ConfigError
from unet_jax.train import create_train_state

unet_jax.setup_platform("cpu")

SOURCE = Config(base_features=4, depth=2, image_size=(32, 48))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run directory holding the weights of ``SOURCE`` from seed 7, and those weights."""
    params = create_train_state(jax.random.key(7), SOURCE).params
    run = checkpoints.save_params(tmp_path_factory.mktemp("source") / "run", params, SOURCE)
    return run, params


def started(config: Config, logged=None):
    state = create_train_state(jax.random.key(config.seed), config)
    logged = [] if logged is None else logged
    return state, finetune.start_from(state, config, logged.append)[0]


def test_a_run_starts_from_the_sources_weights(source):
    run, params = source
    logged = []
    fresh, state = started(dataclasses.replace(SOURCE, init_from=str(run), ema=0.9), logged)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state.params), leaves(params),
                                                    strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(fresh.params), leaves(params)))
    # The moving average starts from them too, in buffers of its own (the state is donated).
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state.ema_params), leaves(params)))
    assert all(a is not b for a, b in zip(jax.tree.leaves(state.ema_params),
                                          jax.tree.leaves(state.params)))
    # Host arrays, which a run over several processes can spread over all their
    # devices (restored ones sat on this process's first device, and did not spread).
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves((state.params,
                                                                   state.ema_params)))
    assert logged == [f"starting from the weights of {run} (epoch 0)"]


def test_other_classes_start_a_new_head_and_keep_the_rest(source):
    run, params = source
    logged = []
    fresh, state = started(dataclasses.replace(SOURCE, init_from=str(run), num_classes=3),
                           logged)
    got, theirs, new = flat(state.params), flat(params), flat(fresh.params)
    assert got.keys() == theirs.keys()
    for key, value in got.items():
        expected = new[key] if key.startswith("['head']") else theirs[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    assert got["['head']['kernel']"].shape[-1] == 3
    assert logged[0].endswith("; a new head for --num-classes 3")


@pytest.mark.parametrize("channels, separable", [((3, 1), False), ((1, 3), False),
                                                ((1, 3), True)])
def test_the_first_layer_converted_answers_a_grey_image_as_before(tmp_path, channels,
                                                                  separable):
    """An RGB model's kernels summed over colour see a grayscale image as the RGB model
    sees it in grey; a grayscale model's kernel in thirds sees a grey RGB image as the
    grayscale model sees it (separable: its filter thrice, its mixing in thirds)."""
    theirs, ours = channels
    config = dataclasses.replace(SOURCE, in_channels=theirs, separable=separable)
    params = create_train_state(jax.random.key(3), config).params
    run = checkpoints.save_params(tmp_path / "run", params, config)
    _, state = started(dataclasses.replace(config, in_channels=ours, init_from=str(run)))
    grey = np.random.default_rng(0).random((2, 32, 48, 1), np.float32)
    before = state.apply_fn({"params": params}, np.repeat(grey, theirs, axis=-1))
    after = state.apply_fn({"params": state.params}, np.repeat(grey, ours, axis=-1))
    np.testing.assert_allclose(after, before, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(base_features=8), "is a U-Net with --base-features 4, and this run asks for "
     "--base-features 8: weights carry over to the same network only; pass --base-features 4"),
    (dict(depth=3, image_size=(32, 48)), "with --depth 2, and this run asks for --depth 3"),
    (dict(attention=True), "with --no-attention, and this run asks for --attention"),
])
def test_another_network_is_refused_naming_the_flag(source, change, message):
    config = dataclasses.replace(SOURCE, init_from=str(source[0]), **change)
    with pytest.raises(ConfigError, match=f"^--init-from {source[0]} "):
        finetune.check_source(config)
    with pytest.raises(ConfigError) as e:
        finetune.check_source(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_source_that_is_no_finished_run_is_one_line(source, tmp_path):
    for name in ("init_from", "data_dir"):  # an unset variable in a script, not "here"
        with pytest.raises(ConfigError, match=r"^--(init-from|data-dir) '': give a folder"):
            dataclasses.replace(SOURCE, **{name: ""})
    missing = dataclasses.replace(SOURCE, init_from=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^--init-from: .*nope: no such directory"):
        finetune.check_source(missing)
    empty = tmp_path / "empty"
    shutil.copytree(source[0], empty, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ConfigError, match="holds no checkpoint yet"):
        finetune.check_source(dataclasses.replace(SOURCE, init_from=str(empty)))
    with pytest.raises(ConfigError, match="is this run's own --workdir: continue a run "
                       "with --resume"):
        finetune.check_source(dataclasses.replace(SOURCE, init_from=str(source[0])),
                              source[0])
    separable = tmp_path / "separable"
    config = dataclasses.replace(SOURCE, separable=True)
    checkpoints.save_params(separable, create_train_state(jax.random.key(0), config).params,
                            config)
    with pytest.raises(ConfigError, match="cannot be reduced to --in-channels 1: pass "
                       "--in-channels 3"):
        finetune.check_source(dataclasses.replace(config, in_channels=1,
                                                  init_from=str(separable)))


def test_a_damaged_source_is_one_line_naming_the_flag(source, tmp_path):
    run = Path(shutil.copytree(source[0], tmp_path / "run"))
    for data in (run / "checkpoints" / "0" / "params").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.unlink()
    with pytest.raises(checkpoints.CheckpointError, match=r"^--init-from: .*no intact "
                       r"checkpoint is left$"):
        started(dataclasses.replace(SOURCE, init_from=str(run)))


def test_a_fine_tuned_run_validates_as_its_source_and_resumes_without_it(tmp_path):
    """With a rate too small to move the weights, the first epoch of a run started
    from another scores its validation images as that run's best epoch did (its loss
    tells one set of weights from another: each epoch's differs): the weights were
    used, not a random start. A resume needs only its own checkpoints."""
    data = data_pipeline.sample_dataset_dir(tmp_path / "sample", num_cars=5, size=(96, 64),
                                            seed=3)
    tiny = dataclasses.replace(configs.tiny(), data_dir=str(data))
    first = unet_jax.train_and_evaluate(dataclasses.replace(tiny, epochs=2), tmp_path / "a",
                                        log=lambda *a: None)
    losses = [row["val_loss"] for row in first["history"]]
    assert abs(losses[0] - losses[1]) > 1e-3
    config = dataclasses.replace(tiny, epochs=1, learning_rate=1e-9,
                                 init_from=str(tmp_path / "a"))
    logged = []
    tuned = unet_jax.train_and_evaluate(config, tmp_path / "b", log=logged.append)
    for name in ("val_loss", "val_dice"):
        assert tuned["history"][0][name] == pytest.approx(first["best"][name], abs=1e-5)
    assert f"starting from the weights of {tmp_path / 'a'} (epoch " in "\n".join(logged)
    assert Config.load(tmp_path / "b" / "config.json").init_from == str(tmp_path / "a")
    recorded = lambda: json.loads((tmp_path / "b" / "config.json").read_text())  # noqa: E731
    assert recorded()["init_from_epoch"] == first["best"]["epoch"]  # which weights, if
    # the source trains on and its best changes
    # Resumed with its first command's --preset, the run's source is its own: no preset
    # sets one (it said "--preset tiny sets --init-from none").
    from experiments import train

    argv = ["--workdir", str(tmp_path / "b"), "--resume", "--preset", "tiny", "--lr", "1e-9",
            "--epochs", "2", "--data-dir", str(data)]
    assert train.build_config(train.parse_args(argv)) == dataclasses.replace(config, epochs=2)
    shutil.rmtree(tmp_path / "a")
    resumed = unet_jax.train_and_evaluate(dataclasses.replace(config, epochs=2),
                                          tmp_path / "b", resume=True, log=lambda *a: None)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert recorded()["init_from_epoch"] == first["best"]["epoch"]  # kept by a resume


def test_a_source_of_nan_weights_is_named_not_blamed_on_the_rate(source, tmp_path):
    """Weights of a diverged run (imported from a .pth saved after the loss became NaN)
    started a run whose loss was NaN at step 1, and the error blamed --lr."""
    params = jax.tree.map(np.asarray, source[1])
    params["up_1"]["up"]["bias"] = np.full_like(params["up_1"]["up"]["bias"], np.nan)
    run = checkpoints.save_params(tmp_path / "nan", params, SOURCE)
    with pytest.raises(checkpoints.CheckpointError, match=r"^--init-from .*: its weights hold "
                       r"NaN or infinite values \(up_1/up/bias\), from a run that diverged"):
        started(dataclasses.replace(SOURCE, init_from=str(run)))
