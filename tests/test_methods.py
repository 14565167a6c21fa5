"""The method registry and the teacher/student pair's objective (independent, dml, ffl, ffcl):
presets turn on the right terms; the objective combines them as the spec says; bad settings,
and settings a method does not have, fail with clear errors; no gradient reaches a
distillation target through the full objective."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffcl_jax import config_base, losses, methods, train
from ffcl_jax.errors import UserError
from ffcl_jax.methods.branches import BranchSettings
from ffcl_jax.methods.ffsd import FFSDSettings
from ffcl_jax.methods.kd import KDSettings
from ffcl_jax.methods.kdcl import KDCLSettings
from ffcl_jax.methods.mcl import MCLSettings
from ffcl_jax.methods.pair import PairSettings, fused_feature_stages, taught_stages
from ffcl_jax.methods.pcl import PCLSettings
from ffcl_jax.methods.switokd import SwitOKDSettings
from tests.conftest import tiny_config

K = 5

SETTINGS_OF = {
    "independent": PairSettings,
    "kd": KDSettings,
    "dml": PairSettings,
    "ffl": PairSettings,
    "ffcl": PairSettings,
    "kdcl": KDCLSettings,
    "one": BranchSettings,
    "cl_ilr": BranchSettings,
    "okddip": BranchSettings,
    "pcl": PCLSettings,
    "mcl": MCLSettings,
    "switokd": SwitOKDSettings,
    "ffsd": FFSDSettings,
}


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


def objective_terms(method, epoch=0):
    """The names of the terms `method`'s objective computes on `fake_outputs`, in its order."""
    outputs = fake_outputs()
    if not method.settings.use_fusion:
        outputs.pop("fused_logits")
    _, terms = method.loss(outputs, LABELS, jnp.asarray(epoch), K)
    return tuple(t for t in terms if t != "rampup_weight")


def logged_terms(name, overrides=None):
    """The terms a run logs (`Setup.loss_terms`): read off the objective of a real cohort."""
    method = methods.create(name, overrides)
    setup, _ = train.build(tiny_config("unused", method=name), method, steps_per_epoch=1)
    return setup.loss_terms


@pytest.mark.parametrize(
    "name, expected",
    [
        # The fast tier keeps FFCL, whose objective holds every term of the others.
        pytest.param("independent", ("ce_teacher", "ce_student"), marks=pytest.mark.slow),
        pytest.param("dml", ("ce_teacher", "ce_student", "kl_mutual"), marks=pytest.mark.slow),
        pytest.param(
            "ffl",
            ("ce_teacher", "ce_student", "ce_fused", "kl_fused_to_peers", "kl_ensemble_to_fused"),
            marks=pytest.mark.slow,
        ),
        (
            "ffcl",
            (
                "ce_teacher",
                "ce_student",
                "ce_fused",
                "kl_fused_to_peers",
                "kl_ensemble_to_fused",
                "kl_mutual",
                "feat",
                "reg",
            ),
        ),
    ],
)
def test_preset_terms(name, expected):
    method = methods.create(name)
    assert objective_terms(method) == expected
    # What a run logs: the same terms in the same order, traced through the real cohort.
    assert logged_terms(name) == expected


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
    full = set(objective_terms(methods.create("ffcl")))
    ablated = set(objective_terms(methods.create("ffcl", override)))
    assert full - ablated == {dropped}
    assert ablated < full


def test_none_overrides_keep_the_preset():
    ffcl = methods.create("ffcl", {"tau": None, "lam_feat": None})
    assert ffcl.settings == methods.create("ffcl").settings
    # None means "unset": a key the method does not have is ignored when it is None.
    kd = methods.create("kd", {"lam_feat": None, "num_branches": None, "tau": None})
    assert kd.settings == KDSettings()


def test_a_config_with_no_loss_overrides_resolves_every_method_to_its_preset():
    loss = dict(config_base.base_config().loss)
    assert all(value is None for value in loss.values())
    for name in methods.REGISTRY:
        assert methods.create(name, loss).settings == methods.create(name).settings


