"""Model zoo registry and the teacher/student/fusion cohort.

Every zoo model maps NHWC images of any size and channel count to `(logits, stage_features)`,
where `stage_features` holds the un-pooled output of each of its three stages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from ffcl_jax.errors import UserError
from ffcl_jax.models.branches import BranchCohort
from ffcl_jax.models.fusion import FusedFeatureKnowledge, FusionModule
from ffcl_jax.models.layers import member_views
from ffcl_jax.models.resnet import CifarResNet
from ffcl_jax.models.wrn import WideResNet

NUM_STAGES = 3  # every zoo model: three stages, each returned as a feature map
# The cohort's roles that are networks (or a branch method's parts of one) and take
# `config.weight_decay`; every other role (fusion side) takes `config.fusion_weight_decay`.
NETWORK_ROLES = ("teacher", "student", "peers", "gate", "attention", "peer_ensemble")
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


class Cohort(nnx.Module):
    """Teacher, student and (optionally) the fusion module, trained as one set of parameters.

    Splitting the cohort once gives one parameter tree with top-level keys `teacher`, `student`,
    `fusion` and, for a fused feature form, `fused_knowledge` (its stage fusion modules and
    adapters), which is what the per-role weight decay and the checkpoints key on.
    """

    def __init__(
        self,
        teacher: nnx.Module,
        student: nnx.Module,
        fusion: FusionModule | None,
        fused_knowledge: FusedFeatureKnowledge | None = None,
    ):
        self.teacher = teacher
        self.student = student
        self.fusion = fusion
        self.fused_knowledge = fused_knowledge

    def __call__(self, images: jax.Array, *, train: bool, train_teacher: bool = True) -> dict:
        """`train_teacher=False` runs the teacher in inference mode (running BatchNorm
        statistics, none updated) while the rest trains: a frozen teacher, as in KD. A batch of
        two views (`member_views`) gives the teacher view 0 and the student view 1 (KDCL)."""
        teacher_images, student_images = member_views(images, 2)
        teacher_logits, teacher_features = self.teacher(
            teacher_images, train=train and train_teacher
        )
        student_logits, student_features = self.student(student_images, train=train)
        out = dict(
            teacher_logits=teacher_logits,
            student_logits=student_logits,
            teacher_features=teacher_features,
            student_features=student_features,
        )
        if self.fusion is not None:
            fused_map = self.fusion.fuse(teacher_features[-1], student_features[-1], train=train)
            out["fused_logits"] = self.fusion.classify(fused_map)
            # Feature targets only teach: an evaluation does not need them.
            if self.fused_knowledge is not None and train:
                out["feature_targets"], out["stage_fused_logits"] = self.fused_knowledge(
                    teacher_features, student_features, fused_map, train=train
                )
        return out


def create_cohort(
    teacher: str,
    student: str,
    num_classes: int,
    *,
    in_channels: int,
    use_fusion: bool,
    fused_channels: int | None = None,
    fused_feature_stages: tuple[int, ...] | None = None,
    dtype=None,
    seed: int = 0,
) -> Cohort:
    """`fused_feature_stages`: the stages whose fused map teaches both networks (the last
    stage's is the classifier fusion module's map), or None for none. Modules are created in a
    fixed order (teacher, student, fusion, then the feature modules), so adding the feature
    modules leaves the initial weights of the others unchanged."""
    rngs = nnx.Rngs(seed)
    teacher_net = create_model(
        teacher, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
    )
    student_net = create_model(
        student, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
    )
    fusion = None
    if use_fusion:
        fusion = FusionModule(
            teacher_net.stage_channels[-1],
            student_net.stage_channels[-1],
            num_classes,
            fused_channels=fused_channels,
            dtype=dtype,
            rngs=rngs,
        )
    fused_knowledge = None
    if fused_feature_stages:
        if fusion is None:
            raise ValueError("fused feature knowledge needs the fusion module (use_fusion)")
        fused_knowledge = FusedFeatureKnowledge(
            teacher_net.stage_channels,
            student_net.stage_channels,
            tuple(sorted(fused_feature_stages)),
            fusion.fused_channels,
            num_classes,
            dtype=dtype,
            rngs=rngs,
        )
    return Cohort(teacher_net, student_net, fusion, fused_knowledge)


def create_branch_cohort(
    name: str,
    num_classes: int,
    *,
    in_channels: int,
    num_branches: int,
    branch_stages: int,
    gate: str,
    backprop_rescale: bool,
    peer_attention: bool = False,
    peer_ensemble: bool = False,
    dtype=None,
    seed: int = 0,
) -> BranchCohort:
    """The branch methods' cohort: `num_branches` branches of zoo network `name`
    (models/branches.py); branch 0 and the trunk are built first, as `create_model` builds the
    network alone, so the student starts from the single network's initial weights."""
    check_model_name(name)
    return BranchCohort(
        lambda rngs: create_model(
            name, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
        ),
        num_branches,
        branch_stages,
        gate,
        backprop_rescale=backprop_rescale,
        peer_attention=peer_attention,
        peer_ensemble=peer_ensemble,
        dtype=dtype,
        rngs=nnx.Rngs(seed),
    )
