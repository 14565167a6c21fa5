"""The objectives the presets of `ffcl_jax.methods` configure: FFCL and the pair methods
(`cohort_objective`), KDCL's (`collaborative_objective`), the branch methods'
(`branch_objective`), and which models a run evaluates (`evaluated_logits`).

Every function takes the resolved `LossSettings`; terms whose weight is zero are not traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ffcl_jax import losses
from ffcl_jax.methods import LossSettings, taught_stages


def cohort_objective(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    settings: LossSettings,
    epoch: jax.Array,
    num_classes: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss L of docs/method.md and each unweighted term, for logging.

    `outputs` is what `Cohort.__call__` returns. Terms with zero weight are skipped at trace time.
    """
    if settings.branch_method:
        return branch_objective(outputs, labels, settings, epoch)
    if settings.collaborative_target != "none":
        return collaborative_objective(outputs, labels, settings, epoch)
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    z_f = outputs.get("fused_logits")
    tau = settings.tau
    if not settings.train_teacher:  # kd: the frozen teacher only provides targets
        terms = {
            "ce_student": losses.cross_entropy(z_s, labels),
            "kl_teacher_to_student": losses.kl_distill(z_s, z_t, tau),
        }
        alpha = settings.kd_alpha
        total = (1 - alpha) * terms["ce_student"] + alpha * terms["kl_teacher_to_student"]
        return total, terms
    terms: dict[str, jax.Array] = {
        "ce_teacher": losses.cross_entropy(z_t, labels),
        "ce_student": losses.cross_entropy(z_s, labels),
    }
    if settings.use_fusion:
        terms["ce_fused"] = losses.cross_entropy(z_f, labels)
    if outputs.get("stage_fused_logits"):  # feat_form="stage_fusion": trains its fusion modules
        terms["ce_stage_fused"] = sum(
            losses.cross_entropy(z, labels) for z in outputs["stage_fused_logits"]
        )
    supervised = sum(terms.values())

    ramp = losses.rampup_weight(epoch, settings.rampup_epochs)
    distill = jnp.zeros((), jnp.float32)
    if settings.lam_fuse:
        terms["kl_fused_to_peers"] = losses.kl_distill(z_t, z_f, tau) + losses.kl_distill(
            z_s, z_f, tau
        )
        distill += settings.lam_fuse * terms["kl_fused_to_peers"]
    if settings.lam_ens:
        terms["kl_ensemble_to_fused"] = losses.kl_distill(
            z_f, losses.ensemble_logits(z_t, z_s), tau
        )
        distill += settings.lam_ens * terms["kl_ensemble_to_fused"]
    if settings.lam_mutual:
        terms["kl_mutual"] = losses.kl_distill(z_s, z_t, tau) + losses.kl_distill(z_t, z_s, tau)
        distill += settings.lam_mutual * terms["kl_mutual"]
    if settings.lam_feat:
        if settings.feat_form == "attention":
            student_features = outputs["student_features"]
            num_stages = min(len(student_features), len(outputs["teacher_features"]))
            terms["feat"] = losses.attention_transfer(
                student_features,
                outputs["teacher_features"],
                taught_stages(settings, num_stages),
                settings.feat_direction,
                settings.attention_reduction,
            )
        else:
            terms["feat"] = losses.fused_map_transfer(outputs["feature_targets"])
        distill += settings.lam_feat * terms["feat"]

    regularization = jnp.zeros((), jnp.float32)
    if settings.lam_reg and settings.regularizer != "none":
        if settings.regularizer == "virtual_teacher":
            target = losses.virtual_teacher_target(
                labels, num_classes, settings.reg_correct_prob, settings.reg_temperature
            )
        else:
            target = losses.label_smoothing_target(labels, num_classes, settings.label_smoothing)
        reg_logits = [z_t, z_s] + ([z_f] if settings.use_fusion else [])
        terms["reg"] = sum(losses.fixed_target_kl(z, target) for z in reg_logits)
        regularization = settings.lam_reg * terms["reg"]

    total = supervised + ramp * distill + regularization
    terms["rampup_weight"] = ramp
    return total, terms


