"""Data parallelism: one `jax.make_mesh` axis, `data`, over every device of every process.

The batch is a global array sharded over `data` and the state is replicated; the step is written
for one device and XLA partitions it (GSPMD). BatchNorm statistics are then those of the global
batch (SyncBN); `config.batch_norm="per_device"` maps the step over the mesh instead (see
`steps.make_train_step`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffcl_jax.errors import UserError

# A TPU lays a convolution's activations out with the batch in the 128 lanes of its tiles (the
# compiled step's `{0,3,2,1:T(8,128)}` layouts, docs/performance.md): fewer images a chip are
# padded to 128, and each step moves the activation bytes of 128 images for the work of fewer.
TPU_LANES = 128


def small_batch_warning(global_batch: int, num_devices: int, platform: str) -> str | None:
    """One line for a TPU run whose chips get fewer than `TPU_LANES` images a step, saying what
    it costs and what to change; None elsewhere."""
    per_chip = global_batch // num_devices
    if platform != "tpu" or per_chip >= TPU_LANES:
        return None
    return (
        f"warning: {per_chip} images a chip (batch_size {global_batch} over {num_devices} "
        f"chips) is below {TPU_LANES}: the TPU pads activations to {TPU_LANES}-lane tiles, so a "
        f"step moves about the activation bytes of {TPU_LANES} images a chip "
        f"({TPU_LANES / per_chip:.3g}x those of {per_chip}) for the work of {per_chip}; use "
        f"batch_size >= {TPU_LANES * num_devices} or fewer chips (config.mesh.data)"
    )


class DataParallel:
    """A 1-D data-parallel mesh (`jax.make_mesh`, axis `data`) with the shardings the loop needs:
    `data` splits a global batch over the devices, `replicated` holds the state on each.

    `num_devices=-1` takes every device of every process. The axis is `Auto` (GSPMD
    propagation): the step is written for one device and XLA partitions it. `devices`: the
    devices to take them from, `jax.devices()` by default; `compile_for` passes the compile-only
    devices of a TPU slice that is not here (`jax.experimental.topologies`). `platform` says
    which backend the mesh's devices belong to.
    """

    def __init__(self, num_devices: int = -1, devices: list[jax.Device] | None = None):
        devices = list(jax.devices() if devices is None else devices)
        n = len(devices) if num_devices in (-1, None) else int(num_devices)
        if not 1 <= n <= len(devices):
            raise UserError(
                f"config.mesh.data={num_devices} devices asked for, {len(devices)} available; "
                "use -1 for all of them"
            )
        if n != len(devices) and len({d.process_index for d in devices}) > 1:
            raise UserError(
                "a multi-process run shards over every device: leave config.mesh.data at -1"
            )
        self.mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
        )
        self.size = n
        self.platform = devices[0].platform
        self.data = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles every process's local batch into one array sharded over `data`.

        A batch already made on the devices (`DeviceTrainData`) is passed through."""
        if all(isinstance(v, jax.Array) for v in local_batch.values()):
            return local_batch
        return {
            k: jax.make_array_from_process_local_data(self.data, v) for k, v in local_batch.items()
        }
