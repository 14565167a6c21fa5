"""Every FFCL loss term and the cohort objective in PyTorch, from docs/method.md ("Loss").

Each objective mirrors one method's `loss` (`ffcl_jax/torch_reference/methods.py` says which);
`settings` is the method's settings as a plain mapping, so both implementations read the same
configuration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def at_least_float32(x):
    """Half-precision logits upcast to float32; float32 and float64 (parity tests) kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_f32 = at_least_float32


def kl_to_learned_target(student_logits, target_logits, tau: float):
    """tau^2 * mean_batch sum_classes q (log q - log p), the target keeping its gradient."""
    target_log_probs = F.log_softmax(_f32(target_logits) / tau, dim=-1)
    student_log_probs = F.log_softmax(_f32(student_logits) / tau, dim=-1)
    per_example = (target_log_probs.exp() * (target_log_probs - student_log_probs)).sum(-1)
    return tau**2 * per_example.mean()


def kl_distill(student_logits, target_logits, tau: float):
    """`kl_to_learned_target` from the detached target."""
    return kl_to_learned_target(student_logits, target_logits.detach(), tau)


def attention_map(feature_map):
    energy = _f32(feature_map).pow(2).mean(dim=1).flatten(1)
    return F.normalize(energy, dim=1)


def _pool_to(x, size):
    h, w = x.shape[2:]
    return x if (h, w) == size else F.avg_pool2d(x, (h // size[0], w // size[1]))


def attention_distance(student_map, teacher_map, reduction: str = "sum"):
    size = (
        min(student_map.shape[2], teacher_map.shape[2]),
        min(student_map.shape[3], teacher_map.shape[3]),
    )
    a_s = attention_map(_pool_to(student_map, size))
    a_t = attention_map(_pool_to(teacher_map, size)).detach()
    per_example = (a_s - a_t).pow(2).sum(-1)
    if reduction == "mean":  # RepDistiller's at_loss: mean over positions
        per_example = per_example / a_s.shape[-1]
    return per_example.mean()


def fused_map_distance(adapted_map, fused_map):
    """mean_batch mean_positions ||normalize_channels(A(f)) - normalize_channels(F)||^2, the
    fused map detached."""
    target = F.normalize(_f32(fused_map.detach()), dim=1)
    difference = F.normalize(_f32(adapted_map), dim=1) - target
    return difference.pow(2).sum(1).mean(dim=(1, 2)).mean()


def virtual_teacher_target(
    labels, num_classes: int, correct_prob: float, temperature: float, dtype=torch.float32
):
    """Built in the logits' (at least float32) dtype: a float32 target would round a float64
    run's regularizer to float32 precision."""
    wrong = (1.0 - correct_prob) / (num_classes - 1)
    p_d = torch.full((labels.shape[0], num_classes), wrong, dtype=dtype, device=labels.device)
    p_d[torch.arange(labels.shape[0], device=labels.device), labels] = correct_prob
    return F.softmax(p_d / temperature, dim=-1)


def label_smoothing_target(labels, num_classes: int, epsilon: float, dtype=torch.float32):
    one_hot = F.one_hot(labels, num_classes).to(dtype)
    return one_hot * (1 - epsilon) + epsilon / num_classes


def fixed_target_kl(logits, target):
    log_probs = F.log_softmax(_f32(logits), dim=-1)
    return F.kl_div(log_probs, target.to(log_probs.dtype), reduction="batchmean")


def rampup_weight(epoch: int, rampup_epochs: float) -> float:
    if rampup_epochs <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(epoch, rampup_epochs) / rampup_epochs) ** 2)


def kd_objective(outputs, labels, s, epoch: int, num_classes: int):
    """(total, terms): `ffcl_jax.methods.kd.KD.loss`."""
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    terms = {
        "ce_student": F.cross_entropy(_f32(z_s), labels),
        "kl_teacher_to_student": kl_distill(z_s, z_t, s["tau"]),
    }
    alpha = s["kd_alpha"]
    return (1 - alpha) * terms["ce_student"] + alpha * terms["kl_teacher_to_student"], terms


