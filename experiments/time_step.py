"""Times the jitted FFCL train step of a config on this machine (no input pipeline).

    python experiments/time_step.py --config=configs/fashion_mnist.py
    python experiments/time_step.py --config=configs/cifar100.py --repeats=5

Prints the compile time (first call) and the min / median of `--repeats` timed steps on one fixed
random batch of the config's shape, and img/s at the median. A steady-state speed of the step
alone; the whole-epoch speed with the input pipeline is the `img/s` of a training run's log.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ffcl_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after the compile.")


def main(_):
    config = _CONFIG.value
    settings = train.check_config(config, jax.device_count())
    setup, state = train.build(config, settings, steps_per_epoch=1000)  # cost ignores the value
    mesh = train.Mesh()
    state = jax.device_put(state, mesh.replicated)
    step = jax.jit(setup.train_step, donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = mesh.global_batch(
        {
            "image": rng.integers(0, 256, (config.batch_size, *setup.info.image_shape), np.uint8),
            "label": rng.integers(0, setup.info.num_classes, (config.batch_size,), np.int32),
        }
    )
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(
        json.dumps(
            {
                "pair": f"{config.teacher}+{config.student}",
                "method": config.method,
                "dataset": config.dataset,
                "batch_size": config.batch_size,
                "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "compile_seconds": round(compile_seconds, 2),
                "step_ms_min": round(1000 * min(times), 1),
                "step_ms_median": round(1000 * median, 1),
                "img_per_sec_median": round(config.batch_size / median, 1),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
