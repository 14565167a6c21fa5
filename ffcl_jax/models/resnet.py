"""CIFAR ResNets of depth 6n+2 (He et al. 2016) and the wide `x4` variants of the KD zoos.

Basic blocks, three stages, a 1x1 convolution + BatchNorm shortcut wherever the shape changes
(RepDistiller's `resnet.py` layout). `resnet8 ... resnet110` use a 16-channel stem and stages of
16/32/64 channels; `resnet8x4` / `resnet32x4` use a 32-channel stem and stages of 64/128/256.
"""

from __future__ import annotations

import jax
from flax import nnx

from ffcl_jax.models.batch_norm import batch_norm
from ffcl_jax.models.layers import ZooNetwork, build_stages, conv, dense, global_avg_pool


class BasicBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, out_ch, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        if stride != 1 or in_ch != out_ch:
            self.shortcut_conv = conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs)
            self.shortcut_bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        frozen = not train
        y = self.bn1(self.conv1(x), use_running_average=frozen, relu=True)
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=frozen)
        return self.bn2(self.conv2(y), use_running_average=frozen, relu=True, residual=x)


class CifarResNet(ZooNetwork):
    """Returns `(logits, [stage_1, stage_2, stage_3])`, each stage map in NHWC."""

    STEM_MODULES = ("stem_conv", "stem_bn")

    @staticmethod
    def blocks_per_stage(depth: int) -> int:
        return (depth - 2) // 6

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        in_channels: int = 3,
        stem_channels: int = 16,
        widths: tuple[int, int, int] = (16, 32, 64),
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = self.blocks_per_stage(depth)
        self.stage_channels = tuple(widths)
        self.stem_conv = conv(in_channels, stem_channels, 3, dtype=dtype, rngs=rngs)
        self.stem_bn = batch_norm(stem_channels, dtype=dtype, rngs=rngs)
        self.stages, in_ch = build_stages(
            BasicBlock, stem_channels, widths, blocks_per_stage, dtype=dtype, rngs=rngs
        )
        self.classifier = dense(in_ch, num_classes, dtype=dtype, rngs=rngs)

    def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.stem_bn(self.stem_conv(x), use_running_average=not train, relu=True)

    def head(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """`(logits, last stage map)` from the last stage's output."""
        del train
        return self.classifier(global_avg_pool(x)), x
