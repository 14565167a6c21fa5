"""FFSD (ffcl_jax/methods/ffsd.py): every loss term against NumPy written from the authors' code
(docs/baseline_sources/ffsd.md), which members each term trains, its optimizer groups, its
settings' checks, and a whole run whose exported leader predicts its reported accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import datasets, export, methods, train
from ffcl_jax.errors import UserError
from ffcl_jax.methods import ffsd
from tests.conftest import tiny_config
from tests.helpers import numpy_reference as ref

RNG = np.random.default_rng(3)
B = 3
LABELS = np.array([0, 4, 2])
STAGES = [(8, 8, 4), (4, 4, 8), (2, 2, 16)]


def _maps(shapes=STAGES):
    return [np.abs(RNG.standard_normal((B, *s))) for s in shapes]


LOGITS = {n: RNG.standard_normal((B, 5)) * 2 for n in ("teacher", "peer", "student", "fused")}
FEATURES = {n: _maps() for n in ("teacher", "peer", "student")}
EXTRA = {
    "fused_map": _maps([STAGES[-1]])[0],
    "trans_fusion_map": _maps([(2, 2, 32)])[0],
    "fusion_input": _maps([(2, 2, 32)])[0],
    "peer_sd_targets": _maps(STAGES[:-1]),
    "student_sd_targets": _maps(STAGES[:-1]),
    "decoder_peer_maps": _maps(STAGES[:-1]),
    "decoder_student_maps": _maps(STAGES[:-1]),
}


# ------------------------------------------------------------- NumPy, from CIFARTrainer.py


def _n(x):
    x = x.reshape(x.shape[0], -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _a(f):  # NHWC: the channel mean of squares
    return (f**2).mean(-1).reshape(f.shape[0], -1)


def _d(x, y):  # attention_loss / fusion_loss: normalise, mean of squares
    return float(np.mean((_n(x) - _n(y)) ** 2))


def _mirror(a, fraction=1 / 3):
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    a = _n(a)
    threshold = np.sort(a, axis=1)[:, int(a.shape[1] * fraction) - 1][:, None]
    return norm, a, (norm / 2 - a) * np.sign(a - threshold) + norm / 2


def _diversity(x, y):
    _, _, target = _mirror(_a(y))
    return float(np.mean((_n(_a(x)) - target) ** 2))


def _diversity_target(y):
    norm, a, target = _mirror(_a(y))
    return y + ((target - a) * norm / y.shape[-1]).reshape(*y.shape[:3], 1)


def _terms_numpy():
    z, f, e = LOGITS, FEATURES, EXTRA
    return {
        "ce_teacher": ref.cross_entropy(z["teacher"], LABELS),
        "ce_peer": ref.cross_entropy(z["peer"], LABELS),
        "ce_student": ref.cross_entropy(z["student"], LABELS),
        "ce_fused": ref.cross_entropy(z["fused"], LABELS),
        "kl_teacher": ref.kl(z["teacher"], z["peer"], 2.0),
        "kl_peer": ref.kl(z["peer"], z["teacher"], 2.0),
        "kl_fused": ref.kl(z["fused"], (z["teacher"] + z["peer"]) / 2, 2.0),
        "kl_student": ref.kl(z["student"], z["fused"], 2.0),
        "diversity": _diversity(f["peer"][-1], f["teacher"][-1]),
        "sd_peer": sum(_d(_a(f["peer"][k]), _a(e["peer_sd_targets"][k])) for k in (0, 1)),
        "at_fused_map": _d(_a(f["student"][-1]), _a(e["fused_map"])),
        "at_trans_fusion": _d(_a(e["trans_fusion_map"]), _a(e["fusion_input"])),
        "sd_student": sum(_d(_a(f["student"][k]), _a(e["student_sd_targets"][k])) for k in (0, 1)),
        "decoder_peer": sum(
            _d(e["decoder_peer_maps"][k], f["peer"][k])
            + _d(_a(e["decoder_peer_maps"][k]), _a(f["peer"][k]))
            for k in (0, 1)
        ),
        "decoder_student": sum(
            _d(e["decoder_student_maps"][k], f["student"][k])
            + _d(_a(e["decoder_student_maps"][k]), _a(f["student"][k]))
            for k in (0, 1)
        ),
    }


def _outputs():
    out = {f"{n}_logits": jnp.asarray(z, jnp.float32) for n, z in LOGITS.items()}
    out |= {f"{n}_features": [jnp.asarray(x, jnp.float32) for x in f] for n, f in FEATURES.items()}
    for key, value in EXTRA.items():
        out[key] = (
            [jnp.asarray(x, jnp.float32) for x in value]
            if isinstance(value, list)
            else jnp.asarray(value, jnp.float32)
        )
    return out


@pytest.mark.parametrize(
    "epoch, ramp", [(0, np.exp(-5 * 0.8**2)), (3, np.exp(-5 * 0.2**2)), (9, 1.0)]
)
def test_every_term_and_the_total_match_numpy(epoch, ramp):
    """The authors' terms, weights (1e-5, 10, 1000) and warm-up over epochs counted from 1."""
    method = methods.create("ffsd")
    total, terms = method.loss(_outputs(), jnp.asarray(LABELS), jnp.asarray(epoch), 5)
    expected = _terms_numpy()
    assert set(terms) == set(expected) | {"rampup_weight"}
    for name, value in expected.items():
        np.testing.assert_allclose(float(terms[name]), value, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(float(terms["rampup_weight"]), ramp, rtol=1e-6)
    plain = sum(v for k, v in expected.items() if k.startswith(("ce_", "kl_")))
    weighted = (
        1e-5 * (expected["diversity"] + expected["sd_peer"])
        + 10.0 * (expected["at_fused_map"] + expected["at_trans_fusion"] + expected["sd_student"])
        + 1000.0 * (expected["decoder_peer"] + expected["decoder_student"])
    )
    np.testing.assert_allclose(float(total), plain + ramp * weighted, rtol=2e-5)


def test_the_diversity_target_mirrors_the_strong_two_thirds():
    """Positions below the k-th smallest normalised attention (k = int(HW / 3)) keep it, the
    k-th goes to |a| / 2, the others to |a| - a."""
    for y in (FEATURES["teacher"][-1], FEATURES["teacher"][0]):
        got = ffsd.diversity_target(jnp.asarray(y, jnp.float32), 1 / 3)
        np.testing.assert_allclose(got, _diversity_target(y), rtol=1e-5, atol=1e-6)
    norm, a, target = _mirror(_a(FEATURES["teacher"][0]))  # 8 x 8: k = 21
    np.testing.assert_array_equal(np.sum(np.isclose(target, a), axis=1), [20] * B)
    np.testing.assert_array_equal(np.sum(np.isclose(target, norm / 2), axis=1), [1] * B)
    np.testing.assert_array_equal(np.sum(np.isclose(target, norm - a), axis=1), [43] * B)


# ------------------------------------------------------------- gradients


def _cohort():
    method = methods.create("ffsd")
    config = ml_collections.ConfigDict({"teacher": "resnet14", "student": "resnet8"})
    return method, methods.Cohort(method.build_members(config, 5, 1, None, nnx.Rngs(0)))


TRAINS = {
    "ce_teacher": {"teacher"},
    "kl_teacher": {"teacher"},
    "ce_peer": {"peer"},
    "kl_peer": {"peer"},
    "diversity": {"peer"},
    "sd_peer": {"peer"},
    "ce_fused": {"fusion"},  # the fusion module's input is detached
    "kl_fused": {"fusion"},
    "ce_student": {"student"},
    "kl_student": {"student"},
    "at_fused_map": {"student"},
    "at_trans_fusion": {"student", "trans_fusion"},
    "sd_student": {"student"},  # the decoder in inference mode makes targets only
    "decoder_peer": {"decoder_peer"},  # on the peer's detached maps
    "decoder_student": {"decoder_student"},
}


@pytest.mark.slow
def test_each_term_trains_only_its_members():
    """Every target is stopped as in the authors' code: the gradient of each term reaches the
    members listed in TRAINS and no other."""
    method, cohort = _cohort()
    graphdef, params, stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)
    images = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    labels = jnp.asarray([0, 1, 2, 3])

    def terms_of(params):
        model = nnx.merge(graphdef, params, stats, copy=True)
        _, terms = method.loss(method.forward(model, images, train=True), labels, 9, 5)
        return {k: v for k, v in terms.items() if k != "rampup_weight"}

    jacobian = jax.jacrev(terms_of)(params)
    assert set(jacobian) == set(TRAINS)
    for term, grads in jacobian.items():
        moved = {
            m for m in grads if any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[m]))
        }
        assert moved == TRAINS[term], term


