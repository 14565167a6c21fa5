"""Class-balanced training batches: every global batch holds `batch_size / images_per_class`
classes with `images_per_class` images each (`config.images_per_class`; MCL's authors train on
64 classes x 2 images). NumPy only, so the tf.data pipeline, the on-device one and the PyTorch
reference draw the same batches from the same seed.
"""

from __future__ import annotations

import numpy as np

from ffcl_jax.errors import UserError


def check_class_balance(labels: np.ndarray, images_per_class: int, global_batch_size: int) -> int:
    """The classes in every class-balanced batch (`global_batch_size / images_per_class`), or a
    `UserError` saying what to change when the training split cannot give such batches."""
    m = images_per_class
    if m < 0:
        raise UserError(
            f"config.images_per_class must be >= 1 (0 or unset: shuffled batches), got {m}"
        )
    if global_batch_size % m:
        raise UserError(
            f"config.batch_size={global_batch_size} is not a multiple of "
            f"config.images_per_class={m}: class-balanced batches hold whole classes"
        )
    classes = global_batch_size // m
    eligible = int(np.sum(np.bincount(labels) >= m)) if len(labels) else 0
    if classes > eligible:
        raise UserError(
            f"batches of {classes} classes x {m} images (config.batch_size="
            f"{global_batch_size}, config.images_per_class={m}) need {classes} classes with at "
            f"least {m} training images each; the training split has {eligible}: raise "
            "config.images_per_class or lower config.batch_size"
        )
    return classes


def class_balanced_order(
    labels: np.ndarray, images_per_class: int, global_batch_size: int, steps: int, seed
) -> np.ndarray:
    """Row indices of `steps` class-balanced global batches, flat (`steps * global_batch_size`).

    Each batch draws its own `global_batch_size / images_per_class` classes without
    replacement (among the classes with at least `images_per_class` rows) and then
    `images_per_class` rows of each class without replacement, class after class; batches are
    independent draws, so an epoch is `steps` batches rather than one pass over the rows (the
    metric-learning "m per class" sampler that MCL's authors train with). Deterministic in
    `seed` (a `np.random.default_rng` seed)."""
    m = images_per_class
    classes = check_class_balance(labels, m, global_batch_size)
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    by_class = [rows for rows in by_class if len(rows) >= m]
    longest = max(len(rows) for rows in by_class)
    # One padded table of rows: a draw of m without replacement is the m smallest of uniform
    # keys, with the padding's keys set above every real one.
    table = np.zeros((len(by_class), longest), np.int64)
    padding = np.ones((len(by_class), longest), bool)
    for c, rows in enumerate(by_class):
        table[c, : len(rows)], padding[c, : len(rows)] = rows, False
    rng = np.random.default_rng(seed)
    order = np.empty((steps, global_batch_size), np.int64)
    for b in range(steps):
        chosen = rng.permutation(len(by_class))[:classes]
        keys = np.where(padding[chosen], 2.0, rng.random((classes, longest)))
        picks = np.argsort(keys, axis=1, kind="stable")[:, :m]
        order[b] = np.take_along_axis(table[chosen], picks, axis=1).reshape(-1)
    return order.reshape(-1)


def class_balanced_seed(config, epoch: int) -> list[int]:
    """The seed of an epoch's class-balanced batches: the run's seed and the epoch."""
    return [int(config.seed), int(epoch), 0xBA1A]
