"""Config files load, shrink with `:smoke`, and encode the protocols of the spec."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from ffcl_jax import train
from ffcl_jax.config_base import eval_batch_size
from ffcl_jax.optimizer import make_optimizer
from tests.conftest import REPO

CONFIGS = ("configs.cifar100", "configs.cifar10", "configs.fashion_mnist")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "smoke", "gpu", "tpu"])
def test_configs_are_valid(name, arg):
    config = importlib.import_module(name).get_config(arg)
    method = train.check_config(config, 1)
    assert method.name == "ffcl"
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
    method = train.check_config(c, 1)
    assert (method.settings.tau, method.settings.rampup_epochs) == (3.0, 80.0)


def test_smoke_is_small():
    c = importlib.import_module("configs.cifar100").get_config("smoke")
    assert c.train_examples <= 1024 and c.num_epochs <= 2


VARIANTS = [(name, arg) for name in CONFIGS for arg in (None, "smoke", "gpu", "tpu")]
VARIANTS.append(("configs.fashion_mnist", "demo"))


@pytest.mark.parametrize("name, arg", VARIANTS)
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_every_shipped_config_runs_unchanged_on_1_2_4_and_8_devices(name, arg, num_devices):
    """The training batch divides (it is the protocol, so it is never changed); the evaluation
    batch is rounded up to the devices (its padding is masked, so results do not change)."""
    config = importlib.import_module(name).get_config(arg)
    train.check_config(config, num_devices)
    size = eval_batch_size(config, num_devices)
    assert size % num_devices == 0 and config.eval_batch_size <= size < config.eval_batch_size + 8
    assert eval_batch_size(config, 1) == config.eval_batch_size


def test_eval_batch_rounds_up_to_the_devices():
    config = importlib.import_module("configs.cifar100").get_config("smoke")
    assert [eval_batch_size(config, n) for n in (1, 2, 4, 8, 3)] == [250, 250, 252, 256, 252]


def test_accelerator_variants():
    """`:gpu` keeps the protocol and runs it in bfloat16 with the data on the devices; `:tpu`
    scales the global batch to 1024 with a linearly scaled, warmed-up learning rate."""
    protocol = importlib.import_module("configs.cifar100").get_config()
    gpu = importlib.import_module("configs.cifar100").get_config("gpu")
    tpu = importlib.import_module("configs.cifar100").get_config("tpu")
    for c in (gpu, tpu):
        assert c.compute_dtype == "bfloat16" and c.data_on_device
    assert (gpu.batch_size, gpu.learning_rate, gpu.warmup_epochs) == (128, 0.1, 0.0)
    assert (tpu.batch_size, tpu.learning_rate, tpu.warmup_epochs) == (1024, 0.8, 5.0)
    assert tpu.num_epochs == protocol.num_epochs and tpu.lr_decay_epochs == protocol.lr_decay_epochs


def test_warmup_ramps_the_rate_linearly_then_leaves_the_decays_alone():
    import numpy as np

    config = importlib.import_module("configs.cifar100").get_config("tpu")
    config.lr_decay_epochs = (10,)
    method = train.check_config(config, 1)
    _, schedule = make_optimizer(config, 4, method)
    rates = np.array([float(schedule(step)) for step in (0, 9, 19, 20, 39, 40)])
    np.testing.assert_allclose(rates, [0.04, 0.4, 0.8, 0.8, 0.8, 0.08], rtol=1e-6)
    config.warmup_epochs = 0.0  # the protocol's schedule: piecewise constant from step 0
    _, schedule = make_optimizer(config, 4, method)
    assert float(schedule(0)) == pytest.approx(0.8)


@pytest.mark.slow
def test_accelerator_variants_compile_on_8_devices():
    """The cifar100 pair's train step under `:gpu` and `:tpu`, compiled (not run) for 8 forced
    CPU devices: the sharded batch, bfloat16 and the on-device data all lower."""
    code = (
        "import os, sys\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
        "import jax\n"
        "from configs.cifar100 import get_config\n"
        "from ffcl_jax import input_pipeline, parallel, train\n"
        "from ffcl_jax.config_base import check_config\n"
        "import numpy as np\n"
        "mesh = parallel.DataParallel(-1)\n"
        "for arg in ('gpu', 'tpu'):\n"
        "    config = get_config(arg)\n"
        "    method = check_config(config, mesh.size)\n"
        "    setup, state = train.build(config, method, 390, mesh)\n"
        "    state = jax.device_put(state, mesh.replicated)\n"
        "    images = np.zeros((config.batch_size * 2, 32, 32, 3), np.uint8)\n"
        "    labels = np.zeros((config.batch_size * 2,), np.int32)\n"
        "    data = train.make_train_data(config, images, labels, mesh)\n"
        "    batch = mesh.global_batch(next(iter(data.epoch(0))))\n"
        "    step, _ = train.jit_steps(setup, config)\n"
        "    with jax.set_mesh(mesh.mesh):\n"
        "        step.lower(state, batch).compile()\n"
        "    print(arg, mesh.size, batch['image'].shape, batch['image'].sharding.spec)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("gpu 8 (128, 32, 32, 3)") and "data" in lines[0]
    assert lines[1].startswith("tpu 8 (1024, 32, 32, 3)") and "data" in lines[1]
