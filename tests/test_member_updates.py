"""The generic step's per-member controls: a method pausing a member for a step
(`Method.member_updates`: its parameters and optimizer state stay bit-identical, its BatchNorm
statistics move) and a per-member learning-rate factor (`Method.learning_rate_scales`), in JAX
and in the PyTorch reference's optimizer and step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ffcl_jax import datasets, train
from ffcl_jax.optimizer import make_optimizer
from ffcl_jax.torch_reference import methods as torch_methods
from ffcl_jax.torch_reference import optim as torch_optim
from tests.conftest import tiny_config


def _setup(fmnist_dir, method_hooks):
    """DML on the tiny pair, with `method_hooks` set on the method instance."""
    config = tiny_config(fmnist_dir, method="dml", learning_rate=0.1, momentum=0.9)
    method = train.check_config(config, 1)
    for name, hook in method_hooks.items():
        setattr(method, name, hook)
    setup, state = train.build(config, method, 4)
    return config, method, setup, state


def _batch(fmnist_dir, start):
    images, labels = datasets.load_idx_split(fmnist_dir, "train")
    return {"image": images[start : start + 32], "label": labels[start : start + 32]}


def _momentum(opt_state, member):
    """The member's momentum buffers (the leaves of the optimizer state under its name)."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    found = [v for path, v in leaves if any(getattr(k, "key", None) == member for k in path)]
    assert found, f"no optimizer state for {member}"
    return found


def _assert_tree_equal(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def _assert_tree_differs(a, b, what):
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ), what


def test_a_paused_member_keeps_its_parameters_and_momentum_bit_identical(fmnist_dir):
    """Step 1 trains both (momentum becomes non-zero); step 2 pauses the teacher on a flag
    computed from the terms inside the jitted step. The teacher's parameters and momentum after
    step 2 are step 1's, bit for bit; its BatchNorm statistics, the student and the schedule's
    step count move; the flag is logged as `updates_teacher`."""
    # Traced: ce_teacher is positive, so the flag is False, but only the step knows it.
    pause = {"member_updates": lambda terms: {"teacher": terms["ce_teacher"] < 0}}
    _, _, plain, state = _setup(fmnist_dir, {})
    _, _, paused, _ = _setup(fmnist_dir, pause)
    after_one, metrics = jax.jit(plain.train_step)(state, _batch(fmnist_dir, 0))
    assert "updates_teacher" not in metrics  # default: no flags, the step is unchanged
    after_two, metrics = jax.jit(paused.train_step)(after_one, _batch(fmnist_dir, 32))
    assert float(metrics["updates_teacher"]) == 0.0
    _assert_tree_equal(after_one.params["teacher"], after_two.params["teacher"], "teacher moved")
    assert np.any(np.asarray(_momentum(after_one.opt_state, "teacher")[0]))
    _assert_tree_equal(
        _momentum(after_one.opt_state, "teacher"),
        _momentum(after_two.opt_state, "teacher"),
        "teacher's momentum moved",
    )
    _assert_tree_differs(
        after_one.batch_stats["teacher"], after_two.batch_stats["teacher"], "teacher's BN stats"
    )
    _assert_tree_differs(after_one.params["student"], after_two.params["student"], "student")
    _assert_tree_differs(
        _momentum(after_one.opt_state, "student"),
        _momentum(after_two.opt_state, "student"),
        "student's momentum",
    )
    assert int(after_two.step) == 2


@pytest.mark.slow
def test_a_member_whose_flag_is_on_steps_as_without_flags(fmnist_dir):
    _, _, plain, state = _setup(fmnist_dir, {})
    _, _, flagged, _ = _setup(
        fmnist_dir, {"member_updates": lambda terms: {"teacher": terms["ce_teacher"] > 0}}
    )
    batch = _batch(fmnist_dir, 0)
    a, _ = jax.jit(plain.train_step)(state, batch)
    b, metrics = jax.jit(flagged.train_step)(state, batch)
    assert float(metrics["updates_teacher"]) == 1.0
    _assert_tree_equal(a.params, b.params, "params")
    _assert_tree_equal(a.opt_state, b.opt_state, "optimizer state")


@pytest.mark.slow
def test_learning_rate_scale_multiplies_a_members_update_in_jax_and_pytorch(fmnist_dir):
    """A factor 0.1 on the student: its first SGD update is 0.1 x the unscaled one, the
    teacher's is unchanged; the reference gives the student a group at 0.1 x the rate."""
    config, plain_method, _, state = _setup(fmnist_dir, {})
    _, scaled_method, _, _ = _setup(fmnist_dir, {"learning_rate_scales": lambda: {"student": 0.1}})
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), state.params)
    updates = {}
    for name, method in (("plain", plain_method), ("scaled", scaled_method)):
        tx, _ = make_optimizer(config, 4, method)
        updates[name], _ = tx.update(grads, tx.init(state.params), state.params)
    _assert_tree_equal(updates["plain"]["teacher"], updates["scaled"]["teacher"], "teacher")
    for u, v in zip(
        jax.tree.leaves(updates["plain"]["student"]),
        jax.tree.leaves(updates["scaled"]["student"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(v), 0.1 * np.asarray(u), rtol=1e-6)

    cohort = torch_methods.MIRRORS["dml"].build(
        config, scaled_method, datasets.dataset_info(config.dataset)
    )
    optimizer, _ = torch_optim.make_optimizer(cohort, config, 4, scaled_method)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {rates[id(p)] for p in cohort.teacher.parameters()} == {0.1}
    assert {rates[id(p)] for p in cohort.student.parameters()} == {0.1 * 0.1}


def test_pytorch_reference_pauses_a_member_by_dropping_its_gradient(monkeypatch):
    """`pause_members`: a paused member's gradients become None, which torch.optim.SGD skips
    (no weight decay, momentum buffer unchanged)."""
    net = torch.nn.ModuleDict({"teacher": torch.nn.Linear(3, 2), "student": torch.nn.Linear(3, 2)})
    mirror = torch_methods.Mirror(
        build=None, objective=None, member_updates=lambda terms, s: {"teacher": False}
    )
    monkeypatch.setitem(torch_methods.MIRRORS, "paused_dummy", mirror)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    loss = sum(m(torch.ones(1, 3)).sum() for m in net.values())
    loss.backward()
    before = [p.detach().clone() for p in net["teacher"].parameters()]
    flags = torch_methods.pause_members(net, {"method": "paused_dummy"}, {})
    optimizer.step()
    assert flags == {"teacher": False}
    for a, b in zip(before, net["teacher"].parameters(), strict=True):
        assert torch.equal(a, b)
        assert "momentum_buffer" not in optimizer.state[b]
    assert all("momentum_buffer" in optimizer.state[p] for p in net["student"].parameters())
