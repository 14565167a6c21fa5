"""Input pipeline: CIFAR-10/100 and Fashion-MNIST through TFDS, or Fashion-MNIST IDX files.

Each split is read once into host memory (the largest, CIFAR, is 150 MB) and each process
trains on its own equal, contiguous shard of it. tf.data shuffles, augments and batches the
shard; batches stay uint8 NHWC and are normalised inside the jitted step, which keeps
host-to-device traffic 4x smaller. Every epoch is a new, deterministic pass: the shuffle seed
and every example's augmentation seed derive from (seed, epoch, example index), so any epoch can
be re-created exactly. Evaluation batches are padded to a fixed shape with a 0/1 `mask`, so the
whole test split is counted exactly once without a recompile for the last partial batch.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import socket
from collections.abc import Iterator

import numpy as np

from ffcl_jax import storage
from ffcl_jax.class_balance import (
    check_class_balance,
    class_balanced_order,
    class_balanced_seed,
)
from ffcl_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]  # per channel, on [0, 1] pixels
    std: tuple[float, ...]
    tfds_name: str
    download_host: str  # where TFDS downloads the raw files from (besides its GCS mirror)


DATASETS = {
    "cifar10": DatasetInfo(
        10,
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "cifar10",
        "www.cs.toronto.edu",
    ),
    "cifar100": DatasetInfo(
        100,
        (32, 32, 3),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "cifar100",
        "www.cs.toronto.edu",
    ),
    "fashion_mnist": DatasetInfo(
        10,
        (28, 28, 1),
        (0.2860,),
        (0.3530,),
        "fashion_mnist",
        "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ),
}
TFDS_MIRROR_HOST = "storage.googleapis.com"
SOURCES = ("tfds", "idx")
AUGMENTATIONS = ("pad_crop_flip", "pad_crop", "none")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@functools.cache
def import_tensorflow():
    """TensorFlow for tf.data only: silent, and kept off any GPU so that JAX owns it.

    oneDNN is switched off because it only announces itself here: the pipeline moves uint8
    pixels (pad, crop, flip) and does no floating-point math that oneDNN could speed up.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- reading


def _open_maybe_gz(directory: str, stem: str):
    """`(path, binary stream)` of `stem.gz` or `stem` in `directory` (local or gs://)."""
    for name, gzipped in ((stem + ".gz", True), (stem, False)):
        path = storage.path(directory) / name
        if path.exists():
            stream = path.open("rb")
            return os.fspath(path), gzip.GzipFile(fileobj=stream) if gzipped else stream
    return None, None


