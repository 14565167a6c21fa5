"""Class-balanced training batches (`config.images_per_class`): every batch holds the asked
classes x images, the same in tf.data, on the device and over processes, re-created exactly on
resume; an impossible request is one clear error; unset, the batches are the shuffled ones."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ffcl_jax import class_balance, datasets, input_pipeline, methods, train
from ffcl_jax.errors import UserError
from tests.conftest import tiny_config
from tests.helpers import tiers


def _assert_balanced(labels, classes, per_class):
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    assert len(values) == classes, labels
    assert set(counts) == {per_class}, labels
    # Class after class: each class's images are adjacent.
    assert all(len(set(labels[i : i + per_class])) == 1 for i in range(0, len(labels), per_class))


def test_every_batch_holds_the_asked_classes_and_distinct_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 500)
    labels[labels == 11] = 10  # class 11 empty, and a class with few rows below
    labels[np.flatnonzero(labels == 3)[2:]] = 4
    order = class_balance.class_balanced_order(labels, 4, 32, 25, [1, 2])
    assert order.shape == (25 * 32,)
    for batch in order.reshape(25, 32):
        assert len(set(batch)) == 32  # no image twice in a batch
        _assert_balanced(labels[batch], 8, 4)
        assert 3 not in labels[batch]  # two rows: too few for 4 a batch
    again = class_balance.class_balanced_order(labels, 4, 32, 25, [1, 2])
    np.testing.assert_array_equal(order, again)
    other = class_balance.class_balanced_order(labels, 4, 32, 25, [1, 3])
    assert not np.array_equal(order, other)
    # Every eligible class and most rows come up over many batches (independent draws).
    seen = labels[order]
    assert set(seen) == set(range(11)) - {3}


@pytest.mark.parametrize(
    "labels, per_class, batch, message",
    [
        (np.arange(40) % 10, 3, 32, "config.batch_size=32 is not a multiple of"),
        (np.arange(40) % 10, 2, 32, "need 16 classes with at least 2 training images"),
        (np.arange(40) % 10, 8, 32, "need 4 classes with at least 8 training images each; "),
        (np.arange(40) % 10, -1, 32, "config.images_per_class must be >= 1"),
    ],
)
def test_impossible_requests_fail_in_one_line(labels, per_class, batch, message):
    with pytest.raises(UserError, match=message) as error:
        class_balance.class_balanced_order(labels, per_class, batch, 2, 0)
    assert "\n" not in str(error.value)


def _data(fmnist_dir, per_class, on_device=False, **kw):
    config = tiny_config(
        fmnist_dir, train_examples=128, batch_size=16, augment="pad_crop_flip", pad=2
    )
    images, labels = datasets.load_split(config, "train")
    if on_device:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return input_pipeline.DeviceTrainData(
            config, images, labels, 16, sharding, sharding, images_per_class=per_class, **kw
        )
    return input_pipeline.TrainData(config, images, labels, 16, images_per_class=per_class, **kw)


@pytest.mark.parametrize(
    "on_device", tiers.cases([False, True], ("on_device",), ids=["tf_data", "on_device"])
)
def test_pipelines_give_class_balanced_batches_and_resume_them(fmnist_dir, on_device):
    data = _data(fmnist_dir, 2, on_device)
    batches = list(data.epoch(1))
    assert len(batches) == data.steps_per_epoch == 8
    for batch in batches:
        _assert_balanced(batch["label"], 8, 2)
    resumed = list(data.epoch(1, skip_batches=5))
    for a, b in zip(batches[5:], resumed, strict=True):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    # Both pipelines draw the same rows (their augmentations differ).
    config = data.config
    images, labels = datasets.load_split(config, "train")
    order = class_balance.class_balanced_order(
        labels, 2, 16, 8, class_balance.class_balanced_seed(config, 1)
    )
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(b["label"]) for b in batches]), labels[order]
    )
    # Views keep the structure: every view is of the batch's rows.
    views = next(iter(_data(fmnist_dir, 4, on_device, num_views=2).epoch(0)))
    assert np.asarray(views["image"]).shape[:2] == (16, 2)
    _assert_balanced(views["label"], 4, 4)


def test_two_processes_hold_the_rows_of_one_global_batch(fmnist_dir):
    config = tiny_config(fmnist_dir, train_examples=128, batch_size=16, augment="none")
    images, labels = datasets.load_split(config, "train")
    whole = next(
        iter(input_pipeline.TrainData(config, images, labels, 16, images_per_class=4).epoch(0))
    )
    parts = [
        next(
            iter(
                input_pipeline.TrainData(
                    config, images, labels, 16, p, 2, images_per_class=4
                ).epoch(0)
            )
        )
        for p in range(2)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_unset_keeps_the_shuffled_batches_and_the_config_check_refuses_bad_values(fmnist_dir):
    config = tiny_config(fmnist_dir, train_examples=128, batch_size=16, augment="none")
    images, labels = datasets.load_split(config, "train")
    plain = next(iter(input_pipeline.TrainData(config, images, labels, 16).epoch(0)))
    zero = next(
        iter(input_pipeline.TrainData(config, images, labels, 16, images_per_class=0).epoch(0))
    )
    np.testing.assert_array_equal(plain["label"], zero["label"])
    assert methods.create("ffcl").images_per_class(config, 10) == 0
    config.images_per_class = 2
    assert methods.create("ffcl").images_per_class(config, 10) == 2
    for value, message in ((-1, "must be >= 0"), (3, "is not a multiple of")):
        config.images_per_class = value
        with pytest.raises(UserError, match=message):
            train.check_config(config, 1)


def test_the_pytorch_reference_draws_the_same_rows(fmnist_dir):
    from ffcl_jax.torch_reference import train as reference

    config = tiny_config(fmnist_dir, train_examples=128, batch_size=16, augment="none")
    images, labels = datasets.load_split(config, "train")
    images_nchw, labels_t = reference.as_tensors(images, labels)
    own = list(reference.epoch_batches(images_nchw, labels_t, config, 2, 8, 1, 4))
    jax_side = list(
        input_pipeline.TrainData(config, images, labels, 16, images_per_class=4).epoch(2)
    )
    assert len(own) == len(jax_side) == 8
    for (x, y), batch in zip(own, jax_side, strict=True):
        np.testing.assert_array_equal(y.numpy(), batch["label"])
        np.testing.assert_array_equal(x.numpy(), np.moveaxis(batch["image"], -1, 1))
        _assert_balanced(batch["label"], 4, 4)
