"""The model zoo, the fusion module and the cohort in PyTorch (NCHW).

Same architectures as `ffcl_jax.models` (RepDistiller's CIFAR ResNets and WRNs, docs/method.md's
fusion module), with the same attribute names, so a Flax parameter `stages/1/0/conv1/kernel` is
the PyTorch tensor `stages.1.0.conv1.weight`. Initialisation is the PyTorch zoos' (He-normal
fan-out convolutions, BatchNorm 1/0, default `nn.Linear`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    layer = nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
    )
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return layer


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5)


def build_stages(block, in_ch: int, widths, blocks_per_stage: int):
    stages = nn.ModuleList()
    for stage_index, width in enumerate(widths):
        blocks = nn.ModuleList()
        for block_index in range(blocks_per_stage):
            stride = 2 if stage_index > 0 and block_index == 0 else 1
            blocks.append(block(in_ch, width, stride))
            in_ch = width
        stages.append(blocks)
    return stages, in_ch


def run_stage(network, index: int, x):
    for block in network.stages[index]:
        x = block(x)
    return x


def _zoo_forward(self, x):
    """`(logits, stage maps)` from the network's parts (`stem`, its stages, `head`), which the
    branch cohort runs separately, as `ffcl_jax.models.layers.ZooNetwork` does."""
    x = self.stem(x)
    features = []
    for index in range(len(self.stages)):
        x = run_stage(self, index, x)
        features.append(x)
    logits, features[-1] = self.head(x)
    return logits, features


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, 3, stride)
        self.bn1 = batch_norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, 1)
        self.bn2 = batch_norm(out_ch)
        self.has_shortcut = stride != 1 or in_ch != out_ch
        if self.has_shortcut:
            self.shortcut_conv = conv(in_ch, out_ch, 1, stride)
            self.shortcut_bn = batch_norm(out_ch)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.has_shortcut:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(x + y)


class CifarResNet(nn.Module):
    """Returns `(logits, [stage_1, stage_2, stage_3])`."""

    STEM_MODULES = ("stem_conv", "stem_bn")  # what a branch without the trunk drops

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        stem_channels: int = 16,
        widths=(16, 32, 64),
    ):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stage_channels = tuple(widths)
        self.stem_conv = conv(in_channels, stem_channels, 3)
        self.stem_bn = batch_norm(stem_channels)
        self.stages, in_ch = build_stages(BasicBlock, stem_channels, widths, blocks_per_stage)
        self.classifier = nn.Linear(in_ch, num_classes)

    def stem(self, x):
        return F.relu(self.stem_bn(self.stem_conv(x)))

    def head(self, x):
        return self.classifier(x.mean(dim=(2, 3))), x

    forward = _zoo_forward


class WideBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = batch_norm(in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, stride)
        self.bn2 = batch_norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, 1)
        self.equal_in_out = in_ch == out_ch and stride == 1
        if not self.equal_in_out:
            self.shortcut_conv = conv(in_ch, out_ch, 1, stride)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return (x if self.equal_in_out else self.shortcut_conv(pre)) + y


class WideResNet(nn.Module):
    """Returns `(logits, [stage_1, stage_2, relu(bn(stage_3))])`."""

    STEM_MODULES = ("stem_conv",)

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stage_channels = widths
        self.stem_conv = conv(in_channels, 16, 3)
        self.stages, in_ch = build_stages(WideBlock, 16, widths, blocks_per_stage)
        self.final_bn = batch_norm(in_ch)
        self.classifier = nn.Linear(in_ch, num_classes)

    def stem(self, x):
        return self.stem_conv(x)

    def head(self, x):
        x = F.relu(self.final_bn(x))
        return self.classifier(x.mean(dim=(2, 3))), x

    forward = _zoo_forward


_X4 = dict(stem_channels=32, widths=(64, 128, 256))
MODELS = {
    **{f"resnet{d}": functools.partial(CifarResNet, d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(CifarResNet, 8, **_X4),
    "resnet32x4": functools.partial(CifarResNet, 32, **_X4),
    "wrn_16_1": functools.partial(WideResNet, 16, 1),
    "wrn_16_2": functools.partial(WideResNet, 16, 2),
    "wrn_40_1": functools.partial(WideResNet, 40, 1),
    "wrn_40_2": functools.partial(WideResNet, 40, 2),
    "wrn_28_10": functools.partial(WideResNet, 28, 10),
}


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, in_channels=in_channels)


def avg_pool_to(x, size):
    h, w = x.shape[2:]
    if (h, w) == tuple(size):
        return x
    return F.avg_pool2d(x, (h // size[0], w // size[1]))


class FusionModule(nn.Module):
    def __init__(self, teacher_channels, student_channels, num_classes, fused_channels=None):
        super().__init__()
        concat = teacher_channels + student_channels
        fused_channels = fused_channels or student_channels
        self.fused_channels = fused_channels
        self.depthwise = conv(concat, concat, 3, groups=concat)
        self.depthwise_bn = batch_norm(concat)
        self.pointwise = conv(concat, fused_channels, 1)
        self.pointwise_bn = batch_norm(fused_channels)
        self.classifier = nn.Linear(fused_channels, num_classes)

    def fuse(self, teacher_map, student_map):
        size = (
            min(teacher_map.shape[2], student_map.shape[2]),
            min(teacher_map.shape[3], student_map.shape[3]),
        )
        x = torch.cat([avg_pool_to(teacher_map, size), avg_pool_to(student_map, size)], dim=1)
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        return F.relu(self.pointwise_bn(self.pointwise(x)))

    def classify(self, fused_map):
        return self.classifier(fused_map.mean(dim=(2, 3)))

    def forward(self, teacher_map, student_map):
        return self.classify(self.fuse(teacher_map, student_map))


class FusedFeatureKnowledge(nn.Module):
    """Stage fusion modules before the last taught stage and each network's 1x1 adapters, as
    `ffcl_jax.models.fusion.FusedFeatureKnowledge`."""

    def __init__(self, teacher_channels, student_channels, stages, last_fused_channels, classes):
        super().__init__()
        self.last_stage = min(len(teacher_channels), len(student_channels)) - 1
        self.stages = tuple(stages)
        self.stage_fusions = nn.ModuleList()
        self.teacher_adapters = nn.ModuleList()
        self.student_adapters = nn.ModuleList()
        for stage in self.stages:
            t_ch, s_ch = teacher_channels[stage], student_channels[stage]
            if stage == self.last_stage:
                fused_ch = last_fused_channels
            else:
                self.stage_fusions.append(FusionModule(t_ch, s_ch, classes))
                fused_ch = s_ch
            self.teacher_adapters.append(conv(t_ch, fused_ch, 1))
            self.student_adapters.append(conv(s_ch, fused_ch, 1))

    def forward(self, teacher_features, student_features, last_fused_map):
        targets, stage_logits, fusions = [], [], iter(self.stage_fusions)
        for index, stage in enumerate(self.stages):
            t_map, s_map = teacher_features[stage], student_features[stage]
            if stage == self.last_stage:
                fused = last_fused_map
            else:
                fusion = next(fusions)
                fused = fusion.fuse(t_map, s_map)
                stage_logits.append(fusion.classify(fused))
            size = tuple(fused.shape[2:])
            targets.append(
                {
                    "fused": fused,
                    "teacher": self.teacher_adapters[index](avg_pool_to(t_map, size)),
                    "student": self.student_adapters[index](avg_pool_to(s_map, size)),
                }
            )
        return targets, stage_logits


def member_views(images, count: int):
    """`ffcl_jax.models.layers.member_views` for NCHW batches (views: batch x views x C x H x W)."""
    if images.dim() == 4:
        return [images] * count
    return [images[:, i] for i in range(count)]


class Cohort(nn.Module):
    """Teacher, student and (optionally) the fusion module and the fused feature knowledge; the
    same outputs as the JAX one."""

    def __init__(self, teacher, student, fusion=None, fused_knowledge=None):
        super().__init__()
        self.teacher, self.student, self.fusion = teacher, student, fusion
        self.fused_knowledge = fused_knowledge

    def forward(self, images):
        teacher_images, student_images = member_views(images, 2)
        teacher_logits, teacher_features = self.teacher(teacher_images)
        student_logits, student_features = self.student(student_images)
        out = dict(
            teacher_logits=teacher_logits,
            student_logits=student_logits,
            teacher_features=teacher_features,
            student_features=student_features,
        )
        if self.fusion is not None:
            fused_map = self.fusion.fuse(teacher_features[-1], student_features[-1])
            out["fused_logits"] = self.fusion.classify(fused_map)
            if self.fused_knowledge is not None and self.training:
                out["feature_targets"], out["stage_fused_logits"] = self.fused_knowledge(
                    teacher_features, student_features, fused_map
                )
        return out


def create_cohort(
    teacher,
    student,
    num_classes,
    in_channels=3,
    use_fusion=True,
    fused=None,
    fused_feature_stages=None,
):
    t = create_model(teacher, num_classes, in_channels)
    s = create_model(student, num_classes, in_channels)
    fusion = fused_knowledge = None
    if use_fusion:
        fusion = FusionModule(t.stage_channels[-1], s.stage_channels[-1], num_classes, fused)
    if fused_feature_stages:
        fused_knowledge = FusedFeatureKnowledge(
            t.stage_channels,
            s.stage_channels,
            sorted(fused_feature_stages),
            fusion.fused_channels,
            num_classes,
        )
    return Cohort(t, s, fusion, fused_knowledge)


class Gate(nn.Module):
    """ONE's gate: softmax(relu(BN(linear(pooled shared map))))."""

    def __init__(self, channels: int, num_branches: int):
        super().__init__()
        self.linear = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches, momentum=0.1, eps=1e-5)

    def forward(self, shared_map):
        return F.softmax(F.relu(self.bn(self.linear(shared_map.mean(dim=(2, 3))))), dim=-1)


