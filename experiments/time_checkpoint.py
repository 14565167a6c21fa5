"""Times saving and restoring a full run checkpoint of a config's cohort (orbax, as training does).

    python experiments/time_checkpoint.py --config=configs/cifar100.py

Builds the initial state of the config (teacher, student, fusion, BatchNorm statistics, optimizer
state; no data needed), then `--repeats` times: saves it as the training loop does, measuring
the time the loop is blocked (`save` returns once the arrays are copied off the device; the
files are written in a background thread) and the time until the checkpoint is complete on disk;
then restores it. Prints one JSON line with the median times and the size on disk.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ffcl_jax import checkpoint, parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar100.py", "Config file.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed saves.")


def _size(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def main(_):
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    mesh = parallel.DataParallel(config.mesh.data)
    settings = train.check_config(config, mesh.size)
    _, state = train.build(config, settings, steps_per_epoch=1000)
    state = jax.device_put(state, mesh.replicated)
    blocked, complete, restore = [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = checkpoint.RunCheckpoints(workdir, config)
        meta = {"config": json.loads(config.to_json_best_effort()), "progress": {}}
        for step in range(1, _REPEATS.value + 1):
            start = time.perf_counter()
            checkpoints.save(step, state, meta)
            blocked.append(time.perf_counter() - start)
            checkpoints.wait()
            complete.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(checkpoints.restore_state(step, state))
            restore.append(time.perf_counter() - start)
        size = _size(os.path.join(checkpoints.directory, str(_REPEATS.value)))
        checkpoints.close()
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        json.dumps(
            {
                "pair": f"{config.teacher}+{config.student}",
                "method": config.method,
                "parameters": int(num_params),
                "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "save_blocking_s_median": round(float(np.median(blocked)), 3),
                "save_complete_s_median": round(float(np.median(complete)), 3),
                "restore_s_median": round(float(np.median(restore)), 3),
                "checkpoint_mb": round(size / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
