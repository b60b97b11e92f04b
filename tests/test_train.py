"""Train state, the jitted steps, and checkpoints round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import Config, create_train_state, eval_step, train_step
from unet_jax import checkpoints
from unet_jax.train import merge_sums


def blob_batch(n=4, size=32, seed=0):
    """Images with a bright disc on textured background, masks of the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(4, 8)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).astype(np.float32)
        img = rng.uniform(0, 0.6, (size, size, 3)).astype(np.float32)
        img[disc > 0] += 0.4
        images.append(img)
        masks.append(disc[..., None])
    return {"image": jnp.asarray(np.stack(images)), "mask": jnp.asarray(np.stack(masks))}


SMALL = Config(base_features=8, depth=2, learning_rate=3e-3)


def test_create_train_state_uses_adamw_with_the_guides_learning_rate():
    config = Config(base_features=4, depth=2)
    state = create_train_state(jax.random.key(0), config)
    assert config.learning_rate == 3e-4 and int(state.step) == 0
    # one step with a zero gradient: AdamW moves parameters only by the weight decay
    zero = jax.tree.map(jnp.zeros_like, state.params)
    new = state.apply_gradients(grads=zero)
    kernel = state.params["head"]["kernel"]
    np.testing.assert_allclose(new.params["head"]["kernel"],
                               kernel * (1 - 3e-4 * config.weight_decay), rtol=1e-6)


def test_small_model_overfits_one_batch():
    state = create_train_state(jax.random.key(0), SMALL)
    batch = blob_batch()
    state, first = train_step(state, batch)
    for _ in range(150):
        state, last = train_step(state, batch)
    assert float(last["loss"]) < 0.1 * float(first["loss"])
    assert float(last["dice"]) > 0.9
    assert int(state.step) == 151


def test_train_step_donates_the_old_state():
    state = create_train_state(jax.random.key(0), SMALL)
    old_kernel = state.params["head"]["kernel"]
    new_state, _ = train_step(state, blob_batch())
    assert old_kernel.is_deleted()
    assert not new_state.params["head"]["kernel"].is_deleted()


@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice", "focal", "tversky"])
def test_every_loss_trains(loss):
    state = create_train_state(jax.random.key(0), SMALL)
    batch = blob_batch()
    _, first = train_step(jax.tree.map(jnp.copy, state), batch, loss=loss)
    for _ in range(40):
        state, last = train_step(state, batch, loss=loss)
    assert float(last["loss"]) < float(first["loss"])


def test_eval_step_ignores_padding_rows():
    state = create_train_state(jax.random.key(0), SMALL)
    batch = blob_batch(n=4)
    full = eval_step(state.params, batch, state.apply_fn)
    garbage = {"image": batch["image"].at[2:].set(7.0), "mask": batch["mask"].at[2:].set(1.0),
               "valid": jnp.asarray([True, True, False, False])}
    head = eval_step(state.params, {k: v[:2] for k, v in batch.items()}, state.apply_fn)
    padded = eval_step(state.params, garbage, state.apply_fn)
    assert float(padded["count"]) == 2.0 and float(full["count"]) == 4.0
    for k in ("loss", "dice", "iou", "pixel_accuracy"):
        np.testing.assert_allclose(padded[k], head[k], rtol=1e-5)
    means = merge_sums([jax.device_get(head), jax.device_get(padded)])
    np.testing.assert_allclose(means["loss"], float(head["loss"]) / 2, rtol=1e-5)


def test_checkpoint_round_trip_restores_state_and_params(tmp_path):
    config = SMALL
    (tmp_path / "config.json").write_text(config.to_json())
    state = create_train_state(jax.random.key(0), config)
    batch = blob_batch()
    manager = checkpoints.checkpoint_manager(tmp_path, keep=1)
    dices = [0.5, 0.9, 0.7]
    saved = {}
    for epoch, dice in enumerate(dices, start=1):
        state, _ = train_step(state, batch)
        saved[epoch] = jax.device_get(state.params)
        checkpoints.save(manager, epoch, state, {"epoch": epoch, "step": int(state.step)},
                         {"val_dice": dice})
    saved_opt = jax.device_get(state.opt_state)
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]  # the last one, and the best (epoch 2)

    fresh = create_train_state(jax.random.key(1), config)
    restored, progress = checkpoints.restore_state(manager, fresh)
    manager.close()
    assert progress["epoch"] == 3 and int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved[3])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state), saved_opt)
    # the restored state trains on exactly as the original would
    s1, m1 = train_step(restored, batch)
    s2, m2 = train_step(state, batch)
    np.testing.assert_array_equal(m1["loss"], m2["loss"])

    params, loaded_config, epoch = checkpoints.restore_params(tmp_path)
    assert epoch == 2 and loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[2])
    assert checkpoints.restore_params(tmp_path, "latest")[2] == 3


def test_restore_params_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no config.json"):
        checkpoints.restore_params(tmp_path)


def test_train_step_reports_each_class_over_the_images_that_hold_it():
    """dice_per_class was the mean of every number, one scalar despite its name."""
    from unet_jax.metrics import segmentation_scores

    config = Config(base_features=4, depth=2, num_classes=3)
    state = create_train_state(jax.random.key(0), config)
    batch = blob_batch(n=2)
    masks = np.array(batch["mask"]).astype(np.int32)
    masks[1] = 0  # class 1 in the first image's truth alone; class 2 in neither
    batch = {"image": batch["image"], "mask": jnp.asarray(masks)}
    logits = state.apply_fn({"params": state.params}, batch["image"])  # before donation
    per_image = segmentation_scores(jnp.argmax(logits, -1), masks[..., 0], 3)
    present = np.asarray(per_image["present_per_class"])
    with np.errstate(invalid="ignore"):
        expected = np.asarray(per_image["dice_per_class"]).sum(0) / present.sum(0)
    _, metrics = train_step(state, batch)
    assert metrics["dice_per_class"].shape == metrics["iou_per_class"].shape == (2,)
    assert present[0, 0] == 1  # class 1 has a figure
    np.testing.assert_allclose(metrics["dice_per_class"], expected, rtol=1e-6)
