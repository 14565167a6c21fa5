"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation blocks.

Layout of RepDistiller's `wrn.py`: a 16-channel stem, three stages of (d-4)/6 blocks with
16k/32k/64k channels, a 1x1 shortcut on the pre-activated input where the width changes, and a
final BatchNorm + ReLU before pooling. Dropout is 0 as in the KD zoos. The last stage feature
returned is the post-BN-ReLU map (the one the classifier pools), the same convention as the
ResNets, so that fusion and attention transfer see activated features for every family.
"""

from __future__ import annotations

import jax
from flax import nnx

from ffcl_jax.models.batch_norm import batch_norm
from ffcl_jax.models.layers import ZooNetwork, build_stages, conv, dense, global_avg_pool


class WideBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.bn1 = batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, 1, dtype=dtype, rngs=rngs)
        self.equal_in_out = in_ch == out_ch and stride == 1
        self.shortcut_conv = (
            None if self.equal_in_out else conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs)
        )

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        frozen = not train
        pre = self.bn1(x, use_running_average=frozen, relu=True)
        y = self.conv1(pre)
        y = self.conv2(self.bn2(y, use_running_average=frozen, relu=True))
        shortcut = x if self.equal_in_out else self.shortcut_conv(pre)
        return shortcut + y


class WideResNet(ZooNetwork):
    """Returns `(logits, [stage_1, stage_2, relu(bn(stage_3))])`, each in NHWC."""

    STEM_MODULES = ("stem_conv",)

    @staticmethod
    def blocks_per_stage(depth: int) -> int:
        return (depth - 4) // 6

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        *,
        in_channels: int = 3,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        blocks_per_stage = self.blocks_per_stage(depth)
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stage_channels = widths
        self.stem_conv = conv(in_channels, 16, 3, dtype=dtype, rngs=rngs)
        self.stages, in_ch = build_stages(
            WideBlock, 16, widths, blocks_per_stage, dtype=dtype, rngs=rngs
        )
        self.final_bn = batch_norm(in_ch, dtype=dtype, rngs=rngs)
        self.classifier = dense(in_ch, num_classes, dtype=dtype, rngs=rngs)

    def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        return self.stem_conv(x)

    def head(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """`(logits, last stage map)`: the map after the final BatchNorm and ReLU."""
        x = self.final_bn(x, use_running_average=not train, relu=True)
        return self.classifier(global_avg_pool(x)), x
