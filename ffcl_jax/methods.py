"""Method presets (independent, kd, dml, ffl, ffcl, kdcl; the branch methods one, cl_ilr, okddip,
pcl) and the settings they resolve to; `ffcl_jax.objectives` computes the loss they configure.

A preset is a set of default loss settings; every setting is also a config key under
`config.loss`, where `None` means "the preset's value". So `--config.method=ffcl
--config.loss.lam_feat=0` is the ffcl ablation without feature terms, and nothing about a method
is hidden in code. The resolved settings form a frozen `LossSettings`, which is static for `jit`:
terms whose weight is zero are not traced at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.models import NUM_STAGES
from ffcl_jax.models.branches import GATES

REGULARIZERS = ("virtual_teacher", "label_smoothing", "none")
FEATURE_DIRECTIONS = ("teacher_to_student", "mutual")
# The feature-based knowledge weighted by lam_feat (docs/method.md, "Feature knowledge"):
# attention transfer between the networks, the last-stage fused map teaching both networks
# through adapters, or a fusion module at every stage whose map teaches both at that stage.
FEATURE_FORMS = ("attention", "fused_map", "stage_fusion")
# What each branch of a branch method distils from: the ensemble of all branches (ONE), the
# mean of the other branches' logits (CL-ILR's peer consensus), or OKDDip's two levels (each
# peer from its attention-weighted mix of the peers, branch 0, the group leader, from the
# peers' mean).
BRANCH_TARGETS = ("ensemble", "others", "attention")
# KDCL's target for the pair: none (not KDCL), the mean of the two networks' logits, or MinLogit.
COLLABORATIVE_TARGETS = ("none", "mean", "min_logit")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Everything the objective needs, resolved from a preset and the user's overrides."""

    method: str
    use_fusion: bool
    lam_fuse: float  # KL(z_T <- z_F) + KL(z_S <- z_F): the fused classifier teaches both
    lam_ens: float  # KL(z_F <- z_E): the T+S ensemble teaches the fused classifier
    lam_mutual: float  # KL(z_S <- z_T) + KL(z_T <- z_S): peers teach each other
    lam_feat: float  # feature knowledge (feat_form) at the listed stages
    lam_reg: float  # network regularization (the "positive knowledge")
    tau: float
    rampup_epochs: float
    feat_stages: tuple[int, ...] | None  # None: every stage
    feat_form: str  # one of FEATURE_FORMS
    feat_direction: str  # attention only
    attention_reduction: str  # attention only: "sum" or "mean" over a stage's positions
    regularizer: str
    reg_correct_prob: float
    reg_temperature: float
    label_smoothing: float
    kd_alpha: float  # kd only: (1 - a) CE(S) + a KL_tau(S <- T)
    train_teacher: bool  # False (kd): the teacher is loaded from a checkpoint and frozen
    # Branch methods: one multi-branch network of config.student (models/branches.py).
    num_branches: int  # 0: the teacher/student pair; >= 2: branches of the student network
    branch_stages: int  # how many of the last stages each branch copies
    gate: str  # "one": ONE's gate weighs the branches' ensemble; "none": their plain mean
    backprop_rescale: bool  # CL-ILR: the trunk's gradient from the branches / num_branches
    lam_ensemble_ce: float  # CE(z_ens, y): trains ONE's gate (and, through it, the branches)
    lam_branch_kd: float  # sum_i KL_tau(z_i <- target_i), ramped up
    branch_target: str  # one of BRANCH_TARGETS
    # KDCL and PCL.
    separate_views: bool  # each network (pair) or branch trains on its own augmentation
    collaborative_target: str  # KDCL: the pair's target (COLLABORATIVE_TARGETS); kd_alpha weighs
    peer_ensemble: bool  # PCL: the branches' ensemble is a classifier over their pooled features
    temporal_mean_decay: float  # PCL: > 0 keeps an EMA of the weights (its own BN statistics)
    lam_temporal_kd: float  # PCL: sum_i mean_{j != i} KL_tau(z_i <- temporal mean's z_j), ramped

    @property
    def branch_method(self) -> bool:
        return self.num_branches > 0

    def branch_options(self) -> dict[str, Any]:
        """The branch cohort's structure, as keyword arguments of both frameworks'
        `BranchCohort` builders."""
        return {
            "num_branches": self.num_branches,
            "branch_stages": self.branch_stages,
            "gate": self.gate,
            "backprop_rescale": self.backprop_rescale,
            "peer_attention": self.branch_target == "attention",
            "peer_ensemble": self.peer_ensemble,
        }

    @property
    def num_views(self) -> int:
        """Augmented views of every training image: one per network or branch with
        `separate_views`, else one."""
        if not self.separate_views:
            return 1
        return self.num_branches if self.branch_method else 2

    def active_terms(self) -> tuple[str, ...]:
        """Names of the loss terms this setting computes (the rest are not traced)."""
        if self.branch_method:
            terms = ["ce_branches"]
            if self.lam_ensemble_ce:
                terms.append("ce_ensemble")
            if self.lam_branch_kd:
                terms.append("kl_to_branches")
            if self.lam_temporal_kd:
                terms.append("kl_temporal_mean")
            return tuple(terms)
        if self.collaborative_target != "none":
            return ("ce_teacher", "ce_student", "kl_collaborative")
        if not self.train_teacher:
            return ("ce_student", "kl_teacher_to_student")
        terms = ["ce_teacher", "ce_student"]
        if self.use_fusion:
            terms.append("ce_fused")
        if fused_feature_stages(self, NUM_STAGES) and self.feat_form == "stage_fusion":
            if min(taught_stages(self, NUM_STAGES)) < NUM_STAGES - 1:
                terms.append("ce_stage_fused")
        if self.lam_fuse:
            terms.append("kl_fused_to_peers")
        if self.lam_ens:
            terms.append("kl_ensemble_to_fused")
        if self.lam_mutual:
            terms.append("kl_mutual")
        if self.lam_feat:
            terms.append("feat")
        if self.lam_reg and self.regularizer != "none":
            terms.append("reg")
        return tuple(terms)


