"""One process of a (possibly multi-process) CPU training run, for the multi-host test.

    python tests/helpers/multiprocess_run.py PROC NUM_PROCS PORT DEVICES IDX_DIR WORKDIR OUT STEPS \
        [VALIDATION]

Forces DEVICES CPU devices, joins `jax.distributed` on localhost:PORT when NUM_PROCS > 1,
trains the tiny test config (its method, or `FFCL_TEST_METHOD`'s; its compute dtype, or
`FFCL_TEST_DTYPE`'s, float64 with JAX_ENABLE_X64=1) for STEPS steps (one epoch
of STEPS batches of 32; with VALIDATION, that many held-out images evaluated after it), and
writes this process's own copy of the parameters and BatchNorm statistics at the final
checkpoint to OUT (.npz; PCL's temporal mean too), plus the run's results (OUT.json).
"""

from __future__ import annotations

import json
import os
import sys

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
idx_dir, workdir, out = sys.argv[5:8]
steps = int(sys.argv[8])
validation = int(sys.argv[9]) if len(sys.argv) > 9 else 0
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )

from ffcl_jax import checkpoint, export, train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

local_copies = {}
original_save = checkpoint.RunCheckpoints.save


def save(self, step, state, meta, metrics=None):
    # This process's own replica of every array, as it is in memory when the run saves.
    local_copies.update(
        {
            f"{kind}/{name}": np.asarray(value)
            for kind, tree in checkpoint.saved_tree(state).items()
            if kind in ("params", "batch_stats", "mean_params", "mean_batch_stats")
            for name, value in export.flatten(
                jax.tree.map(lambda x: x.addressable_data(0), tree)
            ).items()
        }
    )
    original_save(self, step, state, meta, metrics)


checkpoint.RunCheckpoints.save = save
# VALIDATION > 0 holds out that many of the first 32 * STEPS + VALIDATION training images.
config = tiny_config(
    idx_dir,
    batch_size=32,
    eval_batch_size=20,
    num_epochs=1,
    train_examples=32 * steps + validation,
    validation_size=validation,
    final_test=True,
    # A gs:// workdir on the test's GCS emulator: TensorFlow's events writer cannot reach it.
    tensorboard_dir=os.environ.get("FFCL_TEST_TENSORBOARD_DIR"),
)
config.method = os.environ.get("FFCL_TEST_METHOD", config.method)
config.compute_dtype = os.environ.get("FFCL_TEST_DTYPE", config.compute_dtype)
results = train.train_and_evaluate(config, workdir)
np.savez(out, **local_copies)
with open(out + ".json", "w") as f:
    json.dump(
        {
            "history": results["history"],
            "final_test": results["final_test"],
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
        },
        f,
    )
