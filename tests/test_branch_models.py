"""The multi-branch network of the branch methods: the members `BranchMethod.build_members`
creates (models/branches.py's parts) and its forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import methods
from ffcl_jax.errors import UserError
from ffcl_jax.models import create_model
from ffcl_jax.models.branches import scale_gradient
from tests.helpers import tiers


def _branch_cohort(name, **overrides):
    """A branch method (ONE's preset with `overrides`) and its cohort of `name` networks with
    10 classes of 1-channel images."""
    method = methods.create("one", overrides)
    config = ml_collections.ConfigDict({"student": name})
    members = method.build_members(config, 10, 1, None, nnx.Rngs(0))
    return method, methods.Cohort(members)


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", tiers.cases(["resnet8", "wrn_16_2"], ("resnet8",)))
def test_branch_zero_with_the_trunk_is_the_plain_network(name):
    method, cohort = _branch_cohort(name, num_branches=3, branch_stages=1, gate="one")
    assert cohort.member_names == ("student", "peers", "gate", "attention", "peer_ensemble")
    assert cohort.attention is None and cohort.peer_ensemble is None
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
    out = method.forward(cohort, images, train=False)
    np.testing.assert_allclose(out["student_logits"], plain(images, train=False)[0], atol=1e-5)
    np.testing.assert_array_equal(out["student_logits"], out["branch_logits"][0])
    assert len(out["branch_logits"]) == 3 and out["branch_logits"][1].shape == (4, 10)
    assert out["gate_weights"].shape == (4, 3)
    np.testing.assert_allclose(out["gate_weights"].sum(-1), 1.0, rtol=1e-6)
    assert [f.shape[-1] for f in out["branch_features"][2]] == list(plain.stage_channels)
    # What a run evaluates: the student, each other branch and the gated ensemble.
    evaluated = method.evaluated(out)
    assert (
        set(evaluated)
        == set(method.evaluated_names())
        == {
            "student",
            "branch_1",
            "branch_2",
            "ensemble",
        }
    )
    gated = sum(out["gate_weights"][:, [i]] * z for i, z in enumerate(out["branch_logits"]))
    np.testing.assert_allclose(evaluated["ensemble"], gated, rtol=1e-5, atol=1e-6)


def test_two_branch_stages_share_only_the_first_stage():
    method, cohort = _branch_cohort("resnet8", num_branches=2, branch_stages=2, gate="none")
    peer = nnx.state(cohort, nnx.Param)["peers"][0]
    assert set(peer["stages"]) == {1, 2} and "stem_conv" not in peer
    assert cohort.gate is None
    out = method.forward(cohort, jnp.ones((2, 16, 16, 1)), train=False)
    assert "gate_weights" not in out and len(out["branch_logits"]) == 2
    with pytest.raises(UserError, match=r"loss.branch_stages must be in 1\.\.3, got 4"):
        methods.create("one", {"gate": "none", "branch_stages": 4})


def test_okddip_and_pcl_build_their_heads():
    method = methods.create("okddip")
    members = method.build_members(
        ml_collections.ConfigDict({"student": "resnet8"}), 10, 1, None, nnx.Rngs(0)
    )
    assert members["attention"] is not None and members["gate"] is None
    assert len(members["peers"]) == 3 and members["peer_ensemble"] is None
    out = method.forward(methods.Cohort(members), jnp.ones((2, 16, 16, 1)), train=False)
    attention = out["peer_attention"]  # batch, peer, peer: each row a mix of the 3 peers
    assert attention.shape == (2, 3, 3)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_backprop_rescale_divides_the_trunk_gradient_by_the_branches():
    images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 1)), jnp.float32)

    def trunk_gradient(rescale):
        method, cohort = _branch_cohort("resnet8", gate="none", backprop_rescale=rescale)
        graphdef, params, stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)

        def loss(params):
            model = nnx.merge(graphdef, params, stats, copy=True)
            out = method.forward(model, images, train=True)
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