_OFF = dict(lam_fuse=0.0, lam_ens=0.0, lam_mutual=0.0, lam_feat=0.0, lam_reg=0.0)
_COMMON = dict(
    feat_stages=None,
    feat_form="attention",
    feat_direction="teacher_to_student",
    attention_reduction="sum",
    reg_correct_prob=0.99,
    reg_temperature=20.0,
    label_smoothing=0.1,
    kd_alpha=0.9,
    train_teacher=True,
    num_branches=0,
    branch_stages=1,
    gate="none",
    backprop_rescale=False,
    lam_ensemble_ce=0.0,
    lam_branch_kd=0.0,
    branch_target="ensemble",
    separate_views=False,
    collaborative_target="none",
    peer_ensemble=False,
    temporal_mean_decay=0.0,
    lam_temporal_kd=0.0,
)
# The branch methods train one multi-branch network: none of the pair's terms.
_BRANCHES = dict(_COMMON, **_OFF, use_fusion=False, regularizer="none")

PRESETS: dict[str, dict[str, Any]] = {
    "independent": dict(
        _COMMON, **_OFF, use_fusion=False, tau=1.0, rampup_epochs=0.0, regularizer="none"
    ),
    # Hinton KD from a frozen teacher (loaded with config.teacher_checkpoint): alpha 0.9, tau 4.
    "kd": dict(
        _COMMON,
        **_OFF,
        use_fusion=False,
        tau=4.0,
        rampup_epochs=0.0,
        regularizer="none",
        train_teacher=False,
    ),
    # Deep Mutual Learning: KL at tau 1 both ways, from the first step (no ramp-up).
    "dml": dict(
        _COMMON,
        **dict(_OFF, lam_mutual=1.0),
        use_fusion=False,
        tau=1.0,
        rampup_epochs=0.0,
        regularizer="none",
    ),
    # Feature Fusion Learning (Kim et al. 2020): fused -> both, ensemble -> fused.
    "ffl": dict(
        _COMMON,
        **dict(_OFF, lam_fuse=1.0, lam_ens=1.0),
        use_fusion=True,
        tau=3.0,
        rampup_epochs=80.0,
        regularizer="none",
    ),
    "ffcl": dict(
        _COMMON,
        lam_fuse=1.0,
        lam_ens=1.0,
        lam_mutual=1.0,
        lam_feat=1.0,
        lam_reg=1.0,
        use_fusion=True,
        tau=3.0,
        rampup_epochs=80.0,
        regularizer="virtual_teacher",
    ),
    # KDCL (Guo et al. 2020), as its public re-implementation: teacher and student, each on its
    # own augmentation of the batch, distil from the mean of their logits (stopped), 0.5 CE +
    # 0.5 KL at tau 4, no ramp-up; loss.collaborative_target='min_logit' is the paper's MinLogit.
    "kdcl": dict(
        _COMMON,
        **_OFF,
        use_fusion=False,
        tau=4.0,
        rampup_epochs=0.0,
        regularizer="none",
        kd_alpha=0.5,
        separate_views=True,
        collaborative_target="mean",
    ),
    # ONE (Lan et al. 2018), docs/method.md "Branch baselines": three branches of the last stage,
    # a gate, CE on every branch and the gated ensemble, the ensemble distilled to every branch.
    "one": dict(
        _BRANCHES,
        num_branches=3,
        branch_stages=1,
        gate="one",
        lam_ensemble_ce=1.0,
        lam_branch_kd=1.0,
        branch_target="ensemble",
        tau=3.0,
        rampup_epochs=80.0,
    ),
    # CL-ILR (Song & Chai 2018): branches of the last stage on a shared trunk whose gradient is
    # rescaled by 1/m, each branch distilled from the mean of the other branches.
    "cl_ilr": dict(
        _BRANCHES,
        num_branches=4,
        branch_stages=1,
        backprop_rescale=True,
        lam_branch_kd=1.0,
        branch_target="others",
        tau=3.0,
        rampup_epochs=80.0,
    ),
    # OKDDip (Chen et al. 2020): three peers and a group leader (branch 0, the student); each
    # peer distils from its attention-weighted mix of the peers, the leader from their mean.
    "okddip": dict(
        _BRANCHES,
        num_branches=4,
        branch_stages=1,
        lam_branch_kd=1.0,
        branch_target="attention",
        tau=3.0,
        rampup_epochs=80.0,
    ),
    # PCL (Wu & Gong 2021): three branches, each on its own view (the trunk runs per view); a
    # peer-ensemble classifier over the branches' pooled features teaches every branch and
    # learns from its CE alone; every branch also distils from the other branches' temporal
    # means (an EMA of the weights, decay min(1 - 1/(t+1), 0.999)), which PCL deploys.
    "pcl": dict(
        _BRANCHES,
        num_branches=3,
        branch_stages=1,
        lam_ensemble_ce=1.0,
        lam_branch_kd=1.0,
        branch_target="ensemble",
        separate_views=True,
        peer_ensemble=True,
        temporal_mean_decay=0.999,
        lam_temporal_kd=1.0,
        tau=3.0,
        rampup_epochs=80.0,
    ),
}


