"""KDCL (Guo et al. 2020), as its public re-implementation: teacher and student, each on its
own augmentation of the batch, distil from their ensemble (stopped):

    L = (1 - a) (CE(z_T) + CE(z_S)) + a w(epoch) (KL_tau(z_T <- sg(t)) + KL_tau(z_S <- sg(t)))

with t the mean of the two networks' logits, or (`collaborative_target='min_logit'`) the paper's
MinLogit; 0.5 CE + 0.5 KL at tau 4, no ramp-up.
"""

from __future__ import annotations

import dataclasses

from ffcl_jax import losses
from ffcl_jax.methods.pair import (
    TeacherStudent,
    check_choice,
    check_kd_alpha,
    check_tau_and_rampup,
    pair_forward,
)

COLLABORATIVE_TARGETS = ("mean", "min_logit")


@dataclasses.dataclass(frozen=True)
class KDCLSettings:
    tau: float = 4.0
    rampup_epochs: float = 0.0
    kd_alpha: float = 0.5  # (1 - a) CE + a KL_tau, for both networks
    collaborative_target: str = "mean"  # one of COLLABORATIVE_TARGETS
    separate_views: bool = True  # each network trains on its own augmentation of the batch


class KDCL(TeacherStudent):
    Settings = KDCLSettings
    PRESETS = {"kdcl": {}}

    def validate(self) -> None:
        s = self.settings
        check_tau_and_rampup(s)
        check_kd_alpha(s)
        check_choice("collaborative_target", s.collaborative_target, COLLABORATIVE_TARGETS)

    @property
    def num_views(self) -> int:
        return 2 if self.settings.separate_views else 1

    def forward(self, cohort, images, *, train):
        return pair_forward(cohort, images, train=train)

    def loss(self, outputs, labels, epoch, num_classes):
        s = self.settings
        z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
        if s.collaborative_target == "min_logit":
            target = losses.min_logit_ensemble([z_t, z_s], labels)
        else:
            target = losses.ensemble_logits(z_t, z_s)
        terms = {
            "ce_teacher": losses.cross_entropy(z_t, labels),
            "ce_student": losses.cross_entropy(z_s, labels),
            "kl_collaborative": losses.kl_distill(z_t, target, s.tau)
            + losses.kl_distill(z_s, target, s.tau),
        }
        ramp = losses.rampup_weight(epoch, s.rampup_epochs)
        alpha = s.kd_alpha
        total = (1 - alpha) * (terms["ce_teacher"] + terms["ce_student"]) + alpha * ramp * terms[
            "kl_collaborative"
        ]
        terms["rampup_weight"] = ramp
        return total, terms
