"""Each method of `ffcl_jax.methods` in PyTorch: the cohort it trains and its objective.

The mirror of a method builds the same members (converted weights load member by member) and
computes the same named terms; `tests/test_pytorch_parity.py` runs three float64 train steps of
every registered method against its mirror, so a method without one fails there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ffcl_jax.methods import REGISTRY, Method
from ffcl_jax.methods.pair import fused_feature_stages
from ffcl_jax.models import NUM_STAGES
from ffcl_jax.torch_reference import ffsd, losses, mcl, models, switokd


def pair_evaluated(out, mean_out=None) -> dict:
    """A pair's evaluated models (`Method.evaluated`): student, teacher, their ensemble and the
    fused classifier where there is one."""
    logits = {"student": out["student_logits"], "teacher": out["teacher_logits"]}
    logits["ensemble"] = (out["teacher_logits"] + out["student_logits"]) / 2
    if "fused_logits" in out:
        logits["fused"] = out["fused_logits"]
    return logits


def branch_evaluated(out, mean_out=None) -> dict:
    """ONE's, CL-ILR's and OKDDip's: the student (branch 0), the other branches, and the
    ensemble (OKDDip's: the peers' mean, without the leader)."""
    logits = {"student": out["student_logits"]}
    for index, z in enumerate(out["branch_logits"][1:], start=1):
        logits[f"branch_{index}"] = z
    if "peer_attention" in out:
        logits["ensemble"] = losses.branch_ensemble(out["branch_logits"][1:])
    else:
        logits["ensemble"] = losses.branch_ensemble(out["branch_logits"], out.get("gate_weights"))
    return logits


def pcl_evaluated(out, mean_out) -> dict:
    """PCL's: the temporal mean's branches are the deployed student and its peers; the online
    network's branch 0 and the peer-ensemble classifier are reported beside them."""
    logits = branch_evaluated(mean_out)
    logits["ensemble"] = out["peer_ensemble_logits"]
    logits["online_student"] = out["student_logits"]
    return logits


@dataclasses.dataclass(frozen=True)
class Mirror:
    # (config, method, info) -> the cohort as an nn.Module whose forward returns the JAX
    # method's outputs
    build: Callable
    # (outputs, labels, settings mapping, epoch, num_classes) -> (total, terms)
    objective: Callable
    # (outputs, outputs of the method's temporal mean or None) -> {evaluated name: logits}
    evaluated: Callable = pair_evaluated
    # (terms, settings mapping) -> {member: whether it takes this step's update}, as the
    # method's `member_updates`; None: every member updates every step
    member_updates: Callable | None = None


def _pair(config, method: Method, info):
    s = method.settings
    return models.create_cohort(
        config.teacher,
        config.student,
        info.num_classes,
        in_channels=info.image_shape[-1],
        use_fusion=s.use_fusion,
        fused=config.fusion_channels,
        fused_feature_stages=fused_feature_stages(s, NUM_STAGES),
    )


def two_networks(config, method: Method, info):
    """Teacher and student alone (no fusion module): KD, KDCL."""
    return models.create_cohort(
        config.teacher,
        config.student,
        info.num_classes,
        in_channels=info.image_shape[-1],
        use_fusion=False,
    )


def branch_options(settings) -> dict:
    """A branch method's settings as the reference `BranchCohort`'s keyword arguments."""
    return dict(
        num_branches=settings.num_branches,
        branch_stages=settings.branch_stages,
        gate=settings.gate,
        backprop_rescale=settings.backprop_rescale,
        peer_attention=settings.branch_target == "attention",
        peer_ensemble=settings.peer_ensemble,
    )


def _branches(config, method: Method, info):
    return models.BranchCohort(
        config.student,
        info.num_classes,
        info.image_shape[-1],
        **branch_options(method.settings),
    )


_PAIR = Mirror(_pair, losses.pair_objective)
_BRANCHES = Mirror(_branches, losses.branch_objective, branch_evaluated)
MIRRORS: dict[str, Mirror] = {
    "independent": _PAIR,
    "dml": _PAIR,
    "ffl": _PAIR,
    "ffcl": _PAIR,
    "kd": Mirror(two_networks, losses.kd_objective),
    "kdcl": Mirror(two_networks, losses.collaborative_objective),
    "one": _BRANCHES,
    "cl_ilr": _BRANCHES,
    "okddip": _BRANCHES,
    "pcl": Mirror(_branches, losses.branch_objective, pcl_evaluated),
    "mcl": Mirror(mcl.build, mcl.objective),
    "switokd": Mirror(two_networks, switokd.objective, member_updates=switokd.member_updates),
    "ffsd": Mirror(ffsd.build, ffsd.objective, ffsd.evaluated),
}


def mirror(name: str) -> Mirror:
    if name not in MIRRORS:
        raise NotImplementedError(
            f"method {name!r} has no PyTorch mirror: add one to ffcl_jax/torch_reference/"
            "methods.py (MIRRORS)"
        )
    return MIRRORS[name]


def pause_members(cohort, settings: dict, terms) -> dict[str, bool]:
    """After the backward pass: the gradients of the members the method pauses this step set
    to None, which `torch.optim.SGD` skips entirely (no weight decay, momentum unchanged), as
    when the authors' code does not step a network's optimizer. Returns the flags."""
    updates = MIRRORS[settings["method"]].member_updates
    flags = updates(terms, settings) if updates is not None else {}
    for member, takes_update in flags.items():
        if not takes_update:
            for param in getattr(cohort, member).parameters():
                param.grad = None
    return flags


def settings_mapping(method: Method) -> dict:
    """The method's settings as the plain mapping the reference's objectives read, with its
    name and `num_views`."""
    return method.settings_dict() | {"method": method.name, "num_views": method.num_views}


def unmirrored() -> list[str]:
    """Registered methods without a mirror (the parity tests fail on any)."""
    return [name for name in REGISTRY if name not in MIRRORS]