def pair_objective(outputs, labels, settings, epoch: int, num_classes: int):
    """(total, terms): `ffcl_jax.methods.pair.PairMethod.loss`."""
    s = settings
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    z_f = outputs.get("fused_logits")
    tau = s["tau"]
    terms = {
        "ce_teacher": F.cross_entropy(_f32(z_t), labels),
        "ce_student": F.cross_entropy(_f32(z_s), labels),
    }
    if s["use_fusion"]:
        terms["ce_fused"] = F.cross_entropy(_f32(z_f), labels)
    if outputs.get("stage_fused_logits"):
        terms["ce_stage_fused"] = sum(
            F.cross_entropy(_f32(z), labels) for z in outputs["stage_fused_logits"]
        )
    supervised = sum(terms.values())
    distill = torch.zeros(())
    if s["lam_fuse"]:
        terms["kl_fused_to_peers"] = kl_distill(z_t, z_f, tau) + kl_distill(z_s, z_f, tau)
        distill = distill + s["lam_fuse"] * terms["kl_fused_to_peers"]
    if s["lam_ens"]:
        ensemble = (_f32(z_t) + _f32(z_s)) / 2
        terms["kl_ensemble_to_fused"] = kl_distill(z_f, ensemble, tau)
        distill = distill + s["lam_ens"] * terms["kl_ensemble_to_fused"]
    if s["lam_mutual"]:
        terms["kl_mutual"] = kl_distill(z_s, z_t, tau) + kl_distill(z_t, z_s, tau)
        distill = distill + s["lam_mutual"] * terms["kl_mutual"]
    if s["lam_feat"]:
        feat = torch.zeros(())
        if s["feat_form"] == "attention":
            f_s, f_t = outputs["student_features"], outputs["teacher_features"]
            stages = s["feat_stages"]
            if stages is None:
                stages = range(min(len(f_s), len(f_t)))
            reduction = s["attention_reduction"]
            for stage in stages:
                feat = feat + attention_distance(f_s[stage], f_t[stage], reduction)
                if s["feat_direction"] == "mutual":
                    feat = feat + attention_distance(f_t[stage], f_s[stage], reduction)
        else:
            for maps in outputs["feature_targets"]:
                feat = feat + fused_map_distance(maps["teacher"], maps["fused"])
                feat = feat + fused_map_distance(maps["student"], maps["fused"])
        terms["feat"] = feat
        distill = distill + s["lam_feat"] * feat
    regularization = torch.zeros(())
    if s["lam_reg"] and s["regularizer"] != "none":
        dtype = _f32(z_t).dtype
        if s["regularizer"] == "virtual_teacher":
            target = virtual_teacher_target(
                labels, num_classes, s["reg_correct_prob"], s["reg_temperature"], dtype
            )
        else:
            target = label_smoothing_target(labels, num_classes, s["label_smoothing"], dtype)
        reg_logits = [z_t, z_s] + ([z_f] if s["use_fusion"] else [])
        terms["reg"] = sum(fixed_target_kl(z, target) for z in reg_logits)
        regularization = s["lam_reg"] * terms["reg"]
    ramp = rampup_weight(epoch, s["rampup_epochs"])
    total = supervised + ramp * distill + regularization
    terms["rampup_weight"] = torch.tensor(ramp, dtype=total.dtype)
    return total, terms


def min_logit_ensemble(member_logits, labels):
    """KDCL's MinLogit: each member's logits less its true-class logit, then the minimum."""
    stacked = torch.stack([_f32(z) for z in member_logits])
    true_class = stacked.gather(-1, labels[None, :, None].expand(len(member_logits), -1, 1))
    return (stacked - true_class).min(dim=0).values


