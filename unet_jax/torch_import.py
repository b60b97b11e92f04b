"""Weights from the guide's PyTorch U-Net, for use in this Flax U-Net.

The guide saves ``torch.save(model.state_dict(), "unet.pth")``. Its keys follow the
module names of the PyTorch classes, e.g. ``down_convolution_1.conv.conv_op.0.weight``
(``conv_op.0`` and ``conv_op.2`` are the two convolutions of a DoubleConv; 1 and 3 are
the ReLUs, which have no weights). ``params_from_torch`` maps each tensor onto the
parameter of the same role here and converts its layout:

* ``Conv2d`` weights are ``(out, in, kh, kw)``; Flax wants ``(kh, kw, in, out)``. Both
  frameworks compute a cross-correlation, so the kernel is transposed, not flipped.
* ``ConvTranspose2d`` weights are ``(in, out, kh, kw)``, and PyTorch's transposed
  convolution scatters ``x[i, j] * W[:, :, a, b]`` to output pixel ``(2i + a, 2j + b)``,
  which is exactly the ``kernel[a, b]`` of ``UpConv``: transposed to ``(kh, kw, in,
  out)``, again without a flip.

The result gives the same logits as the PyTorch model (the test suite checks it to
1e-4). Values may be torch tensors or numpy arrays; torch itself is not needed here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from unet_jax.config import Config


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


# Where a training script's checkpoint keeps the model's state_dict, beside the
# optimizer's and the epoch.
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
GUIDE_IMAGE_SIZE = (512, 512)  # what the guide trains at: its weights expect it


def model_weights(weights) -> tuple[dict, str | None]:
    """The model's state_dict in what ``torch.load`` gave, and the key it was under.

    ``weights`` is the state_dict itself (what the guide saves), a training script's
    checkpoint holding it under one of ``WRAPPER_KEYS`` (the key is returned), or the
    PyTorch model itself (its ``state_dict()``). Anything else raises ValueError.
    """
    if callable(getattr(weights, "state_dict", None)):  # the nn.Module itself
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise ValueError(f"holds a {type(weights).__name__}, not a state_dict; save "
                         "model.state_dict(), as the guide does")
    holds_tensors = any(hasattr(v, "shape") for v in weights.values())
    for key in WRAPPER_KEYS:
        if isinstance(weights.get(key), Mapping) and not holds_tensors:
            return dict(weights[key]), key
    return dict(weights), None


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # nn.DataParallel and torch.compile prefix every key; accept both.
    state_dict, _ = model_weights(state_dict)
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _missing(key: str) -> ValueError:
    return ValueError(f"state_dict has no key {key!r}: not the guide's UNet (or saved "
                      "from a different version of it)")


def _depth(state_dict: Mapping[str, Any]) -> int:
    levels = {int(m.group(1)) for k in state_dict
              if (m := re.match(r"down_convolution_(\d+)\.", k))}
    if not levels and "inc.double_conv.0.weight" in state_dict:
        raise ValueError("a state_dict of milesial/Pytorch-UNet's UNet, another network "
                         "(batch normalisation, its own layer names), which does not "
                         "convert to this one; train unet-jax on the data instead")
    if not levels or levels != set(range(1, max(levels) + 1)):
        raise ValueError("not a state_dict of the guide's UNet: expected keys like "
                         "'down_convolution_1.conv.conv_op.0.weight'")
    return max(levels)


CONV = (2, 3, 1, 0)  # Conv2d (out, in, kh, kw) -> Flax (kh, kw, in, out)
UPCONV = (2, 3, 0, 1)  # ConvTranspose2d (in, out, kh, kw) -> Flax (kh, kw, in, out)


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Flax ``params`` for ``UNet`` from the guide's PyTorch ``UNet.state_dict()``
    (or a checkpoint or model holding it: ``model_weights``).

    Raises ValueError naming the keys that are missing or not understood, or a
    tensor whose shape does not fit the U-Net that the first layer and the head
    describe (``config_from_torch``): its layers must double in width at each level.
    """
    import jax
    from flax import traverse_util

    from unet_jax.train import init_params

    sd = _strip_prefix(state_dict)
    config = config_from_torch(sd)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(jax.random.key(0), config)))
    used: set[str] = set()

    def take(path: tuple, key: str, axes: tuple | None = None) -> np.ndarray:
        if key not in sd:
            raise _missing(key)
        used.add(key)
        value = _to_numpy(sd[key])
        shape = expected[path].shape
        wanted = shape if axes is None else tuple(shape[axes.index(i)] for i in range(4))
        if value.shape != wanted:
            raise ValueError(f"state_dict's {key} has shape {tuple(value.shape)}, but the "
                             f"U-Net its first layer and head describe (width "
                             f"{config.base_features}, depth {config.depth}) needs {wanted}: "
                             "not the guide's UNet, or a damaged file")
        if not np.isfinite(value).all():  # the weights of a run that diverged
            raise ValueError(f"state_dict's {key} holds NaN or infinite values: weights "
                             "saved after training diverged, which predict nothing; save "
                             "them from an epoch before the loss became NaN")
        return value if axes is None else value.transpose(axes)

    def double_conv(path: tuple, prefix: str) -> dict:
        return {f"conv{j + 1}": {
            "kernel": take((*path, f"conv{j + 1}", "kernel"), f"{prefix}.conv_op.{i}.weight",
                           CONV),
            "bias": take((*path, f"conv{j + 1}", "bias"), f"{prefix}.conv_op.{i}.bias")}
            for j, i in enumerate((0, 2))}

    params: dict = {}
    for i in range(1, config.depth + 1):
        params[f"down_{i}"] = {"conv": double_conv((f"down_{i}", "conv"),
                                                   f"down_convolution_{i}.conv")}
        params[f"up_{i}"] = {
            "up": {"kernel": take((f"up_{i}", "up", "kernel"),
                                  f"up_convolution_{i}.up.weight", UPCONV),
                   "bias": take((f"up_{i}", "up", "bias"), f"up_convolution_{i}.up.bias")},
            "conv": double_conv((f"up_{i}", "conv"), f"up_convolution_{i}.conv"),
        }
    params["bottleneck"] = double_conv(("bottleneck",), "bottle_neck")
    params["head"] = {"kernel": take(("head", "kernel"), "out.weight", CONV),
                      "bias": take(("head", "bias"), "out.bias")}
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"state_dict has keys the guide's UNet does not: {', '.join(unknown[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    return params


