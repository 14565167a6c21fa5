"""SHA-256 of the demo cohort's parameters, BatchNorm statistics and losses after a few real steps.

A refactoring that must not change numerics is checked by running this before and after it, in
the same environment (one machine kind, one jaxlib, the CLI's XLA flags), and comparing the
printed digests:

    XLA_FLAGS=--xla_backend_extra_options=xla_cpu_flatten_after_fusion \
        .venv/bin/python scripts/fingerprint.py --steps=5 [--set method=ffl ...]

The steps take the first batches of the demo config's real training pipeline (Fashion-MNIST
IDX files, tf.data augmentation), so data, model, losses, optimizer and BatchNorm all count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.fashion_mnist import get_config  # noqa: E402
from ffcl_jax import input_pipeline, parallel, train  # noqa: E402


def apply_override(config, assignment: str) -> None:
    key, _, text = assignment.partition("=")
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    current = target[leaf]
    if isinstance(current, bool):
        value = text.lower() in ("1", "true")
    elif isinstance(current, int):
        value = int(text)
    elif isinstance(current, float):
        value = float(text)
    else:
        try:
            value = float(text) if "." in text or "e" in text.lower() else text
        except ValueError:
            value = text
    target[leaf] = value


def digest(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(jax.device_get(tree)), key=lambda kv: str(kv[0])
    ):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="key=value config override")
    args = parser.parse_args()
    config = get_config()
    for assignment in args.set:
        apply_override(config, assignment)
    settings = train.check_config(config, 1)
    images, labels = input_pipeline.load_split(config, "train")
    mesh = parallel.DataParallel(1)
    data = train.make_train_data(config, images, labels, mesh)
    setup, state = train.build(config, settings, data.steps_per_epoch, mesh)
    step, _ = train.jit_steps(setup, config)
    losses = []
    with jax.set_mesh(mesh.mesh):
        state = jax.device_put(state, mesh.replicated)
        for index, batch in enumerate(data.epoch(0)):
            if index == args.steps:
                break
            state, metrics = step(state, mesh.global_batch(batch))
            losses.append(metrics["loss"])
    print(f"params      {digest(state.params)}")
    print(f"batch_stats {digest(state.batch_stats)}")
    print(f"losses      {digest(losses)}  last {float(losses[-1])!r}")


if __name__ == "__main__":
    main()
