"""The Flax U-Net computes what the guide's PyTorch U-Net computes, weight for weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import UNet, config_from_torch, params_from_torch

torch = pytest.importorskip(
    "torch", reason="torch is not installed; `pip install torch==2.13.0` (CPU build) "
    "to run the parity tests")
from experiments.torch_unet import UNet as TorchUNet  # noqa: E402


def torch_model(in_channels, num_classes, seed=0):
    torch.manual_seed(seed)
    model = TorchUNet(in_channels, num_classes).eval()
    with torch.no_grad():  # non-zero biases everywhere, so a misplaced bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("in_channels,num_classes,height,width", [(3, 1, 32, 48), (1, 3, 16, 16)])
def test_params_from_torch_gives_the_same_logits(in_channels, num_classes, height, width):
    model = torch_model(in_channels, num_classes)
    x = np.random.default_rng(0).uniform(size=(2, in_channels, height, width)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)

    params = params_from_torch(model.state_dict())
    ours = UNet(num_classes=num_classes).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-4


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_accepts_numpy_values_and_a_dataparallel_or_compiled_prefix(prefix):
    """nn.DataParallel saves its model's keys as module.*, torch.compile's wrapper as
    _orig_mod.*, and the one around the other both."""
    model = torch_model(3, 1)
    sd = {prefix + k: v.numpy() for k, v in model.state_dict().items()}
    params = params_from_torch(sd)
    assert params["up_1"]["up"]["kernel"].shape == (2, 2, 1024, 512)
    config = config_from_torch(sd)
    assert (config.in_channels, config.num_classes, config.base_features, config.depth) == (3, 1, 64, 4)


def test_the_library_reads_a_training_checkpoint_or_the_model_at_the_guides_size():
    """config_from_torch gave the quick preset's 64x96, so predict resized photos for
    the guide's weights to a size they never saw; a checkpoint {'model_state_dict': ...}
    or the model itself was 'not a state_dict of the guide's UNet'."""
    model = torch_model(1, 2)
    plain = params_from_torch(model.state_dict())
    for weights in ({"model_state_dict": model.state_dict(), "epoch": 3}, model):
        params = params_from_torch(weights)
        assert all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(plain)))
        config = config_from_torch(weights)
        assert (config.image_size, config.in_channels, config.num_classes) == ((512, 512), 1, 2)
    assert config_from_torch(model, image_size=(256, 384)).image_size == (256, 384)
    with pytest.raises(ValueError, match="^holds a list, not a state_dict"):
        params_from_torch([1, 2])


def test_rejects_a_foreign_state_dict():
    with pytest.raises(ValueError, match="down_convolution_1"):
        params_from_torch({"conv1.weight": np.zeros((64, 3, 7, 7))})
    sd = dict(torch_model(3, 1).state_dict())
    sd.pop("out.bias")
    with pytest.raises(ValueError, match="out.bias"):
        params_from_torch(sd)
    sd = dict(torch_model(3, 1).state_dict())
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="extra.weight"):
        params_from_torch(sd)
    # milesial/Pytorch-UNet's network is named as the other network it is.
    with pytest.raises(ValueError, match=r"^a state_dict of milesial/Pytorch-UNet's UNet, "
                       "another network"):
        params_from_torch({"inc.double_conv.0.weight": np.zeros((64, 3, 3, 3)),
                           "outc.conv.weight": np.zeros((2, 64, 1, 1))})
    # config_from_torch says the same, where it raised a bare KeyError.
    with pytest.raises(ValueError, match="down_convolution_1"):
        config_from_torch({})
    sd = dict(torch_model(3, 1).state_dict())
    sd.pop("out.weight")
    with pytest.raises(ValueError, match=r"no key 'out\.weight': not the guide's UNet"):
        config_from_torch(sd)


def test_a_tensor_of_another_shape_is_named_at_import():
    """A width-8 state_dict with one layer of another width imported without a word;
    the run then failed later, as a checkpoint that does not fit its own config."""
    sd = {k: v.numpy() for k, v in torch_model(3, 1).state_dict().items()}
    sd["bottle_neck.conv_op.0.weight"] = np.zeros((1024, 500, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"^state_dict's bottle_neck.conv_op.0.weight has "
                       r"shape \(1024, 500, 3, 3\), but the U-Net its first layer and head "
                       r"describe \(width 64, depth 4\) needs \(1024, 512, 3, 3\)"):
        params_from_torch(sd)
    sd["bottle_neck.conv_op.0.weight"] = np.zeros(7, np.float32)  # not even a kernel
    with pytest.raises(ValueError, match=r"has shape \(7,\)"):
        params_from_torch(sd)


def test_weights_of_a_diverged_run_or_a_foreign_first_layer_are_named_at_import():
    """NaN weights (saved after the loss became NaN) imported with exit 0 and predicted
    empty masks; a first layer of 5x5 kernels was refused as '--in-channels 5', a flag
    import_torch does not have."""
    sd = {k: v.numpy() for k, v in torch_model(3, 1).state_dict().items()}
    bad = dict(sd, **{"up_convolution_2.up.bias": np.full(256, np.nan, np.float32)})
    with pytest.raises(ValueError, match=r"^state_dict's up_convolution_2.up.bias holds NaN "
                       "or infinite values"):
        params_from_torch(bad)
    first = "down_convolution_1.conv.conv_op.0.weight"
    for shape, why in [((64, 3, 5, 5), r"has shape \(64, 3, 5, 5\), not the guide's "
                        r"\(out, in, 3, 3\)"), ((64, 4, 3, 3), "takes 4 input channels; "
                        r"unet-jax takes 1 \(grayscale\) or 3 \(RGB\)")]:
        with pytest.raises(ValueError, match=why):
            config_from_torch(dict(sd, **{first: np.zeros(shape, np.float32)}))
