"""Data sets and input pipeline: IDX files in the real format, TFDS (mocked and prepared from
real-format CIFAR binaries), deterministic per-epoch shuffling and augmentation, exact padded
evaluation."""

from __future__ import annotations

import gzip
import os

import ml_collections
import numpy as np
import pytest

from ffcl_jax import datasets
from ffcl_jax import input_pipeline as ip
from ffcl_jax.errors import UserError
from tests.conftest import write_fashion_mnist, write_idx

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def data_config(**kw):
    base = dict(
        dataset="fashion_mnist",
        data_source="idx",
        idx_dir=DEBIAN_DIR,
        data_dir=None,
        download=False,
        augment="pad_crop_flip",
        pad=2,
        pad_mode="constant",
        seed=0,
        train_examples=None,
        test_examples=None,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_idx_reader_round_trip(tmp_path):
    arrays = write_fashion_mnist(str(tmp_path), 20, 7)
    images, labels = datasets.load_idx_split(str(tmp_path), "train")
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])
    test_images, _ = datasets.load_idx_split(str(tmp_path), "test")
    assert len(test_images) == 7


def test_idx_reader_rejects_bad_files(tmp_path):
    write_fashion_mnist(str(tmp_path), 5, 5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])  # truncated
    with pytest.raises(UserError, match="truncated or corrupt"):
        datasets.load_idx_split(str(tmp_path), "train")
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + raw[4:])  # float magic, not unsigned bytes
    with pytest.raises(UserError, match="bad magic"):
        datasets.load_idx_split(str(tmp_path), "train")
    write_idx(str(path), np.zeros((4, 28, 28)))  # 4 images for 5 labels
    with pytest.raises(UserError, match="do not match"):
        datasets.load_idx_split(str(tmp_path), "train")


def test_missing_idx_files_say_how_to_get_them(tmp_path):
    with pytest.raises(UserError) as info:
        datasets.load_split(data_config(idx_dir=str(tmp_path / "nowhere")), "train")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "--config.idx_dir" in str(info.value)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_files():
    images, labels = datasets.load_split(data_config(), "train")
    assert images.shape == (60000, 28, 28, 1) and labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = datasets.load_split(data_config(), "test")
    assert test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(test_labels).tolist() == [1000] * 10


def test_unknown_names_fail_clearly():
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        datasets.dataset_info("mnist")
    with pytest.raises(UserError, match="data_source 'idx' reads Fashion-MNIST"):
        datasets.load_split(data_config(dataset="cifar10"), "train")
    with pytest.raises(UserError, match="unknown augment"):
        ip.TrainData(
            data_config(augment="mixup"),
            np.zeros((4, 28, 28, 1), np.uint8),
            np.zeros(4, np.int32),
            2,
        )


class _AsNumpy:
    """`DeviceTrainData` with numpy batches, so one test body checks both pipelines."""

    def __init__(self, data):
        self.data = data

    def epoch(self, epoch, **kw):
        for batch in self.data.epoch(epoch, **kw):
            yield {k: np.asarray(v) for k, v in batch.items()}


def make_pipeline(kind, config, images, labels, batch):
    if kind == "host":
        return ip.TrainData(config, images, labels, batch)
    from ffcl_jax.parallel import DataParallel

    mesh = DataParallel()
    return _AsNumpy(ip.DeviceTrainData(config, images, labels, batch, mesh.data, mesh.replicated))


@pytest.fixture(params=["host", "device"])
def pipeline(request):
    """Both training pipelines: tf.data on the host, and batches made on the device by jit."""
    return request.param


def _train_data(n=40, batch=8, kind="host", **kw):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 28, 28, 1)).astype(np.uint8)
    labels = np.arange(n, dtype=np.int32) % 10
    return make_pipeline(kind, data_config(**kw), images, labels, batch), images, labels


def test_epochs_are_deterministic_shuffled_and_drop_the_remainder(pipeline):
    data, _, labels = _train_data(n=42, batch=8, kind=pipeline)
    epoch0 = list(data.epoch(0))
    assert len(epoch0) == 5 and all(b["image"].shape == (8, 28, 28, 1) for b in epoch0)
    again = list(data.epoch(0))
    for a, b in zip(epoch0, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    epoch1 = list(data.epoch(1))
    assert not np.array_equal(
        np.concatenate([b["label"] for b in epoch0]), np.concatenate([b["label"] for b in epoch1])
    )
    # Skipping batches resumes the same epoch exactly.
    resumed = list(data.epoch(1, skip_batches=3))
    np.testing.assert_array_equal(resumed[0]["image"], epoch1[3]["image"])


def test_without_augmentation_each_example_appears_once_per_epoch(pipeline):
    data, images, labels = _train_data(n=40, batch=8, kind=pipeline, augment="none")
    batches = list(data.epoch(0))
    seen = np.concatenate([b["image"] for b in batches])
    order = [int(np.where((images == img).all(axis=(1, 2, 3)))[0][0]) for img in seen]
    assert sorted(order) == list(range(40))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[order])