def resolve_loss_settings(method: str, overrides: Mapping[str, Any] | None = None) -> LossSettings:
    """Preset `method` with every non-None entry of `overrides` (usually `config.loss`) on top."""
    if method not in PRESETS:
        raise UserError(f"unknown method {method!r}; valid methods: {', '.join(PRESETS)}")
    values = dict(PRESETS[method])
    for key, value in (overrides or {}).items():
        if key not in values or key == "train_teacher":
            raise UserError(
                f"unknown loss setting {key!r}; valid settings: {', '.join(sorted(values))}"
            )
        if value is not None:
            values[key] = value
    if values["feat_stages"] is not None:
        values["feat_stages"] = tuple(int(s) for s in values["feat_stages"])
    settings = LossSettings(method=method, **values)
    _validate(settings)
    return settings


def _validate(s: LossSettings) -> None:
    for name in ("lam_fuse", "lam_ens", "lam_mutual", "lam_feat", "lam_reg"):
        if getattr(s, name) < 0:
            raise UserError(f"loss.{name} must be >= 0, got {getattr(s, name)}")
    if s.tau <= 0:
        raise UserError(f"loss.tau must be > 0, got {s.tau}")
    if s.rampup_epochs < 0:
        raise UserError(f"loss.rampup_epochs must be >= 0 (0 = no ramp-up), got {s.rampup_epochs}")
    if (s.lam_fuse or s.lam_ens) and not s.use_fusion:
        raise UserError(
            "loss.lam_fuse / loss.lam_ens need the fusion module: set loss.use_fusion=True "
            "or set both weights to 0"
        )
    if s.regularizer not in REGULARIZERS:
        raise UserError(
            f"unknown loss.regularizer {s.regularizer!r}; valid: {', '.join(REGULARIZERS)}"
        )
    if s.feat_form not in FEATURE_FORMS:
        raise UserError(
            f"unknown loss.feat_form {s.feat_form!r}; valid: {', '.join(FEATURE_FORMS)}"
        )
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
    if s.attention_reduction not in losses.ATTENTION_REDUCTIONS:
        raise UserError(
            f"unknown loss.attention_reduction {s.attention_reduction!r}; "
            f"valid: {', '.join(losses.ATTENTION_REDUCTIONS)}"
        )
    if s.feat_direction not in FEATURE_DIRECTIONS:
        raise UserError(
            f"unknown loss.feat_direction {s.feat_direction!r}; "
            f"valid: {', '.join(FEATURE_DIRECTIONS)}"
        )
    if not 0 < s.reg_correct_prob < 1:
        raise UserError(f"loss.reg_correct_prob must be in (0, 1), got {s.reg_correct_prob}")
    if s.reg_temperature <= 0:
        raise UserError(f"loss.reg_temperature must be > 0, got {s.reg_temperature}")
    if not 0 <= s.kd_alpha <= 1:
        raise UserError(f"loss.kd_alpha must be in [0, 1], got {s.kd_alpha}")
    if s.collaborative_target not in COLLABORATIVE_TARGETS:
        raise UserError(
            f"unknown loss.collaborative_target {s.collaborative_target!r}; "
            f"valid: {', '.join(COLLABORATIVE_TARGETS)}"
        )
    if s.collaborative_target != "none" and (
        s.branch_method
        or s.use_fusion
        or s.lam_fuse
        or s.lam_ens
        or s.lam_mutual
        or s.lam_feat
        or s.lam_reg
    ):
        raise UserError(
            "loss.collaborative_target (kdcl) trains the teacher/student pair on their ensemble "
            "alone: it takes no branches, fusion, mutual, feature or regularizer terms (leave "
            "those loss settings unset)"
        )
    if s.separate_views and s.use_fusion:
        raise UserError(
            "loss.separate_views gives each network its own view, but the fusion module fuses "
            "the two networks' maps of one image: set loss.separate_views=False or "
            "loss.use_fusion=False"
        )
    if not s.train_teacher and (
        s.use_fusion or s.lam_fuse or s.lam_ens or s.lam_mutual or s.lam_feat or s.lam_reg
    ):
        raise UserError(
            "the kd preset trains only the student from a frozen teacher: it takes no fusion, "
            "mutual, feature or regularizer terms (leave those loss settings unset)"
        )
    if not 0 <= s.label_smoothing < 1:
        raise UserError(f"loss.label_smoothing must be in [0, 1), got {s.label_smoothing}")
    _validate_branches(s)


