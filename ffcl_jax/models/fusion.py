"""The FFCL fusion module: teacher and student last-stage maps -> fused logits.

Spec (FFCL_METHOD.md section 2): pool the larger map down to the smaller resolution, concatenate
channels (C_T + C_S), depthwise 3x3 conv -> BN -> ReLU, 1x1 conv to C_fused -> BN -> ReLU, global
average pool, Dense. No stop-gradient: the fused loss trains both networks through this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.layers import avg_pool_to, batch_norm, conv, dense, global_avg_pool


class FusionModule(nnx.Module):
    def __init__(
        self,
        teacher_channels: int,
        student_channels: int,
        num_classes: int,
        *,
        fused_channels: int | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        concat_channels = teacher_channels + student_channels
        fused_channels = fused_channels or student_channels
        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.depthwise = conv(
            concat_channels, concat_channels, 3, groups=concat_channels, dtype=dtype, rngs=rngs
        )
        self.depthwise_bn = batch_norm(concat_channels, dtype=dtype, rngs=rngs)
        self.pointwise = conv(concat_channels, fused_channels, 1, dtype=dtype, rngs=rngs)
        self.pointwise_bn = batch_norm(fused_channels, dtype=dtype, rngs=rngs)
        self.classifier = dense(fused_channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, teacher_map: jax.Array, student_map: jax.Array, *, train: bool) -> jax.Array:
        if teacher_map.shape[-1] != self.teacher_channels:
            raise ValueError(
                f"fusion module built for {self.teacher_channels} teacher channels, "
                f"got a map with {teacher_map.shape[-1]}"
            )
        if student_map.shape[-1] != self.student_channels:
            raise ValueError(
                f"fusion module built for {self.student_channels} student channels, "
                f"got a map with {student_map.shape[-1]}"
            )
        size = (
            min(teacher_map.shape[1], student_map.shape[1]),
            min(teacher_map.shape[2], student_map.shape[2]),
        )
        x = jnp.concatenate(
            [avg_pool_to(teacher_map, size), avg_pool_to(student_map, size)], axis=-1
        )
        frozen = not train
        x = nnx.relu(self.depthwise_bn(self.depthwise(x), use_running_average=frozen))
        x = nnx.relu(self.pointwise_bn(self.pointwise(x), use_running_average=frozen))
        return self.classifier(global_avg_pool(x))
