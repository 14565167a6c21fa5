"""SwitOKD: its terms and its switch against NumPy, which inputs get gradient, its settings'
checks, its preset, and a run that pauses the teacher and exports the student it reports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffcl_jax import datasets, export, methods, train
from ffcl_jax.errors import UserError
from ffcl_jax.methods.switokd import SwitOKD
from tests.conftest import tiny_config
from tests.helpers import numpy_reference as ref

RNG = np.random.default_rng(5)
LABELS = np.array([0, 3, 1, 2, 3])
Z_T, Z_S = (RNG.standard_normal((5, 4)) * 2 for _ in range(2))
TERMS = (
    "ce_teacher",
    "ce_student",
    "kl_student_to_teacher",
    "kl_teacher_to_student",
    "switch_gap",
    "switch_student_l1",
    "switch_teacher_l1",
    "switch_threshold",
)


def _terms(method, z_t=Z_T, z_s=Z_S):
    outputs = {"teacher_logits": jnp.asarray(z_t), "student_logits": jnp.asarray(z_s)}
    return method.loss(outputs, jnp.asarray(LABELS), jnp.asarray(0), 4)


def _l1(p, q):
    return float(np.mean(np.sum(np.abs(p - q), -1)))


@pytest.mark.parametrize("switch_tau", [1.0, 0.5])
def test_terms_and_threshold_match_numpy(switch_tau):
    method = methods.create("switokd", {"switch_tau": switch_tau, "tau": 2.0})
    total, terms = _terms(method)
    assert tuple(terms) == TERMS
    y = np.eye(4)[LABELS]
    p_t, p_s = ref.softmax(Z_T / switch_tau), ref.softmax(Z_S / switch_tau)
    d_s, d_t = _l1(p_s, y), _l1(p_t, y)
    want = {
        "ce_teacher": ref.cross_entropy(Z_T, LABELS),
        "ce_student": ref.cross_entropy(Z_S, LABELS),
        "kl_student_to_teacher": ref.kl(Z_T, Z_S, 2.0),
        "kl_teacher_to_student": ref.kl(Z_S, Z_T, 2.0),
        "switch_gap": _l1(p_t, p_s),
        "switch_student_l1": d_s,
        "switch_teacher_l1": d_t,
        "switch_threshold": d_s - np.exp(-d_t / (d_s + d_t)) * d_t,
    }
    for key, value in want.items():
        np.testing.assert_allclose(float(terms[key]), value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(total), sum(want[k] for k in TERMS[:4]), rtol=1e-5)


def _switch_terms(gap, d_s, d_t):
    return {
        "switch_gap": jnp.asarray(gap),
        "switch_student_l1": jnp.asarray(d_s),
        "switch_teacher_l1": jnp.asarray(d_t),
    }


@pytest.mark.parametrize(
    "gap, d_s, d_t, code_rule, paper_rule",
    [
        # delta = 1.6 - exp(-0.8/2.4) 0.8 = 1.0268: a gap past it with the teacher ahead pauses.
        (1.2, 1.6, 0.8, False, False),
        (0.9, 1.6, 0.8, True, True),  # gap under the threshold: learning mode
        # The student closer to the labels (d_S < d_T): delta = 0.8 - exp(-1.6/2.4) 1.6 < 0.1;
        # past it, only the paper's rule pauses the teacher (the code's extra condition).
        (0.5, 0.8, 1.6, True, False),
    ],
)
def test_the_switch_pauses_the_teacher_in_expert_mode(gap, d_s, d_t, code_rule, paper_rule):
    for require, want in ((True, code_rule), (False, paper_rule)):
        method = methods.create("switokd", {"require_teacher_ahead": require})
        updates = method.member_updates(_switch_terms(gap, d_s, d_t))
        assert set(updates) == {"teacher"}  # the student always learns
        assert bool(updates["teacher"]) is want, (require, gap, d_s, d_t)


def test_each_network_learns_from_its_own_terms_and_the_switch_takes_no_gradient():
    """Each KL term trains its student side only (the other network's logits are a target);
    the switch's quantities give neither network a gradient."""
    method = methods.create("switokd")

    def term(name):
        return lambda z_t, z_s: _terms(method, z_t, z_s)[1][name]

    z = (jnp.asarray(Z_T, jnp.float32), jnp.asarray(Z_S, jnp.float32))
    trains = {
        "ce_teacher": (True, False),
        "ce_student": (False, True),
        "kl_student_to_teacher": (True, False),
        "kl_teacher_to_student": (False, True),
    } | {name: (False, False) for name in TERMS[4:]}
    for name, (teacher, student) in trains.items():
        grads = jax.grad(term(name), (0, 1))(*z)
        for grad, want in zip(grads, (teacher, student), strict=True):
            assert bool(np.abs(np.asarray(grad)).max() > 1e-6) is want, name


def test_preset_defaults_are_the_authors_cifar100_script():
    method = methods.create("switokd")
    assert isinstance(method, SwitOKD)
    s = method.settings
    assert (s.tau, s.switch_tau, s.require_teacher_ahead, s.student_lr_scale) == (
        1.0,
        1.0,
        True,
        0.1,
    )
    assert method.learning_rate_scales() == {"student": 0.1}
    assert method.evaluated_names() == ["student", "teacher", "ensemble"]
    assert method.deployed == "student"
    # The protocol's compressed ramp-up does not give SwitOKD one.
    assert methods.create("switokd", None, protocol_rampup_epochs=1.0).settings.rampup_epochs == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tau": 0.0}, "loss.tau must be > 0"),
        ({"switch_tau": -1.0}, "loss.switch_tau must be > 0"),
        ({"student_lr_scale": 0.0}, "loss.student_lr_scale must be > 0"),
        ({"lam_mutual": 1.0}, "method 'switokd' has no setting loss.lam_mutual"),
    ],
)
def test_impossible_settings_fail_in_one_line(overrides, message):
    with pytest.raises(UserError) as info:
        methods.create("switokd", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_run_pauses_the_teacher_and_exports_the_student_it_reports(fmnist_dir, tmp_path):
    """On sharp switch distributions the teacher is paused for some steps (logged as
    `updates_teacher` < 1) and trains on others; the exported student predicts exactly the
    accuracy the run reports, as a plain zoo network."""
    config = tiny_config(
        fmnist_dir, method="switokd", train_examples=128, **{"loss.switch_tau": 0.2}
    )
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    last = results["history"][-1]
    assert set(last) >= {"student", "teacher", "ensemble"} and "fused" not in last
    assert results["loss_terms"] == list(TERMS)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row.get("kind") == "train"]
    fractions = [row["updates_teacher"] for row in train_rows]
    assert min(fractions) < 1.0 and max(fractions) > 0.0, fractions
    path = export.export_run(str(tmp_path / "run"), str(tmp_path / "student.npz"))
    _, predict, meta = export.load_exported(path)
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert accuracy == pytest.approx(last["student"], abs=1e-9)
    assert meta["roles"]["student"] == "resnet8"
