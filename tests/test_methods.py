"""Presets turn on the right terms; the objective combines them as the spec says; bad settings
fail with clear errors; no gradient reaches a distillation target through the full objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods import PRESETS, fused_feature_stages, resolve_loss_settings, taught_stages
from ffcl_jax.objectives import cohort_objective

K = 5


def fake_outputs(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    out = {
        f"{m}_logits": jnp.asarray(rng.normal(size=(batch, K)) * 2, jnp.float32)
        for m in ("teacher", "student", "fused")
    }
    for m, ch in (("teacher", 6), ("student", 3)):
        out[f"{m}_features"] = [
            jnp.asarray(rng.normal(size=(batch, 8 // 2**i, 8 // 2**i, ch * 2**i)), jnp.float32)
            for i in range(3)
        ]
    return out


LABELS = jnp.array([0, 1, 4, 2])


@pytest.mark.parametrize(
    "method, expected",
    [
        ("independent", {"ce_teacher", "ce_student"}),
        ("dml", {"ce_teacher", "ce_student", "kl_mutual"}),
        (
            "ffl",
            {"ce_teacher", "ce_student", "ce_fused", "kl_fused_to_peers", "kl_ensemble_to_fused"},
        ),
        (
            "ffcl",
            {
                "ce_teacher",
                "ce_student",
                "ce_fused",
                "kl_fused_to_peers",
                "kl_ensemble_to_fused",
                "kl_mutual",
                "feat",
                "reg",
            },
        ),
    ],
)
def test_preset_terms(method, expected):
    settings = resolve_loss_settings(method)
    assert set(settings.active_terms()) == expected
    outputs = fake_outputs()
    if not settings.use_fusion:
        outputs.pop("fused_logits")
    _, terms = cohort_objective(outputs, LABELS, settings, jnp.asarray(0), K)
    assert set(terms) - {"rampup_weight"} == expected


def test_preset_hyperparameters():
    assert resolve_loss_settings("dml").tau == 1.0
    assert resolve_loss_settings("dml").rampup_epochs == 0.0
    ffcl = resolve_loss_settings("ffcl")
    assert (ffcl.tau, ffcl.rampup_epochs, ffcl.regularizer) == (3.0, 80.0, "virtual_teacher")
    assert (ffcl.reg_correct_prob, ffcl.reg_temperature) == (0.99, 20.0)
    assert ffcl.lam_fuse == ffcl.lam_ens == ffcl.lam_mutual == ffcl.lam_feat == ffcl.lam_reg == 1


@pytest.mark.parametrize(
    "override, dropped",
    [
        ({"lam_fuse": 0.0}, "kl_fused_to_peers"),
        ({"lam_ens": 0.0}, "kl_ensemble_to_fused"),
        ({"lam_mutual": 0.0}, "kl_mutual"),
        ({"lam_feat": 0.0}, "feat"),
        ({"regularizer": "none"}, "reg"),
        ({"lam_reg": 0.0}, "reg"),
    ],
)
def test_ablations_drop_one_term(override, dropped):
    full = set(resolve_loss_settings("ffcl").active_terms())
    ablated = set(resolve_loss_settings("ffcl", override).active_terms())
    assert full - ablated == {dropped}


def test_none_overrides_keep_the_preset():
    assert resolve_loss_settings("ffcl", {"tau": None, "lam_feat": None}) == resolve_loss_settings(
        "ffcl"
    )


@pytest.mark.parametrize("epoch", [0, 40, 100])
def test_total_is_the_weighted_sum_of_the_spec(epoch):
    settings = resolve_loss_settings(
        "ffcl",
        {"lam_fuse": 0.5, "lam_ens": 2.0, "lam_mutual": 0.3, "lam_feat": 4.0, "lam_reg": 0.7},
    )
    outputs = fake_outputs()
    total, terms = cohort_objective(outputs, LABELS, settings, jnp.asarray(epoch), K)
    w = float(losses.rampup_weight(jnp.asarray(epoch), 80.0))
    np.testing.assert_allclose(terms["rampup_weight"], w, rtol=1e-6)
    z_t, z_s, z_f = (outputs[f"{m}_logits"] for m in ("teacher", "student", "fused"))
    # Each term recomputed from the primitives (checked against NumPy in test_losses).
    np.testing.assert_allclose(
        terms["kl_fused_to_peers"],
        losses.kl_distill(z_t, z_f, 3.0) + losses.kl_distill(z_s, z_f, 3.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        terms["kl_ensemble_to_fused"], losses.kl_distill(z_f, (z_t + z_s) / 2, 3.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        terms["kl_mutual"],
        losses.kl_distill(z_s, z_t, 3.0) + losses.kl_distill(z_t, z_s, 3.0),
        rtol=1e-6,
    )
    target = losses.virtual_teacher_target(LABELS, K, 0.99, 20.0)
    np.testing.assert_allclose(
        terms["reg"], sum(losses.fixed_target_kl(z, target) for z in (z_t, z_s, z_f)), rtol=1e-6
    )
    expected = (
        terms["ce_teacher"]
        + terms["ce_student"]
        + terms["ce_fused"]
        + w
        * (
            0.5 * terms["kl_fused_to_peers"]
            + 2.0 * terms["kl_ensemble_to_fused"]
            + 0.3 * terms["kl_mutual"]
            + 4.0 * terms["feat"]
        )
        + 0.7 * terms["reg"]
    )
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def _term_grads(settings, term):
    outputs = fake_outputs()
    return jax.grad(lambda o: cohort_objective(o, LABELS, settings, jnp.asarray(100), K)[1][term])(
        outputs
    )


def _max_abs(tree):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def test_no_gradient_into_any_distillation_target():
    ffcl = resolve_loss_settings("ffcl")
    g = _term_grads(ffcl, "kl_fused_to_peers")  # fused teaches both: fused is the target
    assert _max_abs(g["fused_logits"]) == 0.0
    assert _max_abs(g["teacher_logits"]) > 0 and _max_abs(g["student_logits"]) > 0
    g = _term_grads(ffcl, "kl_ensemble_to_fused")  # ensemble teaches fused
    assert _max_abs(g["teacher_logits"]) == 0.0 and _max_abs(g["student_logits"]) == 0.0
    assert _max_abs(g["fused_logits"]) > 0
    g = _term_grads(ffcl, "feat")  # teacher_to_student: the teacher's maps are the target
    assert _max_abs(g["teacher_features"]) == 0.0
    assert _max_abs(g["student_features"]) > 0
    # Mutual: each peer is trained, each only through the term where it is the student.
    outputs = fake_outputs()
    g_s_from_t_target = jax.grad(
        lambda z_t: losses.kl_distill(outputs["student_logits"], z_t, 3.0)
    )(outputs["teacher_logits"])
    assert _max_abs(g_s_from_t_target) == 0.0
    g = _term_grads(ffcl, "kl_mutual")
    assert _max_abs(g["teacher_logits"]) > 0 and _max_abs(g["student_logits"]) > 0
    g = _term_grads(ffcl, "reg")
    assert all(_max_abs(g[f"{m}_logits"]) > 0 for m in ("teacher", "student", "fused"))


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("fml", {}, "unknown method 'fml'; valid methods: independent, kd, dml, ffl, ffcl"),
        ("kd", {"lam_mutual": 1.0}, "the kd preset trains only the student"),
        ("kd", {"kd_alpha": 1.5}, "loss.kd_alpha must be in [0, 1]"),
        ("kd", {"train_teacher": True}, "unknown loss setting 'train_teacher'"),
        ("ffcl", {"lam_fusion": 1.0}, "unknown loss setting 'lam_fusion'"),
        ("ffcl", {"lam_feat": -1.0}, "loss.lam_feat must be >= 0"),
        ("ffcl", {"tau": 0.0}, "loss.tau must be > 0"),
        ("dml", {"lam_fuse": 1.0}, "need the fusion module"),
        ("ffcl", {"regularizer": "dropout"}, "unknown loss.regularizer 'dropout'"),
        ("ffcl", {"feat_direction": "student_to_teacher"}, "unknown loss.feat_direction"),
        ("ffcl", {"reg_correct_prob": 1.5}, "loss.reg_correct_prob must be in (0, 1)"),
        ("ffcl", {"feat_form": "fitnet"}, "unknown loss.feat_form 'fitnet'"),
        ("ffcl", {"attention_reduction": "max"}, "unknown loss.attention_reduction 'max'"),
        (
            "ffcl",
            {"feat_form": "fused_map", "use_fusion": False, "lam_fuse": 0.0, "lam_ens": 0.0},
            "takes its targets from the fusion module",
        ),
        ("ffcl", {"feat_form": "fused_map", "feat_stages": (1,)}, "teaches the last stage only"),
    ],
)
def test_bad_settings_fail_clearly(method, overrides, message):
    with pytest.raises(UserError) as info:
        resolve_loss_settings(method, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_preset_resolves():
    for method in PRESETS:
        assert resolve_loss_settings(method).method == method


def test_feature_forms_choose_their_stages_and_terms():
    attention = resolve_loss_settings("ffcl", {"feat_stages": (2, 0)})
    assert taught_stages(attention, 3) == (2, 0)
    assert fused_feature_stages(attention, 3) is None  # attention needs no extra modules
    fused_map = resolve_loss_settings("ffcl", {"feat_form": "fused_map"})
    assert fused_feature_stages(fused_map, 3) == (2,)
    assert "ce_stage_fused" not in fused_map.active_terms()
    every = resolve_loss_settings("ffcl", {"feat_form": "stage_fusion"})
    assert fused_feature_stages(every, 3) == (0, 1, 2)
    assert "ce_stage_fused" in every.active_terms()
    last_only = resolve_loss_settings("ffcl", {"feat_form": "stage_fusion", "feat_stages": (2,)})
    assert "ce_stage_fused" not in last_only.active_terms()
    off = resolve_loss_settings("ffcl", {"feat_form": "stage_fusion", "lam_feat": 0.0})
    assert fused_feature_stages(off, 3) is None and "feat" not in off.active_terms()


def test_fused_feature_objective_is_the_sum_of_the_stage_distances():
    settings = resolve_loss_settings("ffcl", {"feat_form": "stage_fusion", "rampup_epochs": 0.0})
    outputs = fake_outputs()
    rng = np.random.default_rng(1)
    outputs["feature_targets"] = [
        {
            k: jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32)
            for k in ("fused", "teacher", "student")
        }
        for _ in range(3)
    ]
    outputs["stage_fused_logits"] = [outputs["fused_logits"] * 0.5, outputs["fused_logits"]]
    total, terms = cohort_objective(outputs, LABELS, settings, 0, K)
    expected = sum(
        losses.fused_map_distance(m[net], m["fused"])
        for m in outputs["feature_targets"]
        for net in ("teacher", "student")
    )
    np.testing.assert_allclose(terms["feat"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        terms["ce_stage_fused"],
        sum(losses.cross_entropy(z, LABELS) for z in outputs["stage_fused_logits"]),
        rtol=1e-6,
    )
    assert set(terms) - {"rampup_weight"} == set(settings.active_terms())
    without = dict(terms)
    feat_free = float(total) - float(terms["feat"]) - float(terms["ce_stage_fused"])
    assert feat_free == pytest.approx(
        sum(
            float(v)
            for k, v in without.items()
            if k not in ("feat", "ce_stage_fused", "rampup_weight")
        ),
        rel=1e-5,
    )
