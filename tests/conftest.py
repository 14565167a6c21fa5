"""Shared test helpers: tiny data sets written in the real on-disk formats, and tiny configs."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# The tests run on the CPU. With libtpu installed (the tpu extra, for ffcl_jax.compile_for) JAX
# would otherwise try to start a TPU backend first, and log its failure, in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the test run's processes: the pytest workers and every
# subprocess a test starts inherit these variables (JAX reads them when imported). Many tests
# compile the same train step in several processes (a run, the same run killed, its resume; one
# config under two seeds), which then compile it once. The cache key covers the program,
# XLA_FLAGS and the compiler options, so different settings never share an entry; a clean clone
# (CI) starts empty.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax_compilation_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array in the IDX format (magic 0x0000 08 ndim, big-endian dims), gzipped."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(directory: str, num_train: int, num_test: int, seed: int = 0):
    """A small learnable Fashion-MNIST look-alike: each class is a bright horizontal band."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for split, n, (img_name, lbl_name) in (
        ("train", num_train, ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")),
        ("test", num_test, ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
    ):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, :] = 250
        write_idx(os.path.join(directory, img_name), images)
        write_idx(os.path.join(directory, lbl_name), labels)
        arrays[split] = (images, labels)
    return arrays


def tiny_config(idx_dir: str, **overrides):
    """Fashion-MNIST config shrunk to compile and run in seconds on a CPU."""
    from configs.fashion_mnist import get_config

    config = get_config()
    config.idx_dir = idx_dir
    config.teacher = "resnet8"
    config.student = "resnet8"
    config.batch_size = 32
    config.eval_batch_size = 50
    config.num_epochs = 2
    config.lr_decay_epochs = (1,)
    config.loss.rampup_epochs = 1.0
    config.log_every_steps = 2
    # The toy classes are bands 2 pixels apart: crop jitter would blur them into each other.
    config.augment = "none"
    return apply_overrides(config, overrides)


def apply_overrides(config, overrides: dict):
    """`config` with `{"loss.tau": 2.0, ...}` set, as `--config.loss.tau=2.0` would."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        if leaf not in target:  # a misspelt or moved key would otherwise add a new one
            raise KeyError(f"the config has no key {key!r}")
        target[leaf] = value
    return config


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fmnist"))
    write_fashion_mnist(directory, num_train=256, num_test=70)
    return directory
