"""FFSD in PyTorch (`ffcl_jax.methods.ffsd`): its cohort (the two students, the leader named
`student`, the fusion module on their detached last maps, the leader's trans-fusion head, the
peer's and the leader's decoders) and its objective, NCHW, written from the authors' code
(docs/baseline_sources/ffsd.md) rather than from the JAX module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffcl_jax.torch_reference.losses import at_least_float32, kl_distill, rampup_weight
from ffcl_jax.torch_reference.models import FusionModule, batch_norm, conv, create_model

_f = at_least_float32


class BiasedRunningVariance(nn.BatchNorm2d):
    """BatchNorm whose running variance averages the biased batch variance, as Flax's does
    (PyTorch's the unbiased one: a factor n/(n-1), n = batch x positions). The decoders' running
    statistics make targets within training (inference mode before their own update), so the
    mirror keeps JAX's to compare them exactly."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
            self.num_batches_tracked += 1
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_ch, out_ch, 3, 2, padding=1, output_padding=1, bias=False)
        self.bn = BiasedRunningVariance(out_ch, momentum=0.1, eps=1e-5)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Decoder(nn.Module):
    def __init__(self, stage_channels):
        super().__init__()
        channels = list(reversed(stage_channels))
        self.blocks = nn.ModuleList(
            DecoderBlock(a, b) for a, b in zip(channels, channels[1:], strict=False)
        )

    def forward(self, x):
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]  # shallowest stage first


