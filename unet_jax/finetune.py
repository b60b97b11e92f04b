"""Fine-tuning: a run that starts from another run's trained weights (``--init-from``).

A U-Net trained on thousands of Carvana photos has learnt edges, textures and shapes
that most segmentation tasks share; starting from it, a model for a few dozen images
of your own learns in fewer epochs and overfits less than one started at random. The
weights carry over as far as the two U-Nets agree:

- the convolutions of the contracting path, the bottleneck and the expanding path fit
  only a U-Net of the same width, depth and variant (attention gates, separable
  convolutions, skip connections): those must match, or the run is refused;
- the 1x1 head maps the decoder's last features (64 in the guide's U-Net) to the
  classes: with another ``--num-classes`` it cannot carry over, and starts from the
  new run's random head;
- the first convolution reads the input channels: an RGB run's 3x3 kernels summed
  over colour answer a grayscale image exactly as the RGB model answers that image
  in grey (R = G = B), so ``--in-channels 1`` from an RGB run starts from their sum;
  the other way, a grayscale kernel split into three thirds answers a colour image as
  the grayscale model answers its mean over R, G and B. (Separable convolutions filter
  each channel on its own: one grey filter can serve three colours, but three colour
  filters cannot be merged into one, so they convert from grayscale only.)

Only the weights carry over: the optimizer state, the step count and the learning-rate
schedule start afresh, as the new run's settings say. ``--resume`` of a fine-tuned run
continues from its own checkpoints and no longer needs the run it started from.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unet_jax import checkpoints, rundir
from unet_jax.config import Config, ConfigError, as_flag

# The settings that decide the shapes of every weight but the first layer's and the head's.
SAME_NETWORK = ("base_features", "depth", "skip_connections", "attention", "separable")
# The kernel of the convolution that reads the image's channels (not separable).
FIRST_KERNEL = ("down_1", "conv", "conv1", "kernel")


def check_source(config: Config, workdir=None) -> Config:
    """The settings of the run ``config.init_from`` names, once its weights are known
    to fit the U-Net ``config`` describes (and it is not ``workdir``, the new run's
    own directory); ConfigError naming ``--init-from`` and the fix otherwise. Reads
    config.json alone, so that a wrong source stops a run before its data is read."""
    source = Path(config.init_from)
    if workdir is not None and source == Path(workdir).expanduser().resolve():
        raise ConfigError(f"--init-from {source} is this run's own --workdir: continue "
                          "a run with --resume, or start the new one in another --workdir")
    try:
        saved = checkpoints.load_config(source)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"--init-from: {e}") from None
    if not rundir.has_checkpoint(source):
        raise ConfigError(f"--init-from {source} holds no checkpoint yet: start from a run "
                          "that finished at least an epoch")
    for name in SAME_NETWORK:
        theirs, ours = getattr(saved, name), getattr(config, name)
        if theirs != ours:
            raise ConfigError(
                f"--init-from {source} is a U-Net with {as_flag(name, theirs)}, and this run "
                f"asks for {as_flag(name, ours)}: weights carry over to the same network "
                f"only; pass {as_flag(name, theirs)} (or start from scratch without "
                "--init-from)")
    if saved.in_channels > config.in_channels and config.separable:
        # A depthwise kernel per channel: no one kernel computes what their sum did.
        raise ConfigError(
            f"--init-from {source} reads {saved.in_channels} input channels with separable "
            f"convolutions, whose first layer cannot be reduced to --in-channels "
            f"{config.in_channels}: pass --in-channels {saved.in_channels}")
    return saved


def start_from(state, config: Config, log=print):
    """(``state`` (a new run's) with the weights of the run ``config.init_from`` in
    place of its random ones, converted as the module docstring says, and the epoch
    of the source they come from); its moving average (``--ema``) starts from them too. The weights are host (numpy) arrays,
    placed by the caller as a new state's are: restored ones sit on this process's
    first device, and a run over several processes cannot spread such arrays."""
    saved = check_source(config)
    try:
        params, _, epoch = checkpoints.restore_params(config.init_from, "best")
    except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(f"--init-from: {e}") from None
    flat, notes = traverse_util.flatten_dict(params), []
    for path, value in flat.items():
        if not np.isfinite(np.asarray(value)).all():  # else "loss became nan" blames --lr
            raise checkpoints.CheckpointError(
                f"--init-from {config.init_from}: its weights hold NaN or infinite values "
                f"({'/'.join(path)}), from a run that diverged; start from another run")
    if saved.num_classes != config.num_classes:
        flat.update(traverse_util.flatten_dict({"head": state.params["head"]}))
        notes.append(f"a new head for --num-classes {config.num_classes}")
    if saved.in_channels != config.in_channels:
        if config.separable:  # 1 -> 3: the depthwise kernel thrice, the pointwise in thirds
            conv = FIRST_KERNEL[:-1]
            depthwise, pointwise = conv + ("depthwise", "kernel"), conv + ("pointwise", "kernel")
            flat[depthwise] = jnp.repeat(flat[depthwise], config.in_channels, axis=3)
            flat[pointwise] = first_kernel_for(flat[pointwise], config.in_channels)
        else:
            flat[FIRST_KERNEL] = first_kernel_for(flat[FIRST_KERNEL], config.in_channels)
        notes.append(f"the first layer converted to {config.in_channels} channel(s)")
    params = jax.device_get(traverse_util.unflatten_dict(flat))
    ema = {}
    if state.ema_params is not None:  # a copy: the state is donated, a buffer only once
        ema = {"ema_params": jax.tree.map(np.copy, params)}
    changed = f"; {', '.join(notes)}" if notes else ""
    log(f"starting from the weights of {config.init_from} (epoch {epoch}){changed}")
    return state.replace(params=params, **ema), epoch


def first_kernel_for(kernel, in_channels: int):
    """The first convolution's kernel (kh, kw, C, F) for ``in_channels`` inputs:
    summed over C for 1; for 3, a 1-channel kernel split into equal thirds."""
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    return jnp.repeat(kernel / in_channels, in_channels, axis=2)
