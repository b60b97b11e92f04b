"""One Config: normalised values, one-line errors naming the flag, presets, flags made
from the fields, and a platform choice that changes nothing at import."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_jax import config as config_lib, configs
from unet_jax.config import Config, ConfigError, flag

ROOT = Path(__file__).resolve().parents[1]


def test_values_are_normalised_so_equal_runs_compare_equal(tmp_path):
    assert Config(image_size=64).image_size == (64, 64)
    assert Config(image_size=[64]).image_size == (64, 64)
    assert Config(image_size=[32, 48]) == Config(image_size=(32, 48))
    (tmp_path / "d").mkdir()
    a = Config(data_dir=str(tmp_path / "d"))
    b = Config(data_dir=str(tmp_path / "d") + "/")
    c = Config(data_dir=str(tmp_path / "x" / ".." / "d"))
    assert a == b == c and Path(a.data_dir).is_absolute()
    assert Config.from_dict({**a.to_dict(), "device_count": 8}) == a
    # numpy's integers are whole numbers: an array, or a value from np.arange.
    assert Config(image_size=np.array([32, 48])).image_size == (32, 48)
    assert Config(image_size=(np.int64(32), 48), crop=np.int64(16)).crop == (16, 16)
    assert type(Config(image_size=np.int64(32)).image_size[0]) is int  # JSON writes it


def test_a_misspelt_setting_is_refused_not_dropped():
    """from_dict dropped keys it did not know: base_feature=8 trained the default 64."""
    with pytest.raises(ConfigError, match=r"^unknown setting\(s\) base_feature, epoch: not "
                       r"fields of unet_jax.Config \(misspelt"):
        Config.from_dict({"base_feature": 8, "epoch": 3, "backend": "cpu"})


def test_round_trip_through_json(tmp_path):
    config = configs.get("tiny", num_classes=3, augment=True)
    (tmp_path / "config.json").write_text(config.to_json())
    assert Config.load(tmp_path / "config.json") == config


@pytest.mark.parametrize("fields,flag", [
    (dict(image_size=(100, 96)), "--image-size"),
    (dict(image_size=(0, 96)), "--image-size"),
    (dict(batch_size=0), "--batch-size"),
    (dict(epochs=-1), "--epochs"),
    (dict(learning_rate=float("nan")), "--lr"),
    (dict(learning_rate=0.0), "--lr"),
    (dict(subset=1.5), "--subset"),
    (dict(val_fraction=1.0), "--val-fraction"),
    (dict(in_channels=2), "--in-channels"),
    (dict(num_classes=257), "--num-classes"),
    (dict(loss="hinge"), "--loss"),
    (dict(focal_gamma=-1.0), "--focal-gamma"),
    (dict(focal_gamma=float("inf")), "--focal-gamma"),
    (dict(tversky_alpha=1.5), "--tversky-alpha"),
    (dict(attention=True, skip_connections=False), "--attention"),
    (dict(crop=(30, 32)), "--crop"),
    (dict(scale=0.5), "--scale"),
    (dict(crop=32, scale=0.0), "--scale"),
    (dict(crop=32, crops_per_image=0), "--crops-per-image"),
    (dict(crops_per_image=4), "--crops-per-image"),
    (dict(overlap=1.0), "--overlap"),
    (dict(overlap=-0.1), "--overlap"),
    (dict(tta="rot90"), "--tta"),
    (dict(augment="flip,warp"), "--augment"),
    (dict(dtype="float16"), "--dtype"),
    (dict(kernels="fast"), "--kernels"),
    (dict(group_by="(patient"), "--group-by"),
    (dict(group_by="^(p\\d+)_", split="random"), "--group-by"),
    (dict(seed=-1), "--seed"),
    (dict(seed=2**63), "--seed"),
    (dict(max_value=-1.0), "--max-value"),
    (dict(max_value=float("nan")), "--max-value"),
    (dict(weight_decay=-0.01), "--weight-decay"),
    (dict(cache=""), "--cache"),
    (dict(cache="memmory"), "--cache"),
    (dict(cache="memroy"), "--cache"),
    (dict(schedule="plateau", plateau_patience=0), "--plateau-patience"),
    (dict(schedule="plateau", plateau_factor=1.0), "--plateau-factor"),
    (dict(plateau_patience=5), "--plateau-patience"),
    (dict(split="patient"), "--split"),
    (dict(remat="all"), "--remat"),
    (dict(val_data_dir="/data/val"), "--val-data-dir"),
    (dict(data_dir="/data/train", val_data_dir="/data/train"), "--val-data-dir"),
    (dict(data_dir="/data/train", val_data_dir="/data/val", val_fraction=0.1),
     "--val-fraction"),
    (dict(data_dir="/data/train", val_data_dir="/data/val", split="random"), "--split"),
    (dict(ignore_index=1), "--ignore-index"),
    (dict(num_classes=21, ignore_index=20), "--ignore-index"),
    (dict(ignore_index=256), "--ignore-index"),
])
def test_bad_values_give_one_line_naming_the_flag(fields, flag):
    with pytest.raises(ConfigError) as e:
        Config(**fields)
    message = str(e.value)
    assert message.startswith(flag) and "\n" not in message


def test_the_size_error_suggests_valid_sizes():
    with pytest.raises(ConfigError, match="height 100 -> 96 or 112"):
        Config(image_size=(100, 96))


def test_presets_are_valid_configs_and_flags_override_them():
    for name, make in configs.PRESETS.items():
        assert isinstance(make(), Config), name
        assert make.__doc__ and "python -m experiments.train" in make.__doc__, name
    assert configs.seed_gpu().image_size == (512, 512) and configs.seed_gpu().batch_size == 32
    assert configs.seed_cpu().subset == 0.1 and configs.seed_cpu().batch_size == 4
    assert configs.full().base_features == 64
    assert configs.get("seed-gpu", epochs=1).epochs == 1
    with pytest.raises(ConfigError, match="--preset"):
        configs.get("nope")


def test_every_field_is_a_flag_with_help():
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, configs.default())
    text = parser.format_help()
    for field in dataclasses.fields(Config):
        assert config_lib.flag(field.name) in text, field.name
    args = parser.parse_args(["--image-size", "32", "--lr", "0.01", "--augment",
                              "--num-classes", "3"])
    assert config_lib.overrides(args) == {"image_size": [32], "learning_rate": 0.01,
                                          "augment": "flip,shift,color", "num_classes": 3}
    assert dataclasses.replace(Config(), **config_lib.overrides(args)).image_size == (32, 32)
    args = parser.parse_args(["--augment", "rotate,elastic", "--crop", "32", "48"])
    config = dataclasses.replace(Config(), **config_lib.overrides(args))
    assert config.augment == "elastic,rotate" and config.crop == (32, 48)
    assert config_lib.overrides(parser.parse_args([])) == {}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository, without the caller's XLA_FLAGS unless
    ``env`` gives some."""
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**base, **env}, timeout=120)


