"""Measures, on 8 forced CPU devices, what the data-parallel tests assert (prints JSON).

    python tests/helpers/device_equivalence.py IDX_DIR STEPS

- `global`: STEPS train steps on a mesh of 1, 2 and 8 devices from the same state and batches:
  the losses of every step and the largest parameter / BatchNorm difference to 1 device; the
  same for permuted rows on 1 device (`control_max_diff`) and for one step on 8 devices;
- `eval`: top-1 and example counts of the same state evaluated on 1 and 8 devices;
- `per_device`: one step with per-device BatchNorm on 2 devices against the mean of two 1-device
  steps on each half of the batch (what per-device statistics mean), and on 1 device against
  the global mode;
- `closed_form`: one step with the closed-form BatchNorm backward, global on 8 devices and
  per-device on 2, against the same autodiff references;
- `onednn`: one step with the oneDNN convolutions forced (`cpu.kernels="onednn"`), global on 8
  devices, against the same reference on XLA's kernels;
- `methods`: STEPS steps of KDCL, PCL, MCL (batches of views; PCL's temporal mean
  included; MCL on class-balanced rows, its similarity matrices over the global batch)
  SwitOKD (its teacher paused on some steps) and FFSD (Adam and SGD groups, inference-mode
  decoders within the step) on 8 devices against 1.

Everything else runs on XLA's kernels (`cpu.kernels="xla"`): this measures partitioning.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ffcl_jax import (  # noqa: E402
    checkpoint,
    class_balance,
    cpu_kernels,
    datasets,
    export,
    parallel,
    train,
)
from tests.conftest import tiny_config  # noqa: E402

idx_dir, num_steps = sys.argv[1], int(sys.argv[2])
config = tiny_config(
    idx_dir, batch_size=32, eval_batch_size=16, learning_rate=0.05, **{"cpu.kernels": "xla"}
)
images, labels = datasets.load_idx_split(idx_dir, "train")
batches = [
    {"image": images[i * 32 : (i + 1) * 32], "label": labels[i * 32 : (i + 1) * 32]}
    for i in range(num_steps)
]


TEACHER_UPDATES: list[float] = []  # the flags of a method that pauses its teacher


def run(
    num_devices: int,
    batch_norm: str,
    steps: list[dict],
    bn_backward: str = "autodiff",
    kernels: str = "xla",
):
    config.batch_norm = batch_norm
    config.batch_norm_backward = bn_backward
    config.cpu.kernels = kernels
    mesh = parallel.DataParallel(num_devices)
    method = train.check_config(config, mesh.size)
    setup, state = train.build(config, method, steps_per_epoch=100, data_parallel=mesh)
    state = jax.device_put(state, mesh.replicated)
    step = jax.jit(setup.train_step, donate_argnums=0)
    losses = []
    with jax.set_mesh(mesh.mesh):
        for batch in steps:
            state, metrics = step(state, mesh.global_batch(batch))
            losses.append(float(metrics["loss"]))
            if "updates_teacher" in metrics:
                TEACHER_UPDATES.append(float(metrics["updates_teacher"]))
    flat = {
        f"{kind}/{k}": v
        for kind, tree in checkpoint.saved_tree(state).items()
        if kind in ("params", "batch_stats", "mean_params", "mean_batch_stats")
        for k, v in export.flatten(tree).items()
    }
    return losses, flat, state, setup, mesh


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


out = {"global": {}, "eval": {}, "per_device": {}}
reference_losses, reference, state, setup, _ = run(1, "global", batches)
out["global"]["1"] = {"losses": reference_losses, "max_diff": 0.0}
for n in (2, 8):
    losses, flat, *_ = run(n, "global", batches)
    out["global"][str(n)] = {"losses": losses, "max_diff": max_diff(flat, reference)}
# Control: the same batches with their rows permuted, on one device. Mathematically the same
# steps; only the order of float summations changes, as it does across devices.
rng = np.random.default_rng(1)
permuted = [{k: v[order] for k, v in b.items()} for b in batches for order in [rng.permutation(32)]]
out["control_max_diff"] = max_diff(run(1, "global", permuted)[1], reference)
out["one_step_max_diff_8"] = max_diff(
    run(8, "global", batches[:1])[1], run(1, "global", batches[:1])[1]
)

test_images, test_labels = datasets.load_idx_split(idx_dir, "test")
for n in (1, 8):
    mesh = parallel.DataParallel(n)
    with jax.set_mesh(mesh.mesh):
        accuracy = train.evaluate(
            jax.jit(setup.eval_step),
            jax.device_put(state, mesh.replicated),
            mesh,
            test_images,
            test_labels,
            config,
        )
    out["eval"][str(n)] = accuracy
out["eval"]["num_test"] = len(test_images)

first = batches[:1]
halves = [{k: v[:16] for k, v in first[0].items()}, {k: v[16:] for k, v in first[0].items()}]
loss_2, per_device, *_ = run(2, "per_device", first)
half_runs = [run(1, "global", [half]) for half in halves]
mean_of_halves = {k: (half_runs[0][1][k] + half_runs[1][1][k]) / 2 for k in per_device}
out["per_device"]["vs_halves"] = max_diff(per_device, mean_of_halves)
out["per_device"]["loss_vs_halves"] = abs(loss_2[0] - (half_runs[0][0][0] + half_runs[1][0][0]) / 2)
out["per_device"]["vs_global_2_devices"] = max_diff(per_device, run(2, "global", first)[1])
out["per_device"]["one_device_vs_global"] = max_diff(
    run(1, "per_device", first)[1], run(1, "global", first)[1]
)
# The closed-form BatchNorm backward, sharded: global statistics over 8 devices and per-device
# statistics over 2, against the autodiff runs above.
out["closed_form"] = {
    "global_8_vs_autodiff_1": max_diff(
        run(8, "global", first, "closed_form")[1], run(1, "global", first)[1]
    ),
    "per_device_2_vs_halves": max_diff(
        run(2, "per_device", first, "closed_form")[1], mean_of_halves
    ),
}
if cpu_kernels.available():
    out["onednn"] = {
        "global_8_vs_xla_1": max_diff(
            run(8, "global", first, kernels="onednn")[1], run(1, "global", first)[1]
        ),
    }
out["methods"] = {}
for method in ("kdcl", "pcl", "mcl", "switokd", "ffsd"):
    config.method = method
    # SwitOKD on sharp switch distributions: its teacher is paused on some of the steps.
    config.loss.switch_tau = 0.2 if method == "switokd" else None
    TEACHER_UPDATES.clear()
    num_views = train.check_config(config, 1).num_views
    shifted = [  # views that differ: each shifted by its own number of pixels
        {"image": np.stack([np.roll(b["image"], v, axis=2) for v in range(num_views)], axis=1)}
        | {"label": b["label"]}
        for b in batches
    ]
    if method == "mcl":  # one view, class-balanced rows (8 classes x 4), as its pipeline gives
        rows = class_balance.class_balanced_order(labels, 4, 32, num_steps, 0)
        shifted = [{"image": images[r], "label": labels[r]} for r in rows.reshape(-1, 32)]
    elif num_views == 1:  # one view (SwitOKD; FFSD's five members and two decoders)
        shifted = batches
    one_losses, one, *_ = run(1, "global", shifted)
    eight_losses, eight, *_ = run(8, "global", shifted)
    out["methods"][method] = {
        "losses_1": one_losses,
        "losses_8": eight_losses,
        "max_diff": max_diff(eight, one),
        "temporal_mean": any(k.startswith("mean_params/") for k in one),
        "teacher_updates": list(TEACHER_UPDATES),  # 1 device's flags, then 8 devices'
    }
print("RESULT " + json.dumps(out))
