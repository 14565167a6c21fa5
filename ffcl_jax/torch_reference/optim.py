"""SGD (Nesterov) with per-member weight decay and an epoch-based multistep schedule, in PyTorch."""

from __future__ import annotations

import torch


def make_optimizer(cohort, config, steps_per_epoch: int, method):
    """`torch.optim.SGD` with `fusion_weight_decay` on the method's fusion-side members and
    `weight_decay` on the others (none on its frozen members), each member's rate times its
    `learning_rate_scales` factor, and a `MultiStepLR` stepped once
    per training step (milestones in steps), as `ffcl_jax.train.make_optimizer`."""
    scales = method.learning_rate_scales()
    grouped: dict[tuple[bool, float], list] = {}  # (fusion side, rate factor) -> parameters
    for name, param in cohort.named_parameters():
        member = name.split(".")[0]
        if member in method.frozen_members:
            param.requires_grad_(False)
            continue
        key = (member in method.fusion_side_members, scales.get(member, 1.0))
        grouped.setdefault(key, []).append(param)
    groups = [
        {
            "params": params,
            "weight_decay": config.fusion_weight_decay if fusion else config.weight_decay,
            **({"lr": config.learning_rate * scale} if scale != 1 else {}),
        }
        for (fusion, scale), params in grouped.items()
    ]
    optimizer = torch.optim.SGD(
        groups, lr=config.learning_rate, momentum=config.momentum, nesterov=config.nesterov
    )
    milestones = [int(epoch * steps_per_epoch) for epoch in config.lr_decay_epochs]
    decay = config.lr_decay_factor
    warmup_steps = int(config.get("warmup_epochs", 0) * steps_per_epoch)
    if warmup_steps <= 0:
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, decay)
    else:  # as ffcl_jax.train.make_optimizer: the linear ramp times the step decays

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup_steps)
            return ramp * decay ** sum(step >= m for m in milestones)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, schedule
