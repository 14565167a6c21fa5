"""Config files load, shrink with `:smoke`, and encode the protocols of the spec."""

from __future__ import annotations

import importlib

import pytest

from ffcl_jax import train

CONFIGS = ("configs.cifar100", "configs.cifar10", "configs.fashion_mnist")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_configs_are_valid(name, arg):
    config = importlib.import_module(name).get_config(arg)
    settings = train.check_config(config, 1)
    assert settings.method == "ffcl"
    assert importlib.import_module(name).__doc__.count("python -m ffcl_jax.main") >= 1


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_argument_is_an_error(name):
    with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
        importlib.import_module(name).get_config("tiny")


@pytest.mark.parametrize(
    "name, dataset", [("configs.cifar100", "cifar100"), ("configs.cifar10", "cifar10")]
)
def test_cifar_configs_follow_the_ffl_one_protocol(name, dataset):
    c = importlib.import_module(name).get_config()
    assert c.dataset == dataset and c.data_source == "tfds"
    assert (c.teacher, c.student) == ("resnet110", "resnet32")
    assert (c.learning_rate, c.momentum, c.nesterov, c.batch_size, c.num_epochs) == (
        0.1,
        0.9,
        True,
        128,
        300,
    )
    assert tuple(c.lr_decay_epochs) == (150, 225) and c.lr_decay_factor == 0.1
    assert (c.weight_decay, c.fusion_weight_decay) == (1e-4, 1e-5)
    assert (c.augment, c.pad, c.pad_mode) == ("pad_crop_flip", 4, "reflect")
    settings = train.check_config(c, 1)
    assert (settings.tau, settings.rampup_epochs) == (3.0, 80.0)


def test_smoke_is_small():
    c = importlib.import_module("configs.cifar100").get_config("smoke")
    assert c.train_examples <= 1024 and c.num_epochs <= 2
