"""Hinton KD: a student distils from a trained teacher, which is loaded and frozen.

    L = (1 - a) CE(z_S) + a KL_tau(z_S <- z_T)

The teacher comes from `config.teacher_checkpoint` (a finished run's workdir or an exported
.npz); it runs in inference mode and gets no update.
"""

from __future__ import annotations

import dataclasses

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.pair import TeacherStudent, check_kd_alpha, check_tau_and_rampup, pair_forward


@dataclasses.dataclass(frozen=True)
class KDSettings:
    tau: float = 4.0
    kd_alpha: float = 0.9  # (1 - a) CE(S) + a KL_tau(S <- T)
    # KD has no ramp-up; the key is accepted because protocols set it for every method.
    rampup_epochs: float = 0.0


class KD(TeacherStudent):
    Settings = KDSettings
    PRESETS = {"kd": {}}
    frozen_members = ("teacher",)

    def validate(self) -> None:
        check_tau_and_rampup(self.settings)
        check_kd_alpha(self.settings)

    def check_config(self, config) -> None:
        if not config.teacher_checkpoint:
            raise UserError(
                f"method {self.name!r} distils from a trained teacher: set "
                "--config.teacher_checkpoint to the workdir of a finished run with the same "
                "teacher (for example an 'independent' run) or to an exported .npz"
            )

    def initial_state(self, state, config):
        from ffcl_jax import export

        state, source = export.with_loaded_member(state, config, "teacher")
        return state, f"frozen teacher loaded from {source}"

    def forward(self, cohort, images, *, train):
        return pair_forward(cohort, images, train=train, train_teacher=False)

    def loss(self, outputs, labels, epoch, num_classes):
        z_s = outputs["student_logits"]
        terms = {
            "ce_student": losses.cross_entropy(z_s, labels),
            "kl_teacher_to_student": losses.kl_distill(
                z_s, outputs["teacher_logits"], self.settings.tau
            ),
        }
        alpha = self.settings.kd_alpha
        total = (1 - alpha) * terms["ce_student"] + alpha * terms["kl_teacher_to_student"]
        return total, terms