def config_from_torch(state_dict: Mapping[str, Any], **overrides) -> Config:
    """The ``Config`` (channels, classes, width, depth) that a state_dict was made with,
    at the guide's input size, 512x512: the size its weights learned the cars at, at
    which predict resizes photos for them. Pass ``image_size=`` (or any other setting)
    for weights trained otherwise. ``state_dict`` may be wrapped (``model_weights``)."""
    sd = _strip_prefix(state_dict)
    depth = _depth(sd)
    first, head = ("down_convolution_1.conv.conv_op.0.weight", "out.weight")
    if missing := [key for key in (first, head) if key not in sd]:
        raise _missing(missing[0])
    names = first, head
    first, head = _to_numpy(sd[first]), _to_numpy(sd[head])
    for name, value in zip(names, (first, head)):
        if value.ndim != 4 or value.shape[2:] != ((3, 3) if value is first else (1, 1)):
            raise ValueError(f"state_dict's {name} has shape {tuple(value.shape)}, not the "
                             f"guide's (out, in, {'3, 3' if value is first else '1, 1'}): "
                             "not the guide's UNet, or a damaged file")
    if first.shape[1] not in (1, 3):
        raise ValueError(f"state_dict's {names[0]} takes {first.shape[1]} input channels; "
                         "unet-jax takes 1 (grayscale) or 3 (RGB)")
    return Config(**{"in_channels": first.shape[1], "num_classes": head.shape[0],
                     "base_features": first.shape[0], "depth": depth,
                     "image_size": GUIDE_IMAGE_SIZE, **overrides})
