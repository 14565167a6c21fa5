"""The data sets: CIFAR-10/100 and Fashion-MNIST through TFDS, or Fashion-MNIST IDX files, each
split read whole into host memory (the largest, CIFAR, is 150 MB), and the validation split held
out of the training split.

Apart from `input_pipeline`, which batches and augments the arrays loaded here: the config
checks, export and the compile tools need a data set's facts (`dataset_info`) and none of tf.data.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import socket

import numpy as np

from ffcl_jax import storage
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
