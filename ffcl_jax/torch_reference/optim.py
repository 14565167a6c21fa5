"""The cohort's optimizers and their epoch-based multistep schedule, in PyTorch."""

from __future__ import annotations

import torch


class Optimizers:
    """Several `torch.optim` optimizers stepped as one (a method whose optimizer groups use
    different optimizers): `zero_grad`, `step` and `param_groups` over all of them."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


class Schedules:
    """The schedules of `Optimizers`, stepped together."""

    def __init__(self, schedules):
        self.schedules = list(schedules)

    def step(self):
        for schedule in self.schedules:
            schedule.step()


def _schedule(optimizer, config, steps_per_epoch: int):
    """`MultiStepLR` stepped once per training step (milestones in steps), after the linear
    warm-up where there is one; per parameter group from the group's own base rate."""
    milestones = [int(epoch * steps_per_epoch) for epoch in config.lr_decay_epochs]
    decay = config.lr_decay_factor
    warmup_steps = int(config.get("warmup_epochs", 0) * steps_per_epoch)
    if warmup_steps <= 0:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, decay)

    def factor(step: int) -> float:  # as ffcl_jax.optimizer.make_schedule: the ramp times decays
        ramp = min(1.0, (step + 1) / warmup_steps)
        return ramp * decay ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(cohort, config, steps_per_epoch: int, method):
    """The optimizer groups of `method.optimizer_groups` as `ffcl_jax.optimizer.make_optimizer`
    builds them: the SGD groups as parameter groups of one `torch.optim.SGD` (each with its
    weight decay and base rate, times a member's `learning_rate_scales` factor), each Adam group
    a `torch.optim.Adam`; frozen members in none. One optimizer and its schedule where every
    group is SGD, else `Optimizers` and `Schedules`."""
    groups = method.optimizer_groups(config)
    scales = method.learning_rate_scales()
    members: dict[tuple[str, float], list] = {}  # (group, the member's rate factor) -> params
    for name, param in cohort.named_parameters():
        member = name.split(".")[0]
        if member in method.frozen_members:
            param.requires_grad_(False)
            continue
        key = (method.optimizer_group(member), scales.get(member, 1.0))
        members.setdefault(key, []).append(param)
    sgd_groups, adams = [], []
    for (name, scale), params in members.items():
        group = groups[name]
        entry = {
            "params": params,
            "weight_decay": group.weight_decay,
            "lr": group.base_rate(config) * scale,
        }
        if group.optimizer == "adam":
            betas = (group.adam_b1, group.adam_b2)
            adams.append(torch.optim.Adam([entry], betas=betas, eps=group.adam_eps))
        else:
            sgd_groups.append(entry)
    optimizers = []
    if sgd_groups:
        optimizers.append(
            torch.optim.SGD(
                sgd_groups,
                lr=config.learning_rate,
                momentum=config.momentum,
                nesterov=config.nesterov,
            )
        )
    optimizers += adams
    schedules = [_schedule(optimizer, config, steps_per_epoch) for optimizer in optimizers]
    if len(optimizers) == 1:
        return optimizers[0], schedules[0]
    return Optimizers(optimizers), Schedules(schedules)
