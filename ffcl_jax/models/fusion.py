"""The FFCL fusion module, and the fused feature maps that teach the networks.

`FusionModule` (docs/method.md, "Networks"): pool the larger map down to the smaller resolution,
concatenate channels (C_T + C_S), depthwise 3x3 conv -> BN -> ReLU, 1x1 conv to C_fused -> BN ->
ReLU (the fused map), global average pool, Dense (the fused logits). No stop-gradient: the fused
loss trains both networks through this module.

`FusedFeatureKnowledge` (the `fused_map` and `stage_fusion` feature forms): the fused map of a
stage is a target for both networks' maps of that stage, each seen through a learned 1x1
adapter to the fused map's channels. `fused_map` uses the cohort's fusion module at the last
stage only; `stage_fusion` adds a fusion module at every earlier stage, with a classifier of its
own whose cross-entropy trains it (a map that only served as a target would never learn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.batch_norm import batch_norm
from ffcl_jax.models.layers import avg_pool_to, conv, dense, global_avg_pool


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
        self.fused_channels = fused_channels
        self.classifier = dense(fused_channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, teacher_map: jax.Array, student_map: jax.Array, *, train: bool) -> jax.Array:
        """The fused logits."""
        return self.classify(self.fuse(teacher_map, student_map, train=train))

    def classify(self, fused_map: jax.Array) -> jax.Array:
        return self.classifier(global_avg_pool(fused_map))

    def fuse(self, teacher_map: jax.Array, student_map: jax.Array, *, train: bool) -> jax.Array:
        """The fused map (NHWC, C_fused channels, at the smaller of the two resolutions)."""
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
        x = self.depthwise_bn(self.depthwise(x), use_running_average=frozen, relu=True)
        return self.pointwise_bn(self.pointwise(x), use_running_average=frozen, relu=True)


class FusedFeatureKnowledge(nnx.Module):
    """Fusion modules for the taught stages before the last, and each network's adapters.

    `stages` lists the taught stage indices in increasing order; the last stage's fused map comes
    from the cohort's fusion module and is passed in. Each earlier stage's fusion module has its
    own classifier, trained with cross-entropy like the last one (its gradient too reaches both
    networks). Adapters are bias-free 1x1 convolutions from a network's stage channels to the
    fused map's channels.
    """

    def __init__(
        self,
        teacher_stage_channels: tuple[int, ...],
        student_stage_channels: tuple[int, ...],
        stages: tuple[int, ...],
        last_fused_channels: int,
        num_classes: int,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        last = min(len(teacher_stage_channels), len(student_stage_channels)) - 1
        self.stages = tuple(stages)
        self.last_stage = last
        fusions, teacher_adapters, student_adapters = [], [], []
        for stage in self.stages:
            t_ch, s_ch = teacher_stage_channels[stage], student_stage_channels[stage]
            if stage == last:
                fused_ch = last_fused_channels
            else:
                fusions.append(FusionModule(t_ch, s_ch, num_classes, dtype=dtype, rngs=rngs))
                fused_ch = s_ch
            teacher_adapters.append(conv(t_ch, fused_ch, 1, dtype=dtype, rngs=rngs))
            student_adapters.append(conv(s_ch, fused_ch, 1, dtype=dtype, rngs=rngs))
        self.stage_fusions = nnx.List(fusions)
        self.teacher_adapters = nnx.List(teacher_adapters)
        self.student_adapters = nnx.List(student_adapters)

    def __call__(
        self,
        teacher_features: list[jax.Array],
        student_features: list[jax.Array],
        last_fused_map: jax.Array | None,
        *,
        train: bool,
    ) -> tuple[list[dict[str, jax.Array]], list[jax.Array]]:
        """`(targets, stage_logits)`: one `{"fused", "teacher", "student"}` dict of maps per
        taught stage, all of the fused map's shape (the target and the two adapted network maps
        it teaches), and the logits of each earlier stage's fusion classifier."""
        targets, stage_logits = [], []
        fusions = iter(self.stage_fusions)
        for index, stage in enumerate(self.stages):
            t_map, s_map = teacher_features[stage], student_features[stage]
            if stage == self.last_stage:
                fused = last_fused_map
            else:
                fusion = next(fusions)
                fused = fusion.fuse(t_map, s_map, train=train)
                stage_logits.append(fusion.classify(fused))
            size = fused.shape[1:3]
            targets.append(
                {
                    "fused": fused,
                    "teacher": self.teacher_adapters[index](avg_pool_to(t_map, size)),
                    "student": self.student_adapters[index](avg_pool_to(s_map, size)),
                }
            )
        return targets, stage_logits
