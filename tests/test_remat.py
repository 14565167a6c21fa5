"""`config.remat`: each residual block under `jax.checkpoint` with a policy. The same loss,
gradients and BatchNorm statistics as without it (unrolled and scanned), fewer values kept for
the backward pass, and the CPU default unchanged."""

from __future__ import annotations

import re

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import cpu_kernels, train, xla_cpu
from ffcl_jax.errors import UserError
from ffcl_jax.models import create_model
from ffcl_jax.models.layers import LayerKernels, layer_kernels
from tests.conftest import tiny_config
from tests.helpers.model_runs import float64_model_run


def _model_run(name: str, remat: str, scan: bool):
    """The traced step's text and its loss, outputs, statistics and gradients, in float64."""
    text, result, _ = float64_model_run(name, LayerKernels(scan_blocks=scan, remat=remat))
    return text, result


def _rematted(jaxpr_text: str) -> bool:
    """Whether a jaxpr holds a `jax.checkpoint` (`remat2` in the printed jaxpr of jax 0.10)."""
    return re.search(r"= (remat2|checkpoint)\[", jaxpr_text) is not None


@pytest.mark.parametrize(
    "name,remat,scan",
    [
        ("resnet20", "conv_outputs", False),
        ("resnet20", "dots", False),
        pytest.param("resnet20", "conv_outputs", True, marks=pytest.mark.slow),
        pytest.param("wrn_40_1", "conv_outputs", True, marks=pytest.mark.slow),
    ],
)
def test_remat_computes_what_autodiff_does(name, remat, scan):
    with jax.enable_x64(True):
        plain_text, plain = _model_run(name, "none", scan)
        remat_text, rematted = _model_run(name, remat, scan)
    assert not _rematted(plain_text) and " name[" not in plain_text
    assert _rematted(remat_text)
    assert (" name[" in remat_text) == (remat == "conv_outputs")
    chex.assert_trees_all_close(rematted, plain, rtol=1e-10, atol=1e-12)


def _block_residual_bytes(remat: str) -> int:
    """Bytes a ResNet-8's training forward keeps for its backward pass (the vjp's closure)."""
    graphdef, params, stats = nnx.split(
        create_model("resnet8", 10, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat
    )
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))

    def forward(params):
        model = nnx.merge(graphdef, params, stats, copy=True)
        with layer_kernels(LayerKernels(remat=remat)):
            return model(images, train=True)[0]

    _, pullback = jax.vjp(forward, params)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes"))


@pytest.mark.slow
def test_conv_outputs_keeps_fewer_values_than_autodiff():
    kept = {remat: _block_residual_bytes(remat) for remat in ("none", "conv_outputs", "dots")}
    # A block's two convolution outputs, not BatchNorm's intermediates and the ReLUs' outputs.
    assert kept["conv_outputs"] < 0.6 * kept["none"], kept
    assert kept["dots"] < 0.6 * kept["none"], kept


def test_auto_wraps_a_loop_body_only():
    """`remat="auto"`: unrolled blocks as autodiff leaves them (the CPU default's step
    unchanged), a scan_blocks loop's body under the dots policy."""
    with jax.enable_x64(True):
        unrolled_text, _ = _model_run("resnet20", "auto", False)
        scanned_text, _ = _model_run("resnet20", "auto", True)
        scanned_none_text, _ = _model_run("resnet20", "none", True)
    assert not _rematted(unrolled_text)
    assert _rematted(scanned_text) and not _rematted(scanned_none_text)


def test_the_default_is_auto_everywhere_and_a_bad_policy_is_refused(fmnist_dir):
    from configs.cifar100 import get_config

    for variant in (None, "gpu", "tpu"):
        assert get_config(variant).remat == "auto"
    assert xla_cpu.layer_kernels(get_config(), 1, "cpu").remat == "auto"
    assert xla_cpu.layer_kernels(get_config("tpu"), 1, "tpu").remat == "auto"
    with pytest.raises(UserError, match="remat policy 'everything'"):
        train.check_config(tiny_config(fmnist_dir, remat="everything"), 1)


def _one_step(fmnist_dir, remat: str, kernels: str):
    config = tiny_config(fmnist_dir, teacher="resnet20", student="resnet8", remat=remat)
    config.cpu.kernels = kernels
    setup, state = train.build(config, train.check_config(config, 1), 2)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (32, 28, 28, 1)).astype(np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    return jax.jit(setup.train_step)(state, batch)


KERNELS = ["xla"] + (["onednn"] if cpu_kernels.unavailable_reason() is None else [])


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
def test_one_train_step_is_the_same_with_and_without_remat(fmnist_dir, kernels):
    """FFCL's whole step (every loss term, gradients, Nesterov SGD, BatchNorm statistics), on
    XLA's ops and on the oneDNN kernels (custom calls under jax.checkpoint): the same state and
    loss either way."""
    state_off, metrics_off = _one_step(fmnist_dir, "none", kernels)
    state_on, metrics_on = _one_step(fmnist_dir, "conv_outputs", kernels)
    chex.assert_trees_all_close(metrics_on, metrics_off, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state_on.params, state_off.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state_on.batch_stats, state_off.batch_stats, rtol=1e-5, atol=1e-6)
