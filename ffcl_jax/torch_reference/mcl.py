"""`ffcl_jax.methods.mcl` in PyTorch: the two networks with their embedding heads, and MCL's
objective over the reference's outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffcl_jax.torch_reference import models
from ffcl_jax.torch_reference.losses import at_least_float32, kl_distill, rampup_weight

NETWORKS = ("teacher", "student")


class EmbeddingHead(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_features, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, last_stage_map):
        x = at_least_float32(self.out(F.relu(self.hidden(last_stage_map.mean(dim=(2, 3))))))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


class MCLCohort(nn.Module):
    """Teacher and student, and an embedding head on each one's pooled last-stage map."""

    def __init__(self, teacher, student, embed_dim: int):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.teacher_embed = EmbeddingHead(teacher.stage_channels[-1], embed_dim)
        self.student_embed = EmbeddingHead(student.stage_channels[-1], embed_dim)

    def forward(self, images):
        teacher_images, student_images = models.member_views(images, 2)
        out = {}
        for name, x in zip(NETWORKS, (teacher_images, student_images), strict=True):
            out[f"{name}_logits"], out[f"{name}_features"] = getattr(self, name)(x)
        if self.training:
            out["embeddings"] = {
                name: getattr(self, f"{name}_embed")(out[f"{name}_features"][-1])
                for name in NETWORKS
            }
        return out


def build(config, method, info):
    channels = info.image_shape[-1]
    return MCLCohort(
        models.create_model(config.teacher, info.num_classes, channels),
        models.create_model(config.student, info.num_classes, channels),
        method.settings.embed_dim,
    )


def supervised_contrast(similarity, labels):
    n = similarity.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    positives = ((labels[:, None] == labels[None, :]) & ~eye).to(similarity.dtype)
    log_prob = similarity - similarity.masked_fill(eye, float("-inf")).logsumexp(1, keepdim=True)
    count = positives.sum(1)
    has_positive = (count > 0).to(similarity.dtype)
    per_anchor = (positives * log_prob).sum(1) / count.clamp(min=1.0)
    return -(per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1.0)


def objective(outputs, labels, s, epoch, num_classes):
    e_t, e_s = outputs["embeddings"]["teacher"], outputs["embeddings"]["student"]
    tau_c, tau = s["contrast_tau"], s["tau"]
    # The four matrices as the authors' code forms them (S_ST by its own product).
    s_tt, s_ss = e_t @ e_t.T / tau_c, e_s @ e_s.T / tau_c
    s_ts, s_st = e_t @ e_s.T / tau_c, e_s @ e_t.T / tau_c
    terms = {
        "ce_teacher": F.cross_entropy(at_least_float32(outputs["teacher_logits"]), labels),
        "ce_student": F.cross_entropy(at_least_float32(outputs["student_logits"]), labels),
    }
    contrast = {}
    if s["lam_vcl"]:
        contrast["vcl"] = supervised_contrast(s_tt, labels) + supervised_contrast(s_ss, labels)
    if s["lam_soft_vcl"]:
        contrast["soft_vcl"] = kl_distill(s_tt, s_ss, tau) + kl_distill(s_ss, s_tt, tau)
    if s["lam_icl"]:
        contrast["icl"] = supervised_contrast(s_ts, labels) + supervised_contrast(s_st, labels)
    if s["lam_soft_icl"]:
        contrast["soft_icl"] = kl_distill(s_ts, s_st, tau) + kl_distill(s_st, s_ts, tau)
    weighted = sum(s[f"lam_{k}"] * v for k, v in contrast.items())
    ramp = rampup_weight(epoch, s["rampup_epochs"])
    total = terms["ce_teacher"] + terms["ce_student"] + ramp * weighted
    terms.update(contrast)
    terms["rampup_weight"] = torch.tensor(ramp, dtype=total.dtype)
    return total, terms