class TransFusion(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.depthwise = conv(channels, channels, 3, groups=channels)
        self.depthwise_bn = batch_norm(channels)
        self.pointwise = conv(channels, out_channels, 1)
        self.pointwise_bn = batch_norm(out_channels)

    def forward(self, x):
        x = F.relu(self.depthwise_bn(self.depthwise(x)))
        return F.relu(self.pointwise_bn(self.pointwise(x)))


def attention(f):
    return _f(f).pow(2).mean(1).flatten(1)


def mirrored_attention(a, fraction: float):
    """(norm, normalised a, its diversity target), as `diversity_target` / `diversity_loss`."""
    norm = a.norm(dim=1, keepdim=True)
    a = F.normalize(a)
    threshold = a.topk(int(a.shape[1] * fraction), largest=False)[0][:, -1:]
    return norm, a, (norm / 2 - a) * torch.sign(a - threshold) + norm / 2


def diversity_target(f, fraction: float):
    f = _f(f).detach()
    norm, a, target = mirrored_attention(attention(f), fraction)
    return f + ((target - a) * norm / f.shape[1]).view(f.shape[0], 1, *f.shape[2:])


def diversity(peer_map, other_map, fraction: float):
    _, _, target = mirrored_attention(attention(other_map.detach()), fraction)
    return (F.normalize(attention(peer_map)) - target).pow(2).mean()


def at_distance(x, y):
    return (F.normalize(attention(x)) - F.normalize(attention(y.detach()))).pow(2).mean()


def map_distance(x, y):
    x, y = _f(x).flatten(1), _f(y).detach().flatten(1)
    return (F.normalize(x) - F.normalize(y)).pow(2).mean()


class FFSDCohort(nn.Module):
    def __init__(self, teacher, student, num_classes, in_channels):
        super().__init__()
        self.teacher = create_model(teacher, num_classes, in_channels)
        self.peer = create_model(student, num_classes, in_channels)
        self.student = create_model(student, num_classes, in_channels)
        t, p, s = (m.stage_channels for m in (self.teacher, self.peer, self.student))
        self.fusion = FusionModule(t[-1], p[-1], num_classes, s[-1])
        self.trans_fusion = TransFusion(s[-1], t[-1] + p[-1])
        self.decoder_peer = Decoder(p)
        self.decoder_student = Decoder(s)
        self.fraction = 1 / 3

    def forward(self, images):
        out = {}
        for name in ("teacher", "peer", "student"):
            out[f"{name}_logits"], out[f"{name}_features"] = getattr(self, name)(images)
        last = [out["teacher_features"][-1].detach(), out["peer_features"][-1].detach()]
        fused_map = self.fusion.fuse(*last)
        out["fused_logits"] = self.fusion.classify(fused_map)
        if not self.training:
            return out
        out["trans_fusion_map"] = self.trans_fusion(out["student_features"][-1])
        out["fusion_input"] = torch.cat(last, dim=1)
        out["fused_map"] = fused_map.detach()
        for decoder in (self.decoder_peer, self.decoder_student):
            decoder.eval()
        with torch.no_grad():
            target = diversity_target(out["teacher_features"][-1], self.fraction)
            out["peer_sd_targets"] = self.decoder_peer(target)
            out["student_sd_targets"] = self.decoder_student(fused_map.detach())
        for member, network in (("decoder_peer", "peer"), ("decoder_student", "student")):
            decoder = getattr(self, member)
            decoder.train()
            out[f"{member}_maps"] = decoder(out[f"{network}_features"][-1].detach())
        return out


def build(config, method, info):
    cohort = FFSDCohort(config.teacher, config.student, info.num_classes, info.image_shape[-1])
    cohort.fraction = method.settings.diversity_fraction
    return cohort


def evaluated(out, mean_out=None) -> dict:
    """The leader (`student`), the two students, their mean logits and the fusion module."""
    return {
        "student": out["student_logits"],
        "teacher": out["teacher_logits"],
        "peer": out["peer_logits"],
        "ensemble": (out["teacher_logits"] + out["peer_logits"]) / 2,
        "fused": out["fused_logits"],
    }


def objective(outputs, labels, s, epoch, num_classes):
    z = {n: outputs[f"{n}_logits"] for n in ("teacher", "peer", "student", "fused")}
    f = {n: outputs[f"{n}_features"] for n in ("teacher", "peer", "student")}
    tau = s["tau"]
    terms = {f"ce_{n}": F.cross_entropy(_f(z[n]), labels) for n in z}
    terms["kl_teacher"] = kl_distill(z["teacher"], z["peer"], tau)
    terms["kl_peer"] = kl_distill(z["peer"], z["teacher"], tau)
    terms["kl_fused"] = kl_distill(z["fused"], (_f(z["teacher"]) + _f(z["peer"])) / 2, tau)
    terms["kl_student"] = kl_distill(z["student"], z["fused"], tau)
    total = sum(terms.values())

    def sd(features, targets):
        return sum(at_distance(a, b) for a, b in zip(features[:-1], targets, strict=True))

    def decoder_loss(features, decoded):
        return sum(
            map_distance(d, a) + at_distance(d, a)
            for a, d in zip(features[:-1], decoded, strict=True)
        )

    groups = [
        (
            s["lam_diversity"],
            {
                "diversity": diversity(f["peer"][-1], f["teacher"][-1], s["diversity_fraction"]),
                "sd_peer": sd(f["peer"], outputs["peer_sd_targets"]),
            },
        ),
        (
            s["lam_fusion"],
            {
                "at_fused_map": at_distance(f["student"][-1], outputs["fused_map"]),
                "at_trans_fusion": at_distance(
                    outputs["trans_fusion_map"], outputs["fusion_input"]
                ),
                "sd_student": sd(f["student"], outputs["student_sd_targets"]),
            },
        ),
        (
            s["lam_self_distillation"],
            {
                "decoder_peer": decoder_loss(f["peer"], outputs["decoder_peer_maps"]),
                "decoder_student": decoder_loss(f["student"], outputs["decoder_student_maps"]),
            },
        ),
    ]
    ramp = rampup_weight(epoch + s["rampup_epoch_offset"], s["rampup_epochs"])
    terms["rampup_weight"] = torch.tensor(ramp, dtype=torch.float32)
    for weight, group in groups:
        terms.update(group)
        total = total + ramp * weight * sum(group.values())
    return total, terms