def test_pad_crop_flip_moves_pixels_but_keeps_content(pipeline):
    image = np.zeros((1, 28, 28, 1), np.uint8)
    image[0, 10:18, 5:9] = 200
    images, labels = np.repeat(image, 64, 0), np.zeros(64, np.int32)
    data = make_pipeline(pipeline, data_config(), images, labels, 64)
    out = next(data.epoch(0))["image"]
    # Constant padding of 2 and a crop shift the block by at most 2 pixels; no pixel invented.
    assert set(np.unique(out)) <= {0, 200}
    sums = out.reshape(64, -1).sum(-1)
    assert np.all(sums == 200 * 32)  # the 8x4 block stays whole at this offset range
    assert len({o.tobytes() for o in out}) > 4  # different crops / flips per example


def test_device_augmentation_reflect_padding_and_flip_match_numpy():
    import jax

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (16, 8, 8, 3)).astype(np.uint8)
    key = jax.random.key(3)
    out = np.asarray(
        ip.augment_on_device(images, key, kind="pad_crop_flip", pad=2, pad_mode="reflect")
    )
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i in range(16):  # each output is one window of the reflect-padded image, maybe flipped
        windows = [
            w
            for dy in range(5)
            for dx in range(5)
            for w in (
                padded[i, dy : dy + 8, dx : dx + 8],
                padded[i, dy : dy + 8, dx : dx + 8][:, ::-1],
            )
        ]
        assert any(np.array_equal(out[i], w) for w in windows), i
    assert not np.array_equal(out, images)  # something moved


@pytest.mark.slow
def test_training_on_device_batches_needs_no_tensorflow(fmnist_dir, tmp_path):
    """`data_on_device=True` trains (IDX files, batches made by jit) with tensorflow unusable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['tensorflow'] = None\n"  # any `import tensorflow` now fails
        "from configs.fashion_mnist import get_config\n"
        "from ffcl_jax import train\n"
        "config = get_config()\n"
        f"config.update(idx_dir={fmnist_dir!r}, teacher='resnet8', student='resnet8', "
        "batch_size=32, eval_batch_size=50, num_epochs=1, lr_decay_epochs=(), "
        "data_on_device=True)\n"
        f"r = train.train_and_evaluate(config, {str(tmp_path)!r})\n"
        "print('STEPS', r['history'][-1]['step'])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "STEPS 8" in done.stdout  # 256 examples / batch 32


def test_eval_batches_pad_and_mask_every_example_once():
    images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    labels = np.arange(23, dtype=np.int32)
    batches = list(ip.eval_batches(images, labels, 10))
    assert len(batches) == 3 and all(b["image"].shape == (10, 1, 1, 1) for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 23 and masks[23:].sum() == 0
    valid = np.concatenate([b["label"] for b in batches])[masks > 0]
    np.testing.assert_array_equal(valid, labels)
    assert len(list(ip.eval_batches(images, labels, 10, num_batches=5))) == 5


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_the_number_of_processes(process_count):
    """Each process's rows of every global batch, augmentation included, are exactly the rows
    a single process would put there: runs agree for any number of hosts."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (70, 28, 28, 1)).astype(np.uint8)
    labels = np.arange(70, dtype=np.int32) % 10
    config = data_config(augment="pad_crop_flip")
    single = list(ip.TrainData(config, images, labels, 16).epoch(3))
    per_process = [
        list(ip.TrainData(config, images, labels, 16, p, process_count).epoch(3))
        for p in range(process_count)
    ]
    assert len(single) == 4 and all(len(batches) == 4 for batches in per_process)
    for b, batch in enumerate(single):
        for key in ("image", "label"):
            joined = np.concatenate([batches[b][key] for batches in per_process])
            np.testing.assert_array_equal(joined, batch[key])
    resumed = list(
        ip.TrainData(config, images, labels, 16, 1, process_count).epoch(3, skip_batches=2)
    )
    np.testing.assert_array_equal(resumed[0]["image"], per_process[1][2]["image"])
    with pytest.raises(UserError, match="multiple of the 3 processes"):
        ip.TrainData(config, images, labels, 16, 0, 3)


def test_tfds_path_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        images, labels = datasets.load_split(
            data_config(dataset="cifar100", data_source="tfds"), "train"
        )
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.max() < 100


