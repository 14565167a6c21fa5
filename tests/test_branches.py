"""The multi-branch network of the branch methods (models/branches.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffcl_jax.models import create_model
from ffcl_jax.models.branches import BranchCohort, scale_gradient


def _network(name):
    return lambda rngs: create_model(name, 10, in_channels=1, rngs=rngs)


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
def test_branch_zero_with_the_trunk_is_the_plain_network(name):
    cohort = BranchCohort(_network(name), 3, 1, "one", backprop_rescale=False, rngs=nnx.Rngs(0))
    plain = create_model(name, 10, in_channels=1, rngs=nnx.Rngs(0))
    params = nnx.state(cohort, nnx.Param)
    plain_params = nnx.state(plain, nnx.Param)
    assert _count(params["student"]) == _count(plain_params)
    # Branch 0 is built first from the same seed: the plain network's initial weights.
    for a, b in zip(jax.tree.leaves(params["student"]), jax.tree.leaves(plain_params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The peers hold the last stage and the head only: no stem, no lower stages.
    last_stage_and_head = _count(plain_params["stages"][2]) + _count(plain_params["classifier"])
    if "final_bn" in plain_params:
        last_stage_and_head += _count(plain_params["final_bn"])
    assert _count(params["peers"]) == 2 * last_stage_and_head
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 1)), jnp.float32)
    out = cohort(images, train=False)
    np.testing.assert_allclose(out["student_logits"], plain(images, train=False)[0], atol=1e-5)
    assert len(out["branch_logits"]) == 3 and out["branch_logits"][1].shape == (4, 10)
    np.testing.assert_allclose(out["gate_weights"].sum(-1), 1.0, rtol=1e-6)
    assert [f.shape[-1] for f in out["branch_features"][2]] == list(plain.stage_channels)


def test_two_branch_stages_share_only_the_first_stage():
    cohort = BranchCohort(
        _network("resnet8"), 2, 2, "none", backprop_rescale=False, rngs=nnx.Rngs(0)
    )
    peer = nnx.state(cohort, nnx.Param)["peers"][0]
    assert set(peer["stages"]) == {1, 2} and "stem_conv" not in peer
    assert cohort.gate is None
    with pytest.raises(ValueError, match="branch_stages must be in 1..3"):
        BranchCohort(_network("resnet8"), 2, 4, "none", backprop_rescale=False, rngs=nnx.Rngs(0))


def test_backprop_rescale_divides_the_trunk_gradient_by_the_branches():
    images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 1)), jnp.float32)

    def trunk_gradient(rescale):
        cohort = BranchCohort(
            _network("resnet8"), 3, 1, "none", backprop_rescale=rescale, rngs=nnx.Rngs(0)
        )
        graphdef, params, stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)

        def loss(params):
            out = nnx.merge(graphdef, params, stats, copy=True)(images, train=True)
            return sum(jnp.sum(z * jnp.arange(10.0)) for z in out["branch_logits"])

        grads = jax.grad(loss)(params)
        return grads["student"]["stem_conv"]["kernel"][...], grads["peers"]

    plain_stem, plain_peers = trunk_gradient(False)
    scaled_stem, scaled_peers = trunk_gradient(True)
    np.testing.assert_allclose(scaled_stem, plain_stem / 3, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(scaled_peers), jax.tree.leaves(plain_peers), strict=True):
        np.testing.assert_array_equal(a, b)  # the branches' own gradients are untouched


def test_scale_gradient_is_the_identity_forward():
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(scale_gradient(x, 0.5), x)
    np.testing.assert_allclose(jax.grad(lambda x: scale_gradient(x, 0.25).sum())(x), 0.25)
