"""A teacher and a student trained together: independent, DML, FFL and FFCL (docs/method.md).

One module for the four because they are one objective with other weights: FFCL is

    L = CE(z_T) + CE(z_S) + CE(z_F) [+ CE of the stage fusion modules]
        + w(epoch) (lam_fuse KL(z_T, z_S <- z_F) + lam_ens KL(z_F <- z_E)
                    + lam_mutual KL(z_S <-> z_T) + lam_feat feature knowledge)
        + lam_reg regularizer,

FFL sets lam_mutual, lam_feat and lam_reg to 0, DML keeps only lam_mutual without the fusion
module, and independent training keeps the cross-entropies alone. Any setting can be changed
from the command line (`--config.loss.lam_feat=0` is FFCL without feature terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.base import Method
from ffcl_jax.models import NUM_STAGES, create_model
from ffcl_jax.models.fusion import FusedFeatureKnowledge, FusionModule
from ffcl_jax.models.layers import member_views

REGULARIZERS = ("virtual_teacher", "label_smoothing", "none")
FEATURE_DIRECTIONS = ("teacher_to_student", "mutual")
# The feature-based knowledge weighted by lam_feat (docs/method.md, "Feature knowledge"):
# attention transfer between the networks, the last-stage fused map teaching both networks
# through adapters, or a fusion module at every stage whose map teaches both at that stage.
FEATURE_FORMS = ("attention", "fused_map", "stage_fusion")


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """The pair's objective; the defaults are FFCL's."""

    use_fusion: bool = True  # the fusion module and its classifier
    lam_fuse: float = 1.0  # KL(z_T <- z_F) + KL(z_S <- z_F): the fused classifier teaches both
    lam_ens: float = 1.0  # KL(z_F <- z_E): the T+S ensemble teaches the fused classifier
    lam_mutual: float = 1.0  # KL(z_S <- z_T) + KL(z_T <- z_S): peers teach each other
    lam_feat: float = 1.0  # feature knowledge (feat_form) at the listed stages
    lam_reg: float = 1.0  # network regularization (the "positive knowledge")
    tau: float = 3.0
    rampup_epochs: float = 80.0  # w(epoch) = exp(-5 (1 - epoch/R)^2), evaluated per epoch
    feat_stages: tuple[int, ...] | None = None  # None: every stage
    feat_form: str = "attention"  # one of FEATURE_FORMS
    feat_direction: str = "teacher_to_student"  # attention only
    attention_reduction: str = "sum"  # attention only: "sum" or "mean" over a stage's positions
    regularizer: str = "virtual_teacher"  # one of REGULARIZERS
    reg_correct_prob: float = 0.99
    reg_temperature: float = 20.0
    label_smoothing: float = 0.1


_NO_DISTILLATION = dict(lam_fuse=0.0, lam_ens=0.0, lam_mutual=0.0, lam_feat=0.0, lam_reg=0.0)
_OFF = dict(_NO_DISTILLATION, use_fusion=False, regularizer="none")


def taught_stages(settings: PairSettings, num_stages: int) -> tuple[int, ...]:
    """The stages the feature term covers: `feat_stages`, or every stage; `fused_map`: the last."""
    if settings.feat_form == "fused_map":
        return (num_stages - 1,)
    if settings.feat_stages is None:
        return tuple(range(num_stages))
    return settings.feat_stages


def fused_feature_stages(settings: PairSettings, num_stages: int) -> tuple[int, ...] | None:
    """The stages whose fused map teaches (what the cohort builds modules for); None when the
    feature term is off or is attention transfer."""
    if not settings.lam_feat or settings.feat_form == "attention":
        return None
    return taught_stages(settings, num_stages)


def pair_forward(cohort, images: jax.Array, *, train: bool, train_teacher: bool = True) -> dict:
    """Teacher and student logits and stage maps. A batch of two views gives the teacher view 0
    and the student view 1 (KDCL); `train_teacher=False` runs the teacher in inference mode."""
    teacher_images, student_images = member_views(images, 2)
    teacher_logits, teacher_features = cohort.teacher(teacher_images, train=train and train_teacher)
    student_logits, student_features = cohort.student(student_images, train=train)
    return dict(
        teacher_logits=teacher_logits,
        student_logits=student_logits,
        teacher_features=teacher_features,
        student_features=student_features,
    )


class TeacherStudent(Method):
    """Two zoo networks, `config.teacher` and `config.student`, and what every method over such
    a pair shares: which models are evaluated (each network, their ensemble and, where there is
    one, the fused classifier) and whose training accuracy is logged."""

    def build_members(self, config, num_classes, in_channels, dtype, rngs):
        return {
            name: create_model(
                config[name], num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
            )
            for name in ("teacher", "student")
        }

    def networks(self, config):
        return {"teacher": config.teacher, "student": config.student}

    def train_accuracy_logits(self, outputs):
        names = ("teacher", "student", "fused")
        return {n: outputs[f"{n}_logits"] for n in names if f"{n}_logits" in outputs}

    def evaluated(self, outputs, state_outputs=None):
        """The student, the teacher, their ensemble (mean logits) and the fused classifier."""
        z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
        logits = {"student": z_s, "teacher": z_t, "ensemble": losses.ensemble_logits(z_t, z_s)}
        if "fused_logits" in outputs:
            logits["fused"] = outputs["fused_logits"]
        return logits

    def evaluated_names(self):
        return ["student", "teacher", "ensemble"]


class PairMethod(TeacherStudent):
    """Teacher and student (two zoo networks), FFCL's fusion module and fused feature knowledge
    where the settings ask for them."""

    Settings = PairSettings
    PRESETS = {
        "independent": dict(_OFF, tau=1.0, rampup_epochs=0.0),
        # Deep Mutual Learning: KL at tau 1 both ways, from the first step (no ramp-up).
        "dml": dict(_OFF, lam_mutual=1.0, tau=1.0, rampup_epochs=0.0),
        # Feature Fusion Learning (Kim et al. 2020): fused -> both, ensemble -> fused.
        "ffl": dict(_NO_DISTILLATION, lam_fuse=1.0, lam_ens=1.0, regularizer="none"),
        "ffcl": {},
    }
    fusion_side_members = ("fusion", "fused_knowledge")

    @classmethod
    def normalize(cls, values):
        if values.get("feat_stages") is not None:
            values["feat_stages"] = tuple(int(s) for s in values["feat_stages"])
        return values

    def validate(self) -> None:
        s = self.settings
        for name in ("lam_fuse", "lam_ens", "lam_mutual", "lam_feat", "lam_reg"):
            if getattr(s, name) < 0:
                raise UserError(f"loss.{name} must be >= 0, got {getattr(s, name)}")
        check_tau_and_rampup(s)
        if (s.lam_fuse or s.lam_ens) and not s.use_fusion:
            raise UserError(
                "loss.lam_fuse / loss.lam_ens need the fusion module: set loss.use_fusion=True "
                "or set both weights to 0"
            )
        check_choice("regularizer", s.regularizer, REGULARIZERS)
        check_choice("feat_form", s.feat_form, FEATURE_FORMS)
        if s.lam_feat and s.feat_form != "attention" and not s.use_fusion:
            raise UserError(
                f"loss.feat_form={s.feat_form!r} takes its targets from the fusion module: set "
                "loss.use_fusion=True, or use feat_form='attention'"
            )
        if s.feat_form == "fused_map" and s.feat_stages is not None:
            raise UserError(
                "loss.feat_form='fused_map' teaches the last stage only: leave loss.feat_stages "
                "unset, or use feat_form='stage_fusion' to choose stages"
            )
        check_choice("attention_reduction", s.attention_reduction, losses.ATTENTION_REDUCTIONS)
        check_choice("feat_direction", s.feat_direction, FEATURE_DIRECTIONS)
        if not 0 < s.reg_correct_prob < 1:
            raise UserError(f"loss.reg_correct_prob must be in (0, 1), got {s.reg_correct_prob}")
        if s.reg_temperature <= 0:
            raise UserError(f"loss.reg_temperature must be > 0, got {s.reg_temperature}")
        if not 0 <= s.label_smoothing < 1:
            raise UserError(f"loss.label_smoothing must be in [0, 1), got {s.label_smoothing}")

    # ----------------------------------------------------------------- members

    def build_members(self, config, num_classes, in_channels, dtype, rngs):
        """Teacher, student, then the fusion module and the fused feature knowledge's modules:
        adding the feature modules leaves the initial weights of the others unchanged."""
        s = self.settings
        teacher = create_model(
            config.teacher, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
        )
        student = create_model(
            config.student, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
        )
        available = min(len(teacher.stage_channels), len(student.stage_channels))
        for stage in s.feat_stages or ():
            if not 0 <= stage < available:
                raise UserError(
                    f"loss.feat_stages has stage {stage}, but the networks have stages "
                    f"0..{available - 1}; list stage indices in that range"
                )
        fusion = fused_knowledge = None
        if s.use_fusion:
            fusion = FusionModule(
                teacher.stage_channels[-1],
                student.stage_channels[-1],
                num_classes,
                fused_channels=config.fusion_channels,
                dtype=dtype,
                rngs=rngs,
            )
        stages = fused_feature_stages(s, NUM_STAGES)
        if stages:
            fused_knowledge = FusedFeatureKnowledge(
                teacher.stage_channels,
                student.stage_channels,
                tuple(sorted(stages)),
                fusion.fused_channels,
                num_classes,
                dtype=dtype,
                rngs=rngs,
            )
        return dict(
            teacher=teacher, student=student, fusion=fusion, fused_knowledge=fused_knowledge
        )

    # ----------------------------------------------------------------- forward and objective

    def forward(self, cohort, images, *, train):
        out = pair_forward(cohort, images, train=train)
        if cohort.fusion is not None:
            t_maps, s_maps = out["teacher_features"], out["student_features"]
            fused_map = cohort.fusion.fuse(t_maps[-1], s_maps[-1], train=train)
            out["fused_logits"] = cohort.fusion.classify(fused_map)
            # Feature targets only teach: an evaluation does not need them.
            if cohort.fused_knowledge is not None and train:
                out["feature_targets"], out["stage_fused_logits"] = cohort.fused_knowledge(
                    t_maps, s_maps, fused_map, train=train
                )
        return out

    def loss(self, outputs, labels, epoch, num_classes):
        """The total loss L of docs/method.md and each unweighted term, for logging."""
        s = self.settings
        z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
        z_f = outputs.get("fused_logits")
        tau = s.tau
        terms: dict[str, jax.Array] = {
            "ce_teacher": losses.cross_entropy(z_t, labels),
            "ce_student": losses.cross_entropy(z_s, labels),
        }
        if s.use_fusion:
            terms["ce_fused"] = losses.cross_entropy(z_f, labels)
        if outputs.get("stage_fused_logits"):  # stage_fusion: trains its fusion modules
            terms["ce_stage_fused"] = sum(
                losses.cross_entropy(z, labels) for z in outputs["stage_fused_logits"]
            )
        supervised = sum(terms.values())

        ramp = losses.rampup_weight(epoch, s.rampup_epochs)
        distill = jnp.zeros((), jnp.float32)
        if s.lam_fuse:
            terms["kl_fused_to_peers"] = losses.kl_distill(z_t, z_f, tau) + losses.kl_distill(
                z_s, z_f, tau
            )
            distill += s.lam_fuse * terms["kl_fused_to_peers"]
        if s.lam_ens:
            terms["kl_ensemble_to_fused"] = losses.kl_distill(
                z_f, losses.ensemble_logits(z_t, z_s), tau
            )
            distill += s.lam_ens * terms["kl_ensemble_to_fused"]
        if s.lam_mutual:
            terms["kl_mutual"] = losses.kl_distill(z_s, z_t, tau) + losses.kl_distill(z_t, z_s, tau)
            distill += s.lam_mutual * terms["kl_mutual"]
        if s.lam_feat:
            if s.feat_form == "attention":
                student_features = outputs["student_features"]
                num_stages = min(len(student_features), len(outputs["teacher_features"]))
                terms["feat"] = losses.attention_transfer(
                    student_features,
                    outputs["teacher_features"],
                    taught_stages(s, num_stages),
                    s.feat_direction,
                    s.attention_reduction,
                )
            else:
                terms["feat"] = losses.fused_map_transfer(outputs["feature_targets"])
            distill += s.lam_feat * terms["feat"]

        regularization = jnp.zeros((), jnp.float32)
        if s.lam_reg and s.regularizer != "none":
            if s.regularizer == "virtual_teacher":
                target = losses.virtual_teacher_target(
                    labels, num_classes, s.reg_correct_prob, s.reg_temperature
                )
            else:
                target = losses.label_smoothing_target(labels, num_classes, s.label_smoothing)
            reg_logits = [z_t, z_s] + ([z_f] if s.use_fusion else [])
            terms["reg"] = sum(losses.fixed_target_kl(z, target) for z in reg_logits)
            regularization = s.lam_reg * terms["reg"]

        total = supervised + ramp * distill + regularization
        terms["rampup_weight"] = ramp
        return total, terms

    def evaluated_names(self):
        fused = ["fused"] if self.settings.use_fusion else []
        return ["student", "teacher", *fused, "ensemble"]


def check_tau_and_rampup(s) -> None:
    if s.tau <= 0:
        raise UserError(f"loss.tau must be > 0, got {s.tau}")
    if s.rampup_epochs < 0:
        raise UserError(f"loss.rampup_epochs must be >= 0 (0 = no ramp-up), got {s.rampup_epochs}")


def check_kd_alpha(s) -> None:
    """`kd_alpha` weighs CE against the distillation term: (1 - a) CE + a KL."""
    if not 0 <= s.kd_alpha <= 1:
        raise UserError(f"loss.kd_alpha must be in [0, 1], got {s.kd_alpha}")


def check_choice(key: str, value: str, valid) -> None:
    if value not in valid:
        raise UserError(f"unknown loss.{key} {value!r}; valid: {', '.join(valid)}")
