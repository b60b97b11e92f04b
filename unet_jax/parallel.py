"""Data parallelism over every device, on one machine or several, with ``jax.sharding``.

One mesh axis, ``data``, spans all devices of all processes. Parameters and optimizer
state are replicated (every device holds a copy: the U-Net's 31M parameters fit any
accelerator); each batch is split along its first axis, one slice per device. The
train step is the same jitted function as on one device: given inputs with these
shardings, XLA partitions the computation and inserts the all-reduce of the gradients
itself, so there is no ``pmap`` and no hand-written collective.

Several machines: every process runs the same program; ``initialize`` connects them
(JAX's distributed runtime), each process loads only its share of every global batch
(``shard_batch`` assembles the global array from the process-local parts), and only
process 0 writes logs and plots. Orbax checkpoints are written by all processes together.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins a multi-process run; must come before any JAX computation.

    With all three arguments the run is described explicitly; with none, JAX reads
    the cluster from the environment (Slurm, Open MPI, TPU and GKE are detected).
    """
    if coordinator is None and num_processes is None and process_id is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)


def make_mesh() -> Mesh:
    """A one-axis mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises ValueError unless the devices divide the global batch evenly."""
    devices = mesh.devices.size
    if global_batch % devices:
        lower = max(devices, global_batch // devices * devices)
        raise ValueError(
            f"--batch-size {global_batch} cannot be split evenly over {devices} devices; "
            f"use a multiple of {devices}, e.g. {lower} or {lower + devices}")


def replicate(tree, mesh: Mesh):
    """Copies a pytree (the train state) to every device."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """The global batch from this process's rows (all rows when there is one process)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded array, as numpy (for plots and files)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of the same rows on several local devices
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)