@pytest.mark.parametrize("epoch", [0, 40, 100])
def test_total_is_the_weighted_sum_of_the_spec(epoch):
    method = methods.create(
        "ffcl",
        {"lam_fuse": 0.5, "lam_ens": 2.0, "lam_mutual": 0.3, "lam_feat": 4.0, "lam_reg": 0.7},
    )
    outputs = fake_outputs()
    total, terms = method.loss(outputs, LABELS, jnp.asarray(epoch), K)
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


def _term_grads(method, term):
    outputs = fake_outputs()
    return jax.grad(lambda o: method.loss(o, LABELS, jnp.asarray(100), K)[1][term])(outputs)


def _max_abs(tree):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def test_no_gradient_into_any_distillation_target():
    ffcl = methods.create("ffcl")
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
    "name, overrides, message",
    [
        ("fml", {}, "unknown method 'fml'; valid methods: independent, kd, dml, ffl, ffcl"),
        ("kd", {"lam_mutual": 1.0}, "method 'kd' has no setting loss.lam_mutual"),
        ("kd", {"kd_alpha": 1.5}, "loss.kd_alpha must be in [0, 1]"),
        ("kd", {"train_teacher": True}, "method 'kd' has no setting loss.train_teacher"),
        ("ffcl", {"lam_fusion": 1.0}, "method 'ffcl' has no setting loss.lam_fusion"),
        ("ffcl", {"lam_feat": -1.0}, "loss.lam_feat must be >= 0"),
        ("ffcl", {"tau": 0.0}, "loss.tau must be > 0"),
        ("ffcl", {"rampup_epochs": -1.0}, "loss.rampup_epochs must be >= 0"),
        ("dml", {"lam_fuse": 1.0}, "need the fusion module"),
        ("ffcl", {"regularizer": "dropout"}, "unknown loss.regularizer 'dropout'"),
        ("ffcl", {"feat_direction": "student_to_teacher"}, "unknown loss.feat_direction"),
        ("ffcl", {"reg_correct_prob": 1.5}, "loss.reg_correct_prob must be in (0, 1)"),
        ("ffcl", {"reg_temperature": 0.0}, "loss.reg_temperature must be > 0"),
        ("ffcl", {"label_smoothing": 1.0}, "loss.label_smoothing must be in [0, 1)"),
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
def test_bad_settings_fail_clearly(name, overrides, message):
    with pytest.raises(UserError) as info:
        methods.create(name, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_setting_kd_does_not_have_names_kd_and_its_settings():
    with pytest.raises(UserError) as info:
        methods.create("kd", {"lam_feat": 1.0})
    assert str(info.value) == (
        "method 'kd' has no setting loss.lam_feat; its settings: kd_alpha, rampup_epochs, tau "
        "(leave the others unset)"
    )


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("one", "use_fusion", True),  # a pair's setting on a branch method
        ("dml", "gate", "one"),  # a branch method's setting on a pair
        ("kdcl", "use_fusion", True),
        ("ffl", "separate_views", True),  # only KDCL and the branch methods have views
        ("independent", "kd_alpha", 0.5),
        ("one", "temporal_mean_decay", 0.99),  # PCL's own settings
        ("cl_ilr", "lam_temporal_kd", 1.0),
        ("pcl", "lam_mutual", 1.0),
        ("kd", "collaborative_target", "mean"),
    ],
)
def test_a_setting_the_method_does_not_have_names_the_method_and_its_settings(name, key, value):
    with pytest.raises(UserError) as info:
        methods.create(name, {key: value})
    message = str(info.value)
    prefix = f"method {name!r} has no setting loss.{key}; its settings: "
    assert message.startswith(prefix) and "\n" not in message
    listed = message[len(prefix) :].removesuffix(" (leave the others unset)").split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(SETTINGS_OF[name]))
    assert key not in listed


def test_a_config_setting_the_method_does_not_have_fails_the_config_check():
    config = tiny_config("unused", method="one", **{"loss.use_fusion": True})
    with pytest.raises(UserError, match="method 'one' has no setting loss.use_fusion"):
        train.check_config(config, 1)