def _validate_branches(s: LossSettings) -> None:
    if s.lam_ensemble_ce < 0 or s.lam_branch_kd < 0:
        raise UserError("loss.lam_ensemble_ce and loss.lam_branch_kd must be >= 0")
    if s.gate not in GATES:
        raise UserError(f"unknown loss.gate {s.gate!r}; valid: {', '.join(GATES)}")
    if s.branch_target not in BRANCH_TARGETS:
        raise UserError(
            f"unknown loss.branch_target {s.branch_target!r}; valid: {', '.join(BRANCH_TARGETS)}"
        )
    if s.lam_temporal_kd < 0:
        raise UserError(f"loss.lam_temporal_kd must be >= 0, got {s.lam_temporal_kd}")
    if not 0 <= s.temporal_mean_decay < 1:
        raise UserError(
            f"loss.temporal_mean_decay must be in [0, 1) (0: none), got {s.temporal_mean_decay}"
        )
    if not s.branch_method:
        if (
            s.gate != "none"
            or s.backprop_rescale
            or s.lam_ensemble_ce
            or s.lam_branch_kd
            or s.peer_ensemble
            or s.temporal_mean_decay
            or s.lam_temporal_kd
        ):
            raise UserError(
                "loss.gate, backprop_rescale, lam_ensemble_ce, lam_branch_kd, peer_ensemble, "
                "temporal_mean_decay and lam_temporal_kd belong to the branch methods (one, "
                f"cl_ilr, okddip, pcl); the {s.method} preset has no branches"
            )
        return
    if s.num_branches < 2:
        raise UserError(f"loss.num_branches must be >= 2 (or 0: no branches), got {s.num_branches}")
    if not 1 <= s.branch_stages <= NUM_STAGES:
        raise UserError(f"loss.branch_stages must be in 1..{NUM_STAGES}, got {s.branch_stages}")
    if s.branch_target == "attention" and s.num_branches < 3:
        raise UserError("loss.branch_target='attention' needs loss.num_branches >= 3")
    if s.gate == "one" and s.branch_stages == NUM_STAGES:
        raise UserError("loss.gate='one' reads the shared trunk: set loss.branch_stages < 3")
    if s.gate == "one" and (s.peer_ensemble or s.separate_views):
        raise UserError(
            "loss.gate='one' weighs the branches from one shared trunk: it takes neither "
            "loss.peer_ensemble (another ensemble) nor loss.separate_views (a trunk per view)"
        )
    if s.lam_temporal_kd and not s.temporal_mean_decay:
        raise UserError(
            "loss.lam_temporal_kd distils from the temporal mean: set loss.temporal_mean_decay "
            "> 0 (PCL: 0.999), or loss.lam_temporal_kd=0"
        )
    if s.use_fusion or s.lam_fuse or s.lam_ens or s.lam_mutual or s.lam_feat or s.lam_reg:
        raise UserError(
            f"the {s.method} preset trains one multi-branch network: it takes no fusion, "
            "mutual, feature or regularizer terms (set loss.num_branches=0 for those)"
        )


def check_feature_stages(settings: LossSettings, num_teacher_stages: int, num_student_stages: int):
    """Feature stages are matched by index, so both networks must have each listed stage."""
    available = min(num_teacher_stages, num_student_stages)
    for stage in settings.feat_stages or ():
        if not 0 <= stage < available:
            raise UserError(
                f"loss.feat_stages has stage {stage}, but the networks have stages "
                f"0..{available - 1}; list stage indices in that range"
            )


def taught_stages(settings: LossSettings, num_stages: int) -> tuple[int, ...]:
    """The stages the feature term covers: `feat_stages`, or every stage; `fused_map`: the last."""
    if settings.feat_form == "fused_map":
        return (num_stages - 1,)
    if settings.feat_stages is None:
        return tuple(range(num_stages))
    return settings.feat_stages


def fused_feature_stages(settings: LossSettings, num_stages: int) -> tuple[int, ...] | None:
    """The stages whose fused map teaches (what the cohort builds modules for); None when the
    feature term is off or is attention transfer."""
    if not settings.lam_feat or settings.feat_form == "attention":
        return None
    return taught_stages(settings, num_stages)
