"""Input pipeline: batches of a split that `datasets` has loaded into host memory.

Each process trains on its own equal, contiguous shard of the split. tf.data shuffles, augments
and batches the shard; batches stay uint8 NHWC and are normalised inside the jitted step, which
keeps host-to-device traffic 4x smaller. Every epoch is a new, deterministic pass: the shuffle
seed and every example's augmentation seed derive from (seed, epoch, example index), so any epoch
can be re-created exactly. Evaluation batches are padded to a fixed shape with a 0/1 `mask`, so
the whole test split is counted exactly once without a recompile for the last partial batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ffcl_jax.class_balance import (
    check_class_balance,
    class_balanced_order,
    class_balanced_seed,
)
from ffcl_jax.datasets import DatasetInfo, dataset_info, import_tensorflow
from ffcl_jax.errors import UserError

AUGMENTATIONS = ("pad_crop_flip", "pad_crop", "none")


# --------------------------------------------------------------------------- training


def _augment_fn(config, info: DatasetInfo):
    tf = import_tensorflow()

    check_augmentation(config)
    kind = config.augment
    height, width, channels = info.image_shape
    pad = int(config.pad)

    def augment(seed, image):
        if kind == "none":
            return image
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=config.pad_mode.upper())
        image = tf.image.stateless_random_crop(padded, (height, width, channels), seed=crop_seed)
        if kind == "pad_crop_flip":
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return image

    return augment


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
    steps = num_train_examples // global_batch_size
    if steps == 0:
        raise UserError(
            f"batch_size {global_batch_size} is larger than the {num_train_examples} training "
            "examples: lower config.batch_size"
        )
    return steps


class TrainData:
    """Epochs of augmented training batches; each process gets its own rows of every batch.

    With `num_views > 1` every image is augmented that many times with independent draws (the
    methods that give each network or branch its own view: KDCL, PCL), and a batch's images are
    `batch x views x H x W x C`; view 0 is the image the single-view pipeline gives.

    Every process holds the whole (in-memory) training split and derives the same global order
    from `(seed, epoch)`; process `p` of `P` then keeps rows `[p * B/P, (p + 1) * B/P)` of each
    global batch of `B` and augments only those, with a seed made of the epoch and the example's
    global position. The global batches, and so the training run, are therefore the same for any
    number of processes and devices, and any point of any epoch can be re-created (resume) with
    `epoch(e, skip_batches=k)` without tf.data state.

    With `images_per_class = m > 0` every global batch holds `B / m` classes with `m` images
    each (`class_balanced_order`, drawn from `(seed, epoch)`) instead of a shuffled pass.
    """

    def __init__(
        self,
        config,
        images: np.ndarray,
        labels: np.ndarray,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        num_views: int = 1,
        images_per_class: int = 0,
    ):
        if global_batch_size % process_count:
            raise UserError(
                f"batch_size {global_batch_size} must be a multiple of the {process_count} "
                "processes it is split over"
            )
        self.config = config
        self.info = dataset_info(config.dataset)
        self.images, self.labels = images, labels
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.steps_per_epoch = steps_per_epoch(len(images), global_batch_size)
        self.num_views = num_views
        self.images_per_class = images_per_class
        if images_per_class:
            check_class_balance(labels, images_per_class, global_batch_size)
        self._augment = _augment_fn(config, self.info)

    def epoch(self, epoch: int, *, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        tf = import_tensorflow()

        epoch_seed = int(self.config.seed) * 1_000_003 + int(epoch)
        n = len(self.images)
        if self.images_per_class:
            order = class_balanced_order(
                self.labels,
                self.images_per_class,
                self.global_batch_size,
                self.steps_per_epoch,
                class_balanced_seed(self.config, epoch),
            )
            ds = tf.data.Dataset.from_tensor_slices((self.images[order], self.labels[order]))
        else:
            ds = tf.data.Dataset.from_tensor_slices((self.images, self.labels))
            ds = ds.shuffle(n, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.enumerate()  # global position in the epoch: the augmentation seed
        ds = ds.take(self.steps_per_epoch * self.global_batch_size)  # whole batches only
        if self.local_batch_size != self.global_batch_size:
            local, rank = self.local_batch_size, self.process_index
            ds = ds.filter(lambda index, _: (index % self.global_batch_size) // local == rank)
        if skip_batches:  # before augmenting: skipped examples cost nothing
            ds = ds.skip(skip_batches * self.local_batch_size)

        def augment(index, example):
            image, label = example
            seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
            if self.num_views == 1:
                return {"image": self._augment(seed, image), "label": label}
            # View 0 is the single-view pipeline's image; view v > 0 folds v into its seed.
            seeds = [seed] + [
                tf.random.experimental.stateless_fold_in(seed, v) for v in range(1, self.num_views)
            ]
            return {"image": tf.stack([self._augment(s, image) for s in seeds]), "label": label}

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        return ds.as_numpy_iterator()


def check_augmentation(config) -> None:
    if config.augment not in AUGMENTATIONS:
        raise UserError(f"unknown augment {config.augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    if config.pad_mode not in ("reflect", "constant"):
        raise UserError(f"unknown pad_mode {config.pad_mode!r}; valid: reflect, constant")


def augment_on_device(images, key, *, kind: str, pad: int, pad_mode: str):
    """Pad + random crop (+ horizontal flip) of a uint8 NHWC batch in jax.numpy, per example."""
    import jax
    import jax.numpy as jnp

    if kind == "none":
        return images
    n, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
    crops = jax.vmap(
        lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
    )(padded, offsets)
    if kind == "pad_crop_flip":
        flip = jax.random.bernoulli(flip_key, 0.5, (n,))
        crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1, :], crops)
    return crops


class DeviceTrainData:
    """The training split held on the devices; each batch gathered and augmented by `jit`.

    For accelerators (`config.data_on_device=True`): no tf.data, so no tensorflow is needed,
    and no host-to-device copy of images per step. The order of an epoch is a NumPy permutation
    of `(seed, epoch)` and the augmentation key is `(seed, epoch, batch)`, so every process
    derives the same global batches and `epoch(e, skip_batches=k)` re-creates any point (resume).
    The batches differ from `TrainData`'s (another shuffle and random generator), equally valid.
    The split is replicated on every device: fine for CIFAR-size data (150 MB as uint8).
    """

    def __init__(
        self,
        config,
        images: np.ndarray,
        labels: np.ndarray,
        global_batch_size: int,
        data_sharding,
        replicated_sharding,
        *,
        num_views: int = 1,
        images_per_class: int = 0,
    ):
        """`num_views` as in `TrainData`: view 0 is the single-view batch, view v draws its
        augmentation from the batch's key folded with v; `images_per_class` as in `TrainData`
        (the same class-balanced batches)."""
        import jax
        import jax.numpy as jnp

        check_augmentation(config)
        self.config = config
        self.global_batch_size = global_batch_size
        self.num_examples = len(images)
        self.steps_per_epoch = steps_per_epoch(len(images), global_batch_size)
        self.images_per_class = images_per_class
        if images_per_class:
            check_class_balance(labels, images_per_class, global_batch_size)
            self.host_labels = labels
        self.images = jax.device_put(images, replicated_sharding)
        self.labels = jax.device_put(labels, replicated_sharding)
        options = dict(kind=config.augment, pad=int(config.pad), pad_mode=config.pad_mode)

        def batch(images, labels, index, key):
            chosen = images[index]
            views = [augment_on_device(chosen, key, **options)] + [
                augment_on_device(chosen, jax.random.fold_in(key, v), **options)
                for v in range(1, num_views)
            ]
            return {
                "image": views[0] if num_views == 1 else jnp.stack(views, axis=1),
                "label": labels[index],
            }

        self._batch = jax.jit(batch, out_shardings=data_sharding)
        self._key = jax.random.key(int(config.seed))

    def epoch(self, epoch: int, *, skip_batches: int = 0) -> Iterator[dict]:
        import jax

        if self.images_per_class:
            order = class_balanced_order(
                self.host_labels,
                self.images_per_class,
                self.global_batch_size,
                self.steps_per_epoch,
                class_balanced_seed(self.config, epoch),
            )
        else:
            rng = np.random.default_rng([int(self.config.seed), int(epoch)])
            order = rng.permutation(self.num_examples)
            order = order[: self.steps_per_epoch * self.global_batch_size]
        order = order.reshape(self.steps_per_epoch, self.global_batch_size).astype(np.int32)
        epoch_key = jax.random.fold_in(self._key, epoch)
        for b in range(skip_batches, self.steps_per_epoch):
            yield self._batch(self.images, self.labels, order[b], jax.random.fold_in(epoch_key, b))


# --------------------------------------------------------------------------- evaluation


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, num_batches: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches over every example; padding rows have `mask == 0`.

    `num_batches` (>= what the data needs) lets every process run the same number of eval steps
    when their shards differ in length.
    """
    needed = -(-len(images) // batch_size)
    num_batches = needed if num_batches is None else num_batches
    for b in range(num_batches):
        chunk_images = images[b * batch_size : (b + 1) * batch_size]
        chunk_labels = labels[b * batch_size : (b + 1) * batch_size]
        valid = len(chunk_images)
        pad = batch_size - valid
        yield {
            "image": np.concatenate(
                [chunk_images, np.zeros((pad, *images.shape[1:]), images.dtype)]
            ),
            "label": np.concatenate([chunk_labels, np.zeros((pad,), labels.dtype)]),
            "mask": np.concatenate([np.ones((valid,), np.float32), np.zeros((pad,), np.float32)]),
        }


def normalize(images, info: DatasetInfo):
    """uint8 NHWC -> float32 standardised with the data set's channel statistics (on device)."""
    import jax.numpy as jnp

    mean = jnp.asarray(info.mean, jnp.float32) * 255.0
    std = jnp.asarray(info.std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std