def collaborative_objective(outputs, labels, s, epoch: int, num_classes: int = 0):
    """(total, terms): `ffcl_jax.methods.kdcl.KDCL.loss`."""
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    if s["collaborative_target"] == "min_logit":
        target = min_logit_ensemble([z_t, z_s], labels)
    else:
        target = (_f32(z_t) + _f32(z_s)) / 2
    tau, alpha = s["tau"], s["kd_alpha"]
    terms = {
        "ce_teacher": F.cross_entropy(_f32(z_t), labels),
        "ce_student": F.cross_entropy(_f32(z_s), labels),
        "kl_collaborative": kl_distill(z_t, target, tau) + kl_distill(z_s, target, tau),
    }
    ramp = rampup_weight(epoch, s["rampup_epochs"])
    total = (1 - alpha) * (terms["ce_teacher"] + terms["ce_student"]) + alpha * ramp * terms[
        "kl_collaborative"
    ]
    terms["rampup_weight"] = torch.tensor(ramp, dtype=total.dtype)
    return total, terms


def branch_ensemble(branch_logits, gate_weights=None):
    stacked = torch.stack([_f32(z) for z in branch_logits], dim=1)
    if gate_weights is None:
        return stacked.mean(dim=1)
    return (_f32(gate_weights).unsqueeze(-1) * stacked).sum(dim=1)


def branch_objective(outputs, labels, s, epoch: int, num_classes: int = 0):
    """(total, terms): `ffcl_jax.methods.branches.BranchMethod.loss` (ONE, CL-ILR, OKDDip) and
    PCL's."""
    z = outputs["branch_logits"]
    ensemble = outputs.get("peer_ensemble_logits")
    if ensemble is None:
        ensemble = branch_ensemble(z, outputs.get("gate_weights"))
    terms = {"ce_branches": sum(F.cross_entropy(_f32(zi), labels) for zi in z)}
    total = terms["ce_branches"]
    if s["lam_ensemble_ce"]:
        terms["ce_ensemble"] = F.cross_entropy(ensemble, labels)
        total = total + s["lam_ensemble_ce"] * terms["ce_ensemble"]
    ramp = rampup_weight(epoch, s["rampup_epochs"])
    if s["lam_branch_kd"]:
        tau = s["tau"]
        stop = s.get("stop_target_gradient", True)
        to_target = kl_distill if stop else kl_to_learned_target
        if s["branch_target"] == "attention":  # OKDDip: branch 0 leads the peers
            peers = torch.stack([_f32(zi).detach() if stop else _f32(zi) for zi in z[1:]], 1)
            mixes = outputs["peer_attention"] @ peers  # batch, peers, classes
            kl = sum(kl_to_learned_target(zi, mixes[:, a], tau) for a, zi in enumerate(z[1:]))
            kl = kl + to_target(z[0], branch_ensemble(z[1:]), tau)
        else:
            if s["branch_target"] == "others":
                whole = sum(_f32(zi) for zi in z)
                targets = [(whole - _f32(zi)) / (len(z) - 1) for zi in z]
            else:
                targets = [ensemble] * len(z)
            kl = sum(to_target(zi, t, tau) for zi, t in zip(z, targets, strict=True))
        terms["kl_to_branches"] = kl
        total = total + ramp * s["lam_branch_kd"] * terms["kl_to_branches"]
    if s.get("lam_temporal_kd"):  # PCL: each branch from the other branches' temporal means
        means = outputs["mean_branch_logits"]
        terms["kl_temporal_mean"] = sum(
            sum(kl_distill(zi, means[j], s["tau"]) for j in range(len(z)) if j != i) / (len(z) - 1)
            for i, zi in enumerate(z)
        )
        total = total + ramp * s["lam_temporal_kd"] * terms["kl_temporal_mean"]
    terms["rampup_weight"] = torch.tensor(ramp, dtype=total.dtype)
    return total, terms
