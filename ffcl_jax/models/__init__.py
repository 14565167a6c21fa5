"""The model zoo: CIFAR ResNets and Wide ResNets by name.

Every zoo model maps NHWC images of any size and channel count to `(logits, stage_features)`,
where `stage_features` holds the un-pooled output of each of its three stages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import nnx

from ffcl_jax.errors import UserError
from ffcl_jax.models.resnet import CifarResNet
from ffcl_jax.models.wrn import WideResNet

NUM_STAGES = 3  # every zoo model: three stages, each returned as a feature map
_X4 = dict(stem_channels=32, widths=(64, 128, 256))

MODELS: dict[str, Callable[..., nnx.Module]] = {
    **{
        f"resnet{depth}": functools.partial(CifarResNet, depth)
        for depth in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": functools.partial(CifarResNet, 8, **_X4),
    "resnet32x4": functools.partial(CifarResNet, 32, **_X4),
    "wrn_16_1": functools.partial(WideResNet, 16, 1),
    "wrn_16_2": functools.partial(WideResNet, 16, 2),
    "wrn_40_1": functools.partial(WideResNet, 40, 1),
    "wrn_40_2": functools.partial(WideResNet, 40, 2),
    "wrn_28_10": functools.partial(WideResNet, 28, 10),
}


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")


def blocks_per_stage(name: str) -> int:
    """Residual blocks in each of a zoo model's three stages (what its backward cost grows with)."""
    check_model_name(name)
    factory = MODELS[name]  # a partial of the network class with its depth first
    return factory.func.blocks_per_stage(factory.args[0])


def create_model(
    name: str, num_classes: int, *, in_channels: int = 3, dtype=None, rngs: nnx.Rngs
) -> nnx.Module:
    """Builds a zoo model by name; an unknown name raises a ValueError listing the valid ones."""
    check_model_name(name)
    return MODELS[name](num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs)