def branch_objective(
    outputs: Mapping[str, Any], labels: jax.Array, settings: LossSettings, epoch: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The branch methods' loss (docs/method.md, "Branch baselines"), over what
    `BranchCohort.__call__` returns:

        L = sum_i CE(z_i) + lam_ensemble_ce CE(z_ens)
            + w(epoch) lam_branch_kd sum_i KL_tau(z_i <- t_i)

            + w(epoch) lam_temporal_kd sum_i mean_{j != i} KL_tau(z_i <- z~_j)

    with t_i = z_ens (ONE: the gated ensemble; PCL: the peer-ensemble classifier), the mean of
    the other branches (CL-ILR), or OKDDip's (`_branch_distillation`); the branches' logits in a
    target receive no gradient from the KL terms. z~_j is branch j of PCL's temporal mean.
    """
    branch_logits = outputs["branch_logits"]
    ensemble = branch_ensemble_logits(outputs)
    terms = {"ce_branches": sum(losses.cross_entropy(z, labels) for z in branch_logits)}
    total = terms["ce_branches"]
    if settings.lam_ensemble_ce:
        terms["ce_ensemble"] = losses.cross_entropy(ensemble, labels)
        total = total + settings.lam_ensemble_ce * terms["ce_ensemble"]
    ramp = losses.rampup_weight(epoch, settings.rampup_epochs)
    if settings.lam_branch_kd:
        terms["kl_to_branches"] = _branch_distillation(outputs, ensemble, settings)
        total = total + ramp * settings.lam_branch_kd * terms["kl_to_branches"]
    if settings.lam_temporal_kd:
        terms["kl_temporal_mean"] = losses.peer_mean_distillation(
            branch_logits, outputs["mean_branch_logits"], settings.tau
        )
        total = total + ramp * settings.lam_temporal_kd * terms["kl_temporal_mean"]
    terms["rampup_weight"] = ramp
    return total, terms


def branch_ensemble_logits(outputs: Mapping[str, Any]) -> jax.Array:
    """A branch method's ensemble: PCL's peer-ensemble classifier where there is one, else the
    branches' (gated) mean."""
    if "peer_ensemble_logits" in outputs:
        return outputs["peer_ensemble_logits"]
    return losses.branch_ensemble(outputs["branch_logits"], outputs.get("gate_weights"))


def collaborative_objective(
    outputs: Mapping[str, Any], labels: jax.Array, settings: LossSettings, epoch: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KDCL's loss over the pair (docs/method.md, "KDCL and PCL"), each network on its own view:

        L = (1 - a) (CE(z_T) + CE(z_S)) + a w(epoch) (KL_tau(z_T <- sg(t)) + KL_tau(z_S <- sg(t)))

    with a = `kd_alpha` and t the pair's ensemble by `collaborative_target`: the mean of the
    logits, or KDCL's MinLogit.
    """
    z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
    if settings.collaborative_target == "min_logit":
        target = losses.min_logit_ensemble([z_t, z_s], labels)
    else:
        target = losses.ensemble_logits(z_t, z_s)
    terms = {
        "ce_teacher": losses.cross_entropy(z_t, labels),
        "ce_student": losses.cross_entropy(z_s, labels),
        "kl_collaborative": losses.kl_distill(z_t, target, settings.tau)
        + losses.kl_distill(z_s, target, settings.tau),
    }
    ramp = losses.rampup_weight(epoch, settings.rampup_epochs)
    alpha = settings.kd_alpha
    total = (1 - alpha) * (terms["ce_teacher"] + terms["ce_student"]) + alpha * ramp * terms[
        "kl_collaborative"
    ]
    terms["rampup_weight"] = ramp
    return total, terms


def evaluated_logits(
    outputs: Mapping[str, Any], mean_outputs: Mapping[str, Any] | None = None
) -> dict[str, jax.Array]:
    """The models a run evaluates, by name (report.MODEL_ORDER), from the cohort's outputs: the
    student; the teacher and the T+S ensemble; the fused classifier; a branch method's other
    branches (`branch_1`, ...) and the branches' ensemble.

    With PCL's temporal mean (`mean_outputs`, its outputs), the student and the branches are the
    temporal mean's (what PCL deploys), the online student is `online_student`, and the ensemble
    is the online peer-ensemble classifier."""
    if mean_outputs is not None:
        logits = evaluated_logits(mean_outputs)
        logits["ensemble"] = branch_ensemble_logits(outputs)
        logits["online_student"] = outputs["student_logits"]
        return logits
    logits = {"student": outputs["student_logits"]}
    if "teacher_logits" in outputs:
        logits["teacher"] = outputs["teacher_logits"]
        logits["ensemble"] = losses.ensemble_logits(
            outputs["teacher_logits"], outputs["student_logits"]
        )
    if "fused_logits" in outputs:
        logits["fused"] = outputs["fused_logits"]
    if "branch_logits" in outputs:
        for index, z in enumerate(outputs["branch_logits"][1:], start=1):
            logits[f"branch_{index}"] = z
        logits["ensemble"] = branch_ensemble_logits(outputs)
    return logits


def _branch_distillation(outputs, ensemble: jax.Array, settings: LossSettings) -> jax.Array:
    """sum_i KL_tau(z_i <- t_i) for the settings' `branch_target`."""
    branch_logits, tau = outputs["branch_logits"], settings.tau
    if settings.branch_target == "attention":  # OKDDip: branch 0 leads the peers 1..m-1
        leader, peers = branch_logits[0], branch_logits[1:]
        targets = losses.attention_targets(peers, outputs["peer_attention"])
        peer_terms = sum(
            losses.kl_to_learned_target(z, t, tau) for z, t in zip(peers, targets, strict=True)
        )
        return peer_terms + losses.kl_distill(leader, losses.branch_ensemble(peers), tau)
    if settings.branch_target == "others":
        targets = losses.mean_of_others(branch_logits)
    else:
        targets = [ensemble] * len(branch_logits)
    pairs = zip(branch_logits, targets, strict=True)
    return sum(losses.kl_distill(z, t, tau) for z, t in pairs)
