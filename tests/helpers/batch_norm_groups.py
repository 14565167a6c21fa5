"""Measures, on 8 forced CPU devices, what BatchNorm over device groups computes (prints JSON).

    python tests/helpers/batch_norm_groups.py IDX_DIR

One train step of a batch of 32 (4 rows a device) from the same state, on XLA's kernels:
- `groups:2` on 8 devices against the mean of four one-device steps, one on each group's 8 rows
  (what statistics over a group of 2 devices mean: the first step's update is linear in the
  gradient), and against `global` and `per_device` on 8 devices, which it must not equal;
- `groups:1` against `per_device`, and `groups:8` against `global`, on 8 devices;
- the all-reduces of each mode's compiled step.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ffcl_jax import checkpoint, compile_for, datasets, export, parallel, train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

config = tiny_config(sys.argv[1], batch_size=32, learning_rate=0.05, **{"cpu.kernels": "xla"})
images, labels = datasets.load_idx_split(sys.argv[1], "train")
batch = {"image": images[:32], "label": labels[:32]}


def run(num_devices: int, batch_norm: str, rows: dict):
    config.batch_norm = batch_norm
    mesh = parallel.DataParallel(num_devices)
    method = train.check_config(config, mesh.size)
    setup, state = train.build(config, method, steps_per_epoch=100, data_parallel=mesh)
    state = jax.device_put(state, mesh.replicated)
    step = jax.jit(setup.train_step, donate_argnums=0)
    with jax.set_mesh(mesh.mesh):
        global_rows = mesh.global_batch(rows)
        hlo = step.lower(state, global_rows).compile().as_text()
        state, metrics = step(state, global_rows)
    flat = {
        f"{kind}/{k}": v
        for kind, tree in checkpoint.saved_tree(state).items()
        if kind in ("params", "batch_stats")
        for k, v in export.flatten(tree).items()
    }
    all_reduces = compile_for.collectives(hlo).get("all-reduce", {"count": 0})["count"]
    return float(metrics["loss"]), flat, all_reduces


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


loss_groups, groups_2, reduces_groups = run(8, "groups:2", batch)
group_rows = [{k: v[i * 8 : (i + 1) * 8] for k, v in batch.items()} for i in range(4)]
quarters = [run(1, "global", rows) for rows in group_rows]
mean_of_groups = {k: sum(q[1][k] for q in quarters) / 4 for k in groups_2}
loss_global, global_8, reduces_global = run(8, "global", batch)
loss_per_device, per_device_8, reduces_per_device = run(8, "per_device", batch)
out = {
    "groups_2_vs_mean_of_group_steps": max_diff(groups_2, mean_of_groups),
    "loss_vs_mean_of_group_losses": abs(loss_groups - sum(q[0] for q in quarters) / 4),
    "groups_2_vs_global": max_diff(groups_2, global_8),
    "groups_2_vs_per_device": max_diff(groups_2, per_device_8),
    "groups_1_vs_per_device": max_diff(run(8, "groups:1", batch)[1], per_device_8),
    "groups_8_vs_global": max_diff(run(8, "groups:8", batch)[1], global_8),
    "all_reduces": {
        "global": reduces_global,
        "per_device": reduces_per_device,
        "groups:2": reduces_groups,
    },
}
print("RESULT " + json.dumps(out))
