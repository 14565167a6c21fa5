"""The cohort's optimizer and learning-rate schedule: each member in an optimizer group (its
weight decay, SGD or Adam, its base rate), frozen members without updates or state, per-member
rate scales, and the epoch-based decay after an optional warm-up.

Apart from `train`, which builds a run around it: the PyTorch reference mirrors this module
(`torch_reference/optim.py`), and the tests compare the two without building a run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ffcl_jax.errors import UserError
from ffcl_jax.methods import Method
from ffcl_jax.methods.base import OPTIMIZERS, OptimizerGroup


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, base_rate=None):
    """The run's learning-rate schedule from `base_rate` (default `config.learning_rate`): an
    epoch-based multistep decay after `config.warmup_epochs` of linear warm-up (none by
    default)."""
    decays = optax.piecewise_constant_schedule(
        config.learning_rate if base_rate is None else base_rate,
        {int(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs},
    )
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    if warmup_steps <= 0:
        return decays

    def schedule(step):  # large global batches (Goyal et al., 2017): a linear ramp to the rate
        return decays(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)

    return schedule


def _group_transform(config, steps_per_epoch: int, group: OptimizerGroup):
    """One optimizer group: its weight decay added to the gradient, then SGD or Adam at the
    run's schedule from the group's base rate."""
    schedule = make_schedule(config, steps_per_epoch, group.base_rate(config))
    if group.optimizer == "adam":  # PyTorch's Adam: eps outside the square root, L2 coupled
        update = optax.chain(
            optax.scale_by_adam(group.adam_b1, group.adam_b2, group.adam_eps),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        update = optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov)
    return optax.chain(optax.add_decayed_weights(group.weight_decay), update)


def check_optimizer_groups(groups: dict[str, OptimizerGroup]) -> None:
    if "frozen" in groups:
        raise ValueError("'frozen' is the frozen members' label, not an optimizer group's name")
    for name, group in groups.items():
        if group.optimizer not in OPTIMIZERS:
            raise UserError(
                f"optimizer group {name!r} asks for optimizer {group.optimizer!r}; "
                f"valid: {', '.join(OPTIMIZERS)}"
            )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, method: Method):
    """The cohort's optimizer (`method.optimizer_groups`, each member in one group; frozen
    members get no update and no state) and the run's schedule.

    Weight decay is added to the gradient before momentum, as `torch.optim.SGD(weight_decay=...)`
    does, and applies to every parameter of a member (BatchNorm included), as in the FFL and
    RepDistiller references; by default `fusion_weight_decay` for the method's fusion-side
    members (FFCL's fusion module and fused feature knowledge), `weight_decay` for the others.

    Groups that differ in weight decay alone share one SGD, each decay masked to its members
    (the optimizer state every run had before groups could differ in more); groups with another
    optimizer or rate get `optax.multi_transform`, a transformation each.
    """
    schedule = make_schedule(config, steps_per_epoch)
    groups = method.optimizer_groups(config)
    check_optimizer_groups(groups)

    def label(member: str) -> str:
        if member in method.frozen_members:
            return "frozen"
        name = method.optimizer_group(member)
        if name not in groups:
            raise ValueError(f"member {member!r} is in optimizer group {name!r}, not declared")
        return name

    def member_mask(predicate: Callable[[str], bool]):
        return lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: predicate(path[0].key), params
        )

    labels = member_mask(label)
    one_sgd = all(
        g.optimizer == "sgd" and g.base_rate(config) == config.learning_rate
        for g in groups.values()
    )
    if one_sgd:
        tx = optax.chain(
            *(
                optax.add_decayed_weights(
                    group.weight_decay, mask=member_mask(lambda m, n=name: label(m) == n)
                )
                for name, group in groups.items()
            ),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
        tx = scaled_by_member(tx, method, member_mask)
        if method.frozen_members:
            # A frozen member gets zero updates (no weight decay either) and no optimizer state.
            tx = optax.multi_transform(
                {"train": tx, "frozen": optax.set_to_zero()},
                member_mask(lambda m: "frozen" if label(m) == "frozen" else "train"),
            )
        return tx, schedule
    transforms = {
        name: _group_transform(config, steps_per_epoch, group) for name, group in groups.items()
    }
    if method.frozen_members:
        transforms["frozen"] = optax.set_to_zero()
    return scaled_by_member(
        optax.multi_transform(transforms, labels), method, member_mask
    ), schedule


def scaled_by_member(tx, method: Method, member_mask):
    """`tx` with each member's updates times its `learning_rate_scales` factor. SGD's and Adam's
    updates are linear in the rate (SGD's momentum buffer holds gradients, as in
    torch.optim.SGD), so a member's rate times c is its update times c."""
    scales = method.learning_rate_scales()
    if all(scale == 1 for scale in scales.values()):
        return tx
    factor = member_mask(lambda m: scales.get(m, 1.0))

    def scale(updates, params):
        return jax.tree.map(jnp.multiply, updates, factor(updates))

    return optax.chain(tx, optax.stateless(scale))