# ------------------------------------------------------------- members, groups, settings


def test_members_groups_and_evaluated_models(fmnist_dir):
    config = tiny_config(fmnist_dir, method="ffsd")
    method = train.check_config(config, 1)
    assert method.networks(config) == {
        "student": "resnet8",
        "teacher": "resnet8",
        "peer": "resnet8",
    }
    groups = method.optimizer_groups(config)
    assert groups["decoders"].optimizer == "adam"
    assert groups["decoders"].learning_rate == 1e-3
    assert groups["decoders"].weight_decay == config.weight_decay
    assert groups["fusion_side"].weight_decay == config.fusion_weight_decay
    expected = {
        "teacher": "members",
        "peer": "members",
        "student": "members",
        "trans_fusion": "members",  # part of the authors' leader network
        "fusion": "fusion_side",
        "decoder_peer": "decoders",
        "decoder_student": "decoders",
    }
    assert {m: method.optimizer_group(m) for m in expected} == expected
    outputs = {f"{n}_logits": jnp.asarray(z) for n, z in LOGITS.items()}
    evaluated = method.evaluated(outputs)
    assert list(evaluated) == method.evaluated_names()
    np.testing.assert_array_equal(evaluated["student"], LOGITS["student"].astype(np.float32))
    np.testing.assert_allclose(
        evaluated["ensemble"], (LOGITS["teacher"] + LOGITS["peer"]) / 2, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lam_fusion": -1.0}, "loss.lam_fusion must be >= 0"),
        ({"lam_diversity": -1.0}, "loss.lam_diversity must be >= 0"),
        ({"decoder_learning_rate": 0.0}, "loss.decoder_learning_rate must be > 0"),
        ({"diversity_fraction": 1.0}, "loss.diversity_fraction must be in (0, 1)"),
        ({"rampup_epoch_offset": -1.0}, "loss.rampup_epoch_offset must be >= 0"),
        ({"tau": 0.0}, "loss.tau"),
        ({"use_fusion": True}, "method 'ffsd' has no setting loss.use_fusion"),
    ],
)
def test_impossible_settings_fail_in_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        methods.create("ffsd", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_a_teacher_with_other_last_channels_is_one_clear_error(fmnist_dir):
    config = tiny_config(fmnist_dir, method="ffsd", teacher="wrn_16_2")
    method = train.check_config(config, 1)
    with pytest.raises(UserError, match="choose a teacher whose last stage has the student's") as e:
        train.build(config, method, 2)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_a_run_reports_and_exports_the_leader(fmnist_dir, tmp_path):
    """Two epochs of FFSD: every model is evaluated, and the exported `student` (the leader, a
    plain ResNet-8) predicts the test set exactly as the run reported."""
    workdir = tmp_path / "run"
    config = tiny_config(fmnist_dir, method="ffsd", train_examples=128)
    results = train.train_and_evaluate(config, str(workdir))
    last = results["history"][-1]
    assert {"student", "teacher", "peer", "ensemble", "fused"} <= set(last)
    path = export.export_run(str(workdir), str(tmp_path / "leader.npz"))
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    _, predict, meta = export.load_exported(path, "student")
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert accuracy == pytest.approx(last["student"], abs=1e-9)
    assert meta["roles"] == {"student": "resnet8"} and meta["config"]["method"] == "ffsd"
