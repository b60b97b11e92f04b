"""One place for a run's settings: the model, the data and the optimisation.

``Config`` is plain data. The command-line tools map their flags onto it, and the
trainer writes it as ``config.json`` next to the checkpoints, so that evaluation and
prediction rebuild the exact model without repeating flags, and a run can be
reproduced from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Config:
    # Model (the seed's U-Net by default).
    in_channels: int = 3
    num_classes: int = 1
    base_features: int = 64
    depth: int = 4
    dtype: str = "float32"            # compute dtype; parameters stay float32

    # Data.
    data_dir: Optional[str] = None    # None: the built-in synthetic sample dataset
    image_size: tuple[int, int] = (64, 96)  # (height, width) the model sees
    split: str = "car"                # "car" (no car on both sides) or "random"
    val_fraction: float = 0.2
    subset: float = 1.0
    augment: bool = False
    cache: str = "memory"             # "memory", "none" or a file prefix
    skip_bad: bool = False

    # Optimisation (the guide: AdamW, lr 3e-4, BCE).
    loss: str = "bce"
    learning_rate: float = 3e-4
    weight_decay: float = 1e-2        # torch.optim.AdamW's default, as the guide used
    batch_size: int = 8
    epochs: int = 12
    seed: int = 42

    # Checkpoints.
    keep_checkpoints: int = 2

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Builds a Config from a dict, ignoring keys this version does not know."""
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    @classmethod
    def load(cls, path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))
