"""Per-member optimizer groups (`Method.optimizer_groups`): what the default groups build (the
optimizer state runs had before groups existed), SGD and Adam groups with their own rates and
weight decays against the PyTorch reference's optimizers, and the errors of bad declarations."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from ffcl_jax import convert, methods, train
from ffcl_jax.errors import UserError
from ffcl_jax.methods.base import OptimizerGroup
from ffcl_jax.methods.pair import PairMethod
from ffcl_jax.optimizer import make_optimizer, make_schedule
from ffcl_jax.torch_reference import optim as torch_optim
from tests.conftest import tiny_config
from tests.helpers.torch_parity import assert_same_parameters, member_stats, reference_cohort

STEPS_PER_EPOCH = 2  # the schedule drops x0.1 after step 2


class _Grouped(PairMethod):
    """FFCL with a member in each kind of group: the teacher at the run's SGD, the student at a
    tenth of its rate, the fusion module with Adam at its own rate and weight decay."""

    def optimizer_groups(self, config):
        return {
            "members": OptimizerGroup(config.weight_decay),
            "slow": OptimizerGroup(config.weight_decay, learning_rate=0.1 * config.learning_rate),
            "adam": OptimizerGroup(1e-4, optimizer="adam", learning_rate=1e-3),
        }

    def optimizer_group(self, member):
        return {"student": "slow", "fusion": "adam"}.get(member, "members")


def _config(fmnist_dir, method="ffcl"):
    return tiny_config(
        fmnist_dir, method=method, teacher="resnet8", student="resnet8", learning_rate=0.1
    )


def _state(config, method):
    return train.build(config, method, STEPS_PER_EPOCH)[1]


def _pre_groups_optimizer(config, method):
    """The optimizer every method had before optimizer groups, written out."""
    schedule = make_schedule(config, STEPS_PER_EPOCH)

    def mask(predicate):
        return lambda p: jax.tree_util.tree_map_with_path(lambda k, _: predicate(k[0].key), p)

    side = method.fusion_side_members
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask(lambda m: m not in side)),
        optax.add_decayed_weights(config.fusion_weight_decay, mask=mask(lambda m: m in side)),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
    if method.frozen_members:
        frozen = method.frozen_members
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            mask(lambda m: "frozen" if m in frozen else "train"),
        )
    return tx


@pytest.mark.parametrize("name", ["ffcl", "kd", "pcl"])
def test_default_groups_build_the_optimizer_of_before(fmnist_dir, name):
    """The default groups give the same state tree (what checkpoints hold) and the same
    updates as the optimizer of before, whose weight decays were two masks over one SGD."""
    config = _config(fmnist_dir, name)
    if name == "kd":
        config.teacher_checkpoint = "unused: the initial weights"
    method = train.check_config(config, 1)
    state = _state(config, method)
    ours, _ = make_optimizer(config, STEPS_PER_EPOCH, method)
    before = _pre_groups_optimizer(config, method)
    ours_state, before_state = ours.init(state.params), before.init(state.params)
    assert jax.tree.structure(ours_state) == jax.tree.structure(before_state)
    rng = np.random.default_rng(0)
    params = state.params
    for _ in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
        a, ours_state = ours.update(grads, ours_state, params)
        b, before_state = before.update(grads, before_state, params)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        params = optax.apply_updates(params, a)


def test_sgd_and_adam_groups_match_pytorch_and_their_declared_rates(fmnist_dir):
    """The same random gradients into JAX's groups and the reference's optimizers for three
    steps (the schedule's x0.1 after step 2 on every group) give the same parameters; the first
    update of the slow group is a tenth of the run's SGD's, the Adam group's first update is
    -lr (g + wd p) / (|g + wd p| + eps)."""
    config = _config(fmnist_dir)
    method = _Grouped("ffcl", methods.create("ffcl").settings)
    state = _state(config, method)
    tx, _ = make_optimizer(config, STEPS_PER_EPOCH, method)
    plain, _ = make_optimizer(config, STEPS_PER_EPOCH, methods.create("ffcl"))
    cohort = reference_cohort(config, method, state.params, state.batch_stats)
    optimizer, schedule = torch_optim.make_optimizer(cohort, config, STEPS_PER_EPOCH, method)
    assert len(optimizer.optimizers) == 2  # one SGD (two parameter groups) and one Adam
    params, opt_state = state.params, tx.init(state.params)
    rng = np.random.default_rng(0)
    for step in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        if step == 0:
            reference, _ = plain.update(grads, plain.init(params), params)
            for a, b in zip(
                jax.tree.leaves(updates["student"]),
                jax.tree.leaves(reference["student"]),
                strict=True,
            ):
                np.testing.assert_allclose(a, 0.1 * np.asarray(b), rtol=1e-6, atol=1e-12)
            for u, g, p in zip(
                jax.tree.leaves(updates["fusion"]),
                jax.tree.leaves(grads["fusion"]),
                jax.tree.leaves(params["fusion"]),
                strict=True,
            ):
                g = np.asarray(g, np.float64) + 1e-4 * np.asarray(p, np.float64)
                np.testing.assert_allclose(u, -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-5)
        params = optax.apply_updates(params, updates)
        for member in params:
            torch_grads = convert.to_torch_state_dict(
                grads[member], member_stats(state.batch_stats, member)
            )
            for name, param in getattr(cohort, member).named_parameters():
                param.grad = torch_grads[name].double()
        optimizer.step()
        schedule.step()
        assert_same_parameters(params, state.batch_stats, cohort, 1e-6, f"step {step + 1}")


def test_a_bad_optimizer_group_is_one_clear_error(fmnist_dir):
    config = _config(fmnist_dir)

    class _Bad(PairMethod):
        def optimizer_groups(self, config):
            bad = OptimizerGroup(0.0, optimizer="rmsprop")
            return {"members": bad, "fusion_side": OptimizerGroup(0.0)}

    with pytest.raises(UserError, match="optimizer 'rmsprop'; valid: sgd, adam"):
        make_optimizer(config, STEPS_PER_EPOCH, _Bad("ffcl", methods.create("ffcl").settings))