class PeerAttention(nn.Module):
    """OKDDip's attention over the peers' pooled last-stage maps (shared bias-free query/key)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Linear(channels, max(channels // 8, 1), bias=False)
        self.key = nn.Linear(channels, max(channels // 8, 1), bias=False)

    def forward(self, peer_maps):
        pooled = torch.stack([m.mean(dim=(2, 3)) for m in peer_maps], dim=1)
        return F.softmax(self.query(pooled) @ self.key(pooled).transpose(1, 2), dim=-1)


class _RescaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times `factor` backward (CL-ILR's backprop rescaling)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class BranchCohort(nn.Module):
    """The branch methods' members and forward pass (`ffcl_jax.methods.branches`) in PyTorch:
    `student` (branch 0 with the shared trunk), `peers` (the other branches' last stages and
    heads) and ONE's `gate`."""

    def __init__(
        self,
        name,
        num_classes,
        in_channels,
        *,
        num_branches,
        branch_stages,
        gate,
        backprop_rescale,
        peer_attention=False,
        peer_ensemble=False,
    ):
        super().__init__()
        self.student = create_model(name, num_classes, in_channels)
        self.first_branch_stage = len(self.student.stages) - branch_stages
        self.peers = nn.ModuleList()
        for _ in range(num_branches - 1):
            peer = create_model(name, num_classes, in_channels)
            for module in peer.STEM_MODULES:
                setattr(peer, module, None)
            for index in range(self.first_branch_stage):
                peer.stages[index] = nn.ModuleList()
            self.peers.append(peer)
        self.gate = None
        if gate == "one":
            channels = self.student.stage_channels[self.first_branch_stage - 1]
            self.gate = Gate(channels, num_branches)
        self.attention = None
        if peer_attention:
            self.attention = PeerAttention(self.student.stage_channels[-1])
        self.peer_ensemble = None
        if peer_ensemble:
            channels = self.student.stage_channels[-1]
            self.peer_ensemble = nn.Linear(num_branches * channels, num_classes)
        self.num_branches, self.backprop_rescale = num_branches, backprop_rescale

    def _trunk(self, images):
        x = self.student.stem(images)
        shared = []
        for index in range(self.first_branch_stage):
            x = run_stage(self.student, index, x)
            shared.append(x)
        return x, shared

    def forward(self, images):
        if images.dim() == 4:
            trunks = [self._trunk(images)] * self.num_branches
        else:
            trunks = [self._trunk(view) for view in member_views(images, self.num_branches)]
        branch_logits, branch_features = [], []
        for branch, (x, shared) in zip([self.student, *self.peers], trunks, strict=True):
            y = _RescaleGradient.apply(x, 1.0 / self.num_branches) if self.backprop_rescale else x
            features = []
            for index in range(self.first_branch_stage, len(branch.stages)):
                y = run_stage(branch, index, y)
                features.append(y)
            logits, features[-1] = branch.head(y)
            branch_logits.append(logits)
            branch_features.append(shared + features)
        out = dict(
            student_logits=branch_logits[0],
            student_features=branch_features[0],
            branch_logits=branch_logits,
            branch_features=branch_features,
        )
        if self.gate is not None:
            out["gate_weights"] = self.gate(x)
        if self.attention is not None:
            out["peer_attention"] = self.attention([f[-1] for f in branch_features[1:]])
        if self.peer_ensemble is not None:
            pooled = [f[-1].mean(dim=(2, 3)) for f in branch_features]
            out["peer_ensemble_logits"] = self.peer_ensemble(torch.cat(pooled, dim=1))
        return out