def _python(code: str, **env) -> str:
    result = _run(code, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_changes_nothing_in_the_environment():
    code = ("import os; before = dict(os.environ); import unet_jax, data_pipeline, "
            "experiments.train; print(before == dict(os.environ))")
    assert _python(code) == "True"


def test_import_leaves_logging_to_the_user():
    """orbax logs through absl as it is imported, and absl gave the root logger a
    handler: a user's own basicConfig afterwards was ignored."""
    code = ("import logging, unet_jax, data_pipeline, experiments.train; "
            "print(len(logging.root.handlers)); "
            "logging.basicConfig(format='MINE %(message)s'); logging.warning('hi')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "0" and result.stderr.strip().endswith("MINE hi")


def test_setup_platform_adds_cpu_flags_on_the_cpu_and_keeps_the_users():
    code = ("import os, unet_jax; print(unet_jax.setup_platform('cpu')); "
            "print(os.environ['XLA_FLAGS'])")
    backend, flags = _python(code, XLA_FLAGS="--xla_dump_to=/nonexistent-unused "
                             "--xla_cpu_enable_concurrency_optimized_scheduler=true").splitlines()
    assert backend == "cpu"
    assert "--xla_dump_to=/nonexistent-unused" in flags
    assert "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in flags
    # The user's own value of a flag the project also sets is kept, not overridden.
    assert flags.count("concurrency_optimized_scheduler") == 1 and "=true" in flags


def test_setup_platform_after_jax_started_says_its_cpu_flags_come_too_late():
    """It returned 'cpu' and did nothing else: XLA had read XLA_FLAGS as it started."""
    code = ("import jax.numpy as jnp, unet_jax; jnp.ones(1); unet_jax.setup_platform('cpu'); "
            "unet_jax.setup_platform('cpu'); print('ok')")
    result = _run(code)
    assert result.stdout.strip() == "ok", result.stderr
    assert result.stderr.count("setup_platform('cpu') after JAX started computing: its "
                               "CPU settings (XLA_FLAGS) apply from the next process on; "
                               "call it before any JAX computation") == 1, result.stderr


def test_setup_platform_rejects_an_unknown_platform():
    from unet_jax.platform import PlatformError, configure_platform

    with pytest.raises(PlatformError, match="--platform 'tpu'"):
        configure_platform("tpu")


def test_a_list_of_augmentations_and_the_warmup_example_are_valid():
    """augment=["flip", "shift"] was read as the text of the list ("unknown
    augmentation \"['flip'\""), and warm-up's example for a 1-epoch run was 1, which it
    had just refused."""
    assert Config(augment=["shift", "flip"]).augment == "flip,shift"
    with pytest.raises(ConfigError) as e:
        Config(warmup_epochs=1, epochs=1)
    example = float(str(e.value).rsplit("e.g. ", 1)[1])
    assert Config(warmup_epochs=example, epochs=1).warmup_epochs == example


def test_a_disk_cache_goes_to_the_users_cache_folder_and_a_prefix_is_absolute(
        tmp_path, monkeypatch):
    """'disk' had been a file prefix in the current folder (disk-<hash>.images.npy),
    and a relative prefix in config.json meant another place in another folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    # The word is kept (a run resumed on another machine finds its own folder there).
    assert Config(cache="disk").cache == "disk"
    assert Config(cache="disk").data_cache == str(tmp_path / "xdg" / "unet-jax" / "data" /
                                                  "decoded")
    assert Config(cache="big/train").cache == str(tmp_path / "big" / "train")
    assert Config(cache="memory").cache == "memory" and Config(cache="none").cache == "none"
    assert Config(cache="MEMORY").cache == "memory"  # not a file prefix
    # Prefixes that only look like the words stay prefixes.
    for prefix in ("mydisk", "memory_cache", "notes"):
        assert Config(cache=prefix).cache == str(tmp_path / prefix)
    # A folder keeps the files in it (they had gone beside it, as <folder>-<hash>...),
    # once: the prefix in config.json reads the same on a resume.
    (tmp_path / "scratch").mkdir()
    for given in ("scratch", "scratch/", "later/"):
        folder = tmp_path / given.rstrip("/")
        assert Config(cache=given).cache == str(folder / "decoded")
        assert Config(cache=Config(cache=given).cache).cache == str(folder / "decoded")


def test_a_validation_percentage_is_named_as_a_fraction():
    """milesial/Pytorch-UNet's --validation 10 is a percentage."""
    with pytest.raises(ConfigError, match=r"^--val-fraction 10\.0: give a fraction in \(0, "
                       r"1\) \(10% is 0\.1\)$"):
        Config(val_fraction=10)
    # Its --validation 0, "no validation": what to do instead.
    with pytest.raises(ConfigError, match=r"^--val-fraction 0\.0: give a fraction in \(0, 1\) "
                       r"\(validation picks the checkpoint .* --val-data-dir\)$"):
        Config(val_fraction=0)


def test_memory_is_the_containers_limit_where_it_is_lower(tmp_path, monkeypatch):
    """A container sees the machine's memory in sysconf and is killed at its cgroup's
    limit: caches and whole-image passes are sized by the lower of the two, its own
    group's or any group's above it, cgroup v2 or v1."""
    from unet_jax.platform import memory_limit

    page = 4096
    monkeypatch.setattr(os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE"
                        else (64 << 30) // page)  # a 64 GiB machine
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    (root / "jobs" / "job7").mkdir(parents=True)
    own.write_text("0::/jobs/job7\n")
    assert memory_limit(root, own) == 64 << 30  # no limit files: the machine's
    (root / "jobs" / "job7" / "memory.max").write_text("max\n")
    assert memory_limit(root, own) == 64 << 30
    (root / "jobs" / "memory.max").write_text(f"{8 << 30}\n")  # the parent's limit holds
    assert memory_limit(root, own) == 8 << 30
    (root / "jobs" / "job7" / "memory.max").write_text(f"{2 << 30}\n")
    assert memory_limit(root, own) == 2 << 30
    # cgroup v1, its memory controller beside others, and the group mounted at the
    # container's root while the path names the host's group.
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    own.write_text("12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n")
    assert memory_limit(root, own) == 3 << 30
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(root, own) == 64 << 30  # v1's "no limit"
    assert memory_limit(root, tmp_path / "absent") == 64 << 30


@pytest.mark.parametrize("name", ["skip_connections", "attention", "learning_rate",
                                  "group_by", "val_fraction", "image_size", "seed"])
def test_a_null_setting_is_named_unless_the_setting_can_be_unset(name):
    """A null read from a JSON or YAML file: skip_connections=None had built a U-Net
    without skips, the numbers failed with TypeErrors naming no setting."""
    with pytest.raises(ConfigError, match=rf"^{flag(name)} None: give .* \(the default is "):
        Config(**{name: None})
    for unset in ("init_from", "crop", "ignore_index", "val_data_dir", "data_dir"):
        assert getattr(Config(**{unset: None}), unset) is None