def test_every_registered_method_resolves_with_its_defaults():
    assert list(methods.REGISTRY) == list(SETTINGS_OF)
    views = {"kdcl": 2, "pcl": 3}
    for name, cls in methods.REGISTRY.items():
        method = methods.create(name)
        assert type(method) is cls and method.name == name
        assert type(method.settings) is SETTINGS_OF[name]
        assert method.settings_dict() == dataclasses.asdict(method.settings)
        assert method.num_views == views.get(name, 1)
        assert method.deployed == "student"
        assert method.evaluated_names()[0] == "student"
        with pytest.raises(dataclasses.FrozenInstanceError):
            method.settings.tau = 2.0
        # Every setting it lists can be given back to it (what a checkpoint's config holds).
        assert methods.create(name, method.settings_dict()).settings == method.settings
    assert methods.create("kd").frozen_members == ("teacher",)
    assert methods.create("ffcl").fusion_side_members == ("fusion", "fused_knowledge")


def test_the_config_loss_keys_are_the_settings_of_the_methods():
    """Every `config.loss` key is some method's setting and every setting can be set."""
    keys = set(config_base.base_config().loss)
    fields = {f.name for cls in SETTINGS_OF.values() for f in dataclasses.fields(cls)}
    assert keys == fields


def test_feature_forms_choose_their_stages_and_terms():
    attention = methods.create("ffcl", {"feat_stages": (2, 0)}).settings
    assert taught_stages(attention, 3) == (2, 0)
    assert fused_feature_stages(attention, 3) is None  # attention needs no extra modules
    fused_map = methods.create("ffcl", {"feat_form": "fused_map"}).settings
    assert taught_stages(fused_map, 3) == (2,)
    assert fused_feature_stages(fused_map, 3) == (2,)
    every = methods.create("ffcl", {"feat_form": "stage_fusion"}).settings
    assert fused_feature_stages(every, 3) == (0, 1, 2)
    assert "ce_stage_fused" in logged_terms("ffcl", {"feat_form": "stage_fusion"})
    # The last stage's fused map is the fusion module's own: no stage fusion module to train.
    last_only = {"feat_form": "stage_fusion", "feat_stages": (2,)}
    assert "ce_stage_fused" not in logged_terms("ffcl", last_only)
    assert "feat" in logged_terms("ffcl", last_only)
    off = methods.create("ffcl", {"feat_form": "stage_fusion", "lam_feat": 0.0})
    assert fused_feature_stages(off.settings, 3) is None and "feat" not in objective_terms(off)


def test_fused_feature_objective_is_the_sum_of_the_stage_distances():
    method = methods.create("ffcl", {"feat_form": "stage_fusion", "rampup_epochs": 0.0})
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
    total, terms = method.loss(outputs, LABELS, 0, K)
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
    assert tuple(terms) == (
        "ce_teacher",
        "ce_student",
        "ce_fused",
        "ce_stage_fused",
        "kl_fused_to_peers",
        "kl_ensemble_to_fused",
        "kl_mutual",
        "feat",
        "reg",
        "rampup_weight",
    )
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


@pytest.mark.parametrize(
    "name, expected",
    [("ffcl", 1.0), ("ffl", 1.0), ("one", 1.0), ("pcl", 1.0)]
    + [("dml", 0.0), ("independent", 0.0), ("kdcl", 0.0), ("kd", 0.0)],
)
def test_a_protocols_ramp_up_scales_only_the_ramps_that_exist(name, expected):
    assert methods.create(name, {}, protocol_rampup_epochs=1.0).settings.rampup_epochs == expected
    # loss.rampup_epochs still decides for the method a run trains.
    overridden = methods.create(name, {"rampup_epochs": 2.0}, protocol_rampup_epochs=1.0)
    assert overridden.settings.rampup_epochs == 2.0


def test_the_fashion_mnist_protocol_gives_dml_and_kdcl_no_ramp_up():
    from configs.fashion_mnist import get_config

    for name, expected in (("ffcl", 1.0), ("dml", 0.0), ("kdcl", 0.0), ("okddip", 1.0)):
        config = get_config()
        config.method = name
        assert train.check_config(config, 1).settings.rampup_epochs == expected, name