def _write_cifar10_binaries(root, n_per_file=3):
    """The files of cifar-10-binary.tar.gz, extracted: 1 label byte + 3072 CHW pixel bytes each."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (folder / "batches.meta.txt").write_text(
        "\n".join(
            [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
        )
        + "\n"
    )
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, n_per_file).astype(np.uint8)
        pixels = rng.integers(0, 256, (n_per_file, 3, 32, 32)).astype(np.uint8)
        blob = b"".join(bytes([lbl]) + px.tobytes() for lbl, px in zip(labels, pixels, strict=True))
        (folder / name).write_bytes(blob)
        records[name] = (labels, pixels.transpose(0, 2, 3, 1))
    return records


def test_tfds_cifar10_prepared_from_real_format_files(tmp_path, monkeypatch):
    """TFDS builds its on-disk format from CIFAR binaries we write; we then read it offline."""
    import tensorflow_datasets as tfds

    records = _write_cifar10_binaries(tmp_path / "extracted")
    monkeypatch.setattr(datasets, "network_reaches", lambda hosts: True)
    monkeypatch.setattr(
        tfds.download.DownloadManager,
        "download_and_extract",
        lambda self, url: str(tmp_path / "extracted"),
    )
    data_dir = str(tmp_path / "tfds")
    config = data_config(dataset="cifar10", data_source="tfds", data_dir=data_dir, download=True)
    images, labels = datasets.load_split(config, "test")
    expected_labels, expected_images = records["test_batch.bin"]
    order = np.argsort([img.tobytes() for img in images])
    expected_order = np.argsort([img.tobytes() for img in expected_images])
    np.testing.assert_array_equal(images[order], expected_images[expected_order])
    np.testing.assert_array_equal(labels[order], expected_labels[expected_order])
    # Now prepared on disk: readable with downloads off.
    monkeypatch.undo()
    config.download = False
    train_images, _ = datasets.load_split(config, "train")
    assert train_images.shape == (15, 32, 32, 3)


def test_tfds_missing_or_undownloadable_data_set_fails_clearly(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    config = data_config(dataset="cifar100", data_source="tfds", data_dir=str(tmp_path))
    with pytest.raises(UserError) as info:
        datasets.load_split(config, "train")
    assert "not prepared" in str(info.value) and "tfds build cifar100" in str(info.value)

    # The hosts resolve but the download itself fails.
    def download_fails(self, url):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(datasets, "network_reaches", lambda hosts: True)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_fails)
    config.download = True
    with pytest.raises(UserError) as info:
        datasets.load_split(config, "train")
    assert "could not download" in str(info.value)
    assert "Connection reset" in str(info.value) and "--config.data_dir" in str(info.value)


def test_offline_download_fails_at_once(tmp_path, monkeypatch):
    """No name resolves: fail before TFDS starts its minutes of retries."""
    import tensorflow_datasets as tfds

    def unresolvable(host, *args, **kwargs):
        raise OSError(-2, "Name or service not known")

    def must_not_download(self, *args, **kwargs):
        raise AssertionError("TFDS was asked to download although no host resolves")

    monkeypatch.setattr(datasets.socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
    config = data_config(
        dataset="cifar10", data_source="tfds", data_dir=str(tmp_path), download=True
    )
    with pytest.raises(UserError) as info:
        datasets.load_split(config, "train")
    message = str(info.value)
    assert "no network: cannot resolve storage.googleapis.com or www.cs.toronto.edu" in message
    assert "tfds build cifar10" in message


def test_validation_rows_are_balanced_disjoint_and_fixed():
    """Held-out rows: class-balanced, disjoint from the rows trained on, and the same whatever
    the run's seed or the number of processes (both only act on the rows that remain)."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(1000) % 10).astype(np.int32)
    images = np.arange(1000, dtype=np.int32).astype(np.uint8)[:, None, None, None]
    held = datasets.validation_rows(labels, 105, 10, seed=0)
    assert len(held) == len(set(held.tolist())) == 105
    counts = np.bincount(labels[held], minlength=10)
    assert counts.tolist() == [11] * 5 + [10] * 5  # the remainder goes to the first classes
    np.testing.assert_array_equal(held, datasets.validation_rows(labels, 105, 10, seed=0))
    assert not np.array_equal(held, datasets.validation_rows(labels, 105, 10, seed=1))
    # The run's seed and the process layout do not enter: configs that differ only there agree.
    splits = []
    for seed in (0, 7):
        config = data_config(seed=seed, validation_size=105, validation_seed=0)
        (train_x, train_y), (val_x, val_y) = datasets.hold_out_validation(config, images, labels)
        splits.append((train_y, val_y))
        assert len(train_y) + len(val_y) == 1000
        np.testing.assert_array_equal(val_y, labels[held])
        np.testing.assert_array_equal(val_x[:, 0, 0, 0], images[held, 0, 0, 0])
        kept = np.setdiff1d(np.arange(1000), held)
        np.testing.assert_array_equal(train_y, labels[kept])
        assert not set(kept.tolist()) & set(held.tolist())
    np.testing.assert_array_equal(splits[0][1], splits[1][1])
    with pytest.raises(UserError, match="leaves nothing to train on"):
        datasets.validation_rows(labels, 1000, 10, 0)
    no_zeros = np.where(labels == 0, 1, labels)
    with pytest.raises(UserError, match="asks for 1 images of class 0, but the training split"):
        datasets.validation_rows(no_zeros, 10, 10, 0)
