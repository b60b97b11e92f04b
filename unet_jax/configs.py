"""Named runs, as code: each preset is a function returning a ``Config``.

``python -m experiments.train --preset NAME`` starts from the preset; any flag given
with it overrides that one field. Library users call the function and change what they
need with ``dataclasses.replace``. Each docstring gives the command that runs the preset
and what it reached when it was measured.
"""

from __future__ import annotations

import dataclasses

from unet_jax.config import Config


def default() -> Config:
    """The first run of a newcomer: a narrow U-Net on the sample set, on a laptop CPU.

    ``python -m experiments.train --platform cpu`` (no flags: this preset). The guide's
    topology at an eighth of its width (``base_features`` 8: 485,817 parameters instead
    of 31,031,745) at 64x96, 8 epochs at lr 2e-3, so that it trains in under a minute on
    two CPU cores; for the guide's full-width model use ``--preset full`` (or
    ``--base-features 64``). Measured from a clean clone: the README ("Two commands").
    """
    return Config(base_features=8, image_size=(64, 96), batch_size=8, epochs=8,
                  learning_rate=2e-3)


def full() -> Config:
    """The guide's full-width U-Net (31,031,745 parameters) on the sample set, on a CPU.

    ``python -m experiments.train --platform cpu --preset full``: 12 epochs at 64x96,
    batch 8, lr 3e-4. On a 2-core AVX-512 Xeon it trained in about 9 minutes (7.4-8.7
    images/s) to a best validation Dice of 0.973.
    """
    return Config(base_features=64, image_size=(64, 96), batch_size=8, epochs=12,
                  learning_rate=3e-4)


def seed_gpu() -> Config:
    """The guide's "Hyperparameter Tuning for GPU config": 512x512, batch 32, lr 3e-4, 6 epochs.

    ``python -m experiments.train --platform gpu --data-dir ~/carvana --preset seed-gpu``
    on Kaggle's Carvana training set (5,088 photos of 318 cars), all of the data, split
    by car. Its full training run has not been measured; the speed of its training step
    on an H200 is in docs/benchmarks.md.
    """
    return Config(image_size=(512, 512), batch_size=32, learning_rate=3e-4, epochs=6)


def seed_cpu() -> Config:
    """The guide's "Minimal Working Example (MWE-CPU)": 10% of the cars, batch 4, 2 epochs.

    ``python -m experiments.train --platform cpu --data-dir ~/carvana --preset seed-cpu``:
    the full-width model at the guide's 512x512. At about 0.2 training images/s on a
    2-core CPU (``python -m experiments.benchmark --image-size 512 --batch-size 4``) its
    2 epochs over ~400 images take about an hour and a half.
    """
    return Config(image_size=(512, 512), batch_size=4, learning_rate=3e-4, epochs=2,
                  subset=0.1)


def tiny() -> Config:
    """A run of seconds, for tests and for trying the tools: width 4, depth 2, 32x48.

    ``python -m experiments.train --platform cpu --preset tiny --data-dir DIR``. It
    learns (the tests check that its loss falls) but is not meant to be good.
    """
    return Config(base_features=4, depth=2, image_size=(32, 48), batch_size=4, epochs=2,
                  learning_rate=3e-3)


PRESETS = {"default": default, "full": full, "seed-gpu": seed_gpu, "seed-cpu": seed_cpu,
           "tiny": tiny}


def get(name: str, **overrides) -> Config:
    """The preset ``name`` with ``overrides`` applied (checked like any Config)."""
    from unet_jax.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)