def read_idx(path: str, stream) -> np.ndarray:
    """Parses one IDX file (the MNIST format: magic, big-endian dims, then unsigned bytes)."""
    with stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(
            f"{path} is not an unsigned-byte IDX file (bad magic number); re-install it"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise UserError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), file has "
            f"{len(raw) - header}; re-install it"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (or MNIST) IDX files -> (uint8 images NHW1, int32 labels)."""
    image_stem, label_stem = IDX_FILES[split]
    image_path, image_stream = _open_maybe_gz(directory, image_stem)
    label_path, label_stream = _open_maybe_gz(directory, label_stem)
    if image_stream is None or label_stream is None:
        if image_stream is not None:
            image_stream.close()
        if label_stream is not None:
            label_stream.close()
        raise UserError(
            f"Fashion-MNIST IDX files not found in {directory!r} (need {image_stem}.gz and "
            f"{label_stem}.gz): install them with `apt-get install dataset-fashion-mnist` or "
            "point --config.idx_dir at a folder that has them"
        )
    images = read_idx(image_path, image_stream)
    labels = read_idx(label_path, label_stream)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"IDX files in {directory!r} do not match: images {images.shape}, labels "
            f"{labels.shape}; re-install the data set"
        )
    return images[..., None], labels.astype(np.int32)


def network_reaches(hosts: tuple[str, ...]) -> bool:
    """Whether any of `hosts` resolves. Offline, TFDS spends minutes in retries before it fails;
    a failed name lookup answers in milliseconds."""
    for host in hosts:
        try:
            socket.getaddrinfo(host, 443)
            return True
        except OSError:
            continue
    return False


def load_tfds_split(
    name: str, split: str, data_dir: str | None, download: bool, hosts: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    how = (
        f"build it where the network allows (`tfds build {name} --data_dir DIR`), copy DIR "
        "here and pass --config.data_dir=DIR"
    )
    if download and not builder.is_prepared():
        if hosts and not network_reaches(hosts):
            raise UserError(
                f"could not download TFDS data set {name!r} (no network: cannot resolve "
                f"{' or '.join(hosts)}); {how}"
            )
        try:
            builder.download_and_prepare()
        except Exception as exc:  # network errors come in many types; all mean the same here
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise UserError(f"could not download TFDS data set {name!r} ({reason}); {how}") from exc
    try:
        dataset = builder.as_dataset(split=split, as_supervised=True)
    except AssertionError as exc:  # what TFDS raises for a data set that is not prepared
        raise UserError(
            f"TFDS data set {name!r} is not prepared in {builder.data_dir!r}"
            + ("" if download else " and config.download is False")
            + f": {how}"
        ) from exc
    # Large batches rather than batch_size=-1, which aborts inside TensorFlow under
    # tfds.testing.mock_data; the whole split still arrives in a few reads.
    chunks = list(tfds.as_numpy(dataset.batch(10_000)))
    if not chunks:
        raise UserError(f"TFDS split {name}/{split} is empty; rebuild the data set")
    images = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks])
    return images.astype(np.uint8), labels.astype(np.int32)


def load_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole `split` ("train" or "test") of `config.dataset` as host numpy arrays."""
    info = dataset_info(config.dataset)
    if config.data_source == "idx":
        if config.dataset != "fashion_mnist":
            raise UserError(
                f"data_source 'idx' reads Fashion-MNIST IDX files, not {config.dataset!r}; "
                "use data_source='tfds' for it"
            )
        images, labels = load_idx_split(config.idx_dir, split)
    elif config.data_source == "tfds":
        images, labels = load_tfds_split(
            info.tfds_name,
            split,
            config.data_dir,
            config.download,
            hosts=(TFDS_MIRROR_HOST, info.download_host),
        )
    else:
        raise UserError(f"unknown data_source {config.data_source!r}; valid: {', '.join(SOURCES)}")
    if images.shape[1:] != info.image_shape:
        raise UserError(
            f"{config.dataset} images have shape {images.shape[1:]}, expected {info.image_shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise UserError(f"{config.dataset} labels fall outside 0..{info.num_classes - 1}")
    limit = config.get("train_examples" if split == "train" else "test_examples")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def validation_rows(labels: np.ndarray, size: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` class-balanced rows to hold out of a training split.

    Each class gives `size // num_classes` rows (the first `size % num_classes` classes one
    more), drawn without replacement by `np.random.default_rng(seed)`, class after class. The
    choice depends only on the labels, `size` and `seed`: every run, method, run seed and
    process count holding the same split holds out the same rows.
    """
    if size <= 0:
        return np.zeros((0,), np.int64)
    if size >= len(labels):
        raise UserError(
            f"config.validation_size={size} leaves nothing to train on: the training split has "
            f"{len(labels)} images; use a smaller validation_size"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        rows = np.flatnonzero(labels == label)
        wanted = size // num_classes + (1 if label < size % num_classes else 0)
        if wanted > len(rows):
            raise UserError(
                f"config.validation_size={size} asks for {wanted} images of class {label}, "
                f"but the training split has {len(rows)}; use a smaller validation_size"
            )
        chosen.append(rng.choice(rows, wanted, replace=False))
    return np.sort(np.concatenate(chosen))


def hold_out_validation(
    config, images: np.ndarray, labels: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`((train images, labels), (validation images, labels))` of a loaded training split, by
    `config.validation_size` / `config.validation_seed` (see `validation_rows`)."""
    info = dataset_info(config.dataset)
    held = validation_rows(
        labels,
        int(config.validation_size),
        info.num_classes,
        int(config.validation_seed),
    )
    keep = np.ones(len(labels), bool)
    keep[held] = False
    return (images[keep], labels[keep]), (images[held], labels[held])


def load_splits(config) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, tuple]]:
    """`((train images, labels), {"test": ..., "validation": ...})`; a validation split (when
    `config.validation_size`) is held out of the training split."""
    train_split = load_split(config, "train")
    splits = {"test": load_split(config, "test")}
    if config.validation_size:
        train_split, splits["validation"] = hold_out_validation(config, *train_split)
    return train_split, splits


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
