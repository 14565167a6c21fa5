"""SwitOKD (`ffcl_jax.methods.switokd`) in PyTorch: the objective and the switch, as the
authors' code computes them (docs/baseline_sources/switokd.md): batch-mean L1 distances of the
detached softmaxes, compared on the host, and the teacher's update dropped in expert mode
(`methods.pause_members` sets its gradients to None, so `torch.optim.SGD` skips it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ffcl_jax.torch_reference.losses import at_least_float32, kl_distill


def _probabilities(logits, tau: float):
    return F.softmax(at_least_float32(logits).detach() / tau, dim=-1)


def objective(outputs, labels, s, epoch: int, num_classes: int = 0):
    """(total, terms): `SwitOKD.loss`: both networks' CE and KL, and the switch's quantities."""
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    p_t, p_s = _probabilities(z_t, s["switch_tau"]), _probabilities(z_s, s["switch_tau"])
    onehot = F.one_hot(labels, p_s.shape[-1]).to(p_s.dtype)
    d_s = (p_s - onehot).abs().sum(-1).mean()
    d_t = (p_t - onehot).abs().sum(-1).mean()
    terms = {
        "ce_teacher": F.cross_entropy(at_least_float32(z_t), labels),
        "ce_student": F.cross_entropy(at_least_float32(z_s), labels),
        "kl_student_to_teacher": kl_distill(z_t, z_s, s["tau"]),
        "kl_teacher_to_student": kl_distill(z_s, z_t, s["tau"]),
        "switch_gap": (p_t - p_s).abs().sum(-1).mean(),
        "switch_student_l1": d_s,
        "switch_teacher_l1": d_t,
        "switch_threshold": d_s - torch.exp(-d_t / (d_t + d_s)) * d_t,
    }
    total = (terms["ce_teacher"] + terms["ce_student"]) + (
        terms["kl_student_to_teacher"] + terms["kl_teacher_to_student"]
    )
    return total, terms


def member_updates(terms, s) -> dict[str, bool]:
    """Expert mode (the teacher paused) iff G > delta and, with `require_teacher_ahead`, the
    teacher is closer to the labels than the student."""
    d_s, d_t = float(terms["switch_student_l1"]), float(terms["switch_teacher_l1"])
    delta = d_s - math.exp(-d_t / (d_t + d_s)) * d_t
    expert = float(terms["switch_gap"]) > delta
    if s["require_teacher_ahead"]:
        expert = expert and d_t < d_s
    return {"teacher": not expert}
