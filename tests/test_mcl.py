"""MCL (ffcl_jax/methods/mcl.py): each term against NumPy written from the authors' formulas,
which inputs the soft terms' gradients reach, one-line errors for bad settings, its
class-balanced batches, the models it evaluates, and a run whose exported student predicts its
reported accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import datasets, export, losses, methods, train
from ffcl_jax.errors import UserError
from ffcl_jax.methods import mcl
from tests.conftest import tiny_config
from tests.helpers import numpy_reference as ref

B, D = 8, 5
LABELS = np.array([0, 0, 3, 3, 1, 1, 2, 2])  # 4 classes x 2 images, as the sampler gives


def _embeddings(seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(2, B, D))
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    return {"teacher": e[0], "student": e[1]}


def _np_contrast(s, labels):
    """The authors' masked SupCon (losses/cifar_sup_mcl_loss.py:41-44), with the anchors that
    have no positive left out of the mean."""
    eye = np.eye(len(labels))
    positives = (labels[:, None] == labels[None, :]) - eye
    log_prob = s - np.log((np.exp(s) * (1 - eye)).sum(1, keepdims=True))
    count = positives.sum(1)
    keep = count > 0
    return -np.mean((positives * log_prob).sum(1)[keep] / count[keep])


def _np_terms(e, labels, tau_c=0.1, tau=3.0):
    s = {
        a + b: e[x] @ e[y].T / tau_c
        for a, x in (("t", "teacher"), ("s", "student"))
        for b, y in (("t", "teacher"), ("s", "student"))
    }
    return {
        "vcl": _np_contrast(s["tt"], labels) + _np_contrast(s["ss"], labels),
        "soft_vcl": ref.kl(s["tt"], s["ss"], tau) + ref.kl(s["ss"], s["tt"], tau),
        "icl": _np_contrast(s["ts"], labels) + _np_contrast(s["st"], labels),
        "soft_icl": ref.kl(s["ts"], s["st"], tau) + ref.kl(s["st"], s["ts"], tau),
    }


@pytest.mark.parametrize(
    "labels", [LABELS, np.array([0, 0, 3, 3, 1, 1, 2, 4])], ids=["balanced", "singletons"]
)
def test_each_term_matches_numpy(labels):
    with jax.enable_x64(True):
        e = _embeddings()
        jax_e = {k: jnp.asarray(v) for k, v in e.items()}
        terms = mcl.mcl_terms(jax_e, jnp.asarray(labels), mcl.MCLSettings())
        expected = _np_terms(e, labels)
        assert set(terms) == set(expected)
        for key, value in expected.items():
            assert float(terms[key]) == pytest.approx(value, rel=1e-12), key


def test_the_total_weighs_the_terms_with_the_authors_script_values():
    method = methods.create("mcl")
    s = method.settings
    assert (s.lam_vcl, s.lam_soft_vcl, s.lam_icl, s.lam_soft_icl) == (0.1, 1.0, 0.1, 1.0)
    assert (s.contrast_tau, s.tau, s.embed_dim, s.rampup_epochs) == (0.1, 3.0, 128, 0.0)
    rng = np.random.default_rng(1)
    outputs = {
        "teacher_logits": jnp.asarray(rng.normal(size=(B, 4)), jnp.float32),
        "student_logits": jnp.asarray(rng.normal(size=(B, 4)), jnp.float32),
        "embeddings": {k: jnp.asarray(v, jnp.float32) for k, v in _embeddings(2).items()},
    }
    labels = jnp.asarray(LABELS)
    total, terms = method.loss(outputs, labels, jnp.asarray(0.0), 4)
    expected = (
        terms["ce_teacher"]
        + terms["ce_student"]
        + 0.1 * terms["vcl"]
        + terms["soft_vcl"]
        + 0.1 * terms["icl"]
        + terms["soft_icl"]
    )
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["rampup_weight"]) == 1.0
    # A zero weight drops its term from the objective and the log.
    _, fewer = methods.create("mcl", {"lam_icl": 0.0}).loss(outputs, labels, jnp.asarray(0.0), 4)
    assert "icl" not in fewer and "soft_icl" in fewer


def test_soft_terms_teach_with_detached_targets_and_reach_both_networks():
    """soft VCL: network i's self-similarity rows learn from network j's, stopped; soft ICL: the
    taught S_TS holds both networks' embeddings, so both get gradient even though each target
    is stopped. The gradient equals that of the same terms with the targets as constants."""
    with jax.enable_x64(True):
        e = {k: jnp.asarray(v) for k, v in _embeddings(3).items()}
        labels = jnp.asarray(LABELS)
        settings = mcl.MCLSettings()

        def term(name):
            return lambda emb: mcl.mcl_terms(emb, labels, settings)[name]

        t0, s0 = e["teacher"], e["student"]
        const = {k: jax.lax.stop_gradient(v) for k, v in mcl.similarities(e, 0.1).items()}

        def soft_vcl_by_hand(emb):
            t, s = emb["teacher"], emb["student"]
            return losses.kl_to_learned_target(t @ t.T / 0.1, const["ss"], 3.0) + (
                losses.kl_to_learned_target(s @ s.T / 0.1, const["tt"], 3.0)
            )

        def soft_icl_by_hand(emb):
            t, s = emb["teacher"], emb["student"]
            return losses.kl_to_learned_target(t @ s.T / 0.1, const["st"], 3.0) + (
                losses.kl_to_learned_target(s @ t.T / 0.1, const["ts"], 3.0)
            )

        for name, by_hand in (("soft_vcl", soft_vcl_by_hand), ("soft_icl", soft_icl_by_hand)):
            got, want = jax.grad(term(name))(e), jax.grad(by_hand)(e)
            for member in ("teacher", "student"):
                np.testing.assert_allclose(got[member], want[member], rtol=1e-10, atol=1e-14)
                assert np.abs(np.asarray(got[member])).max() > 1e-6, (name, member)
        # Soft VCL: the teacher's part reaches the teacher alone.
        only_teacher = jax.grad(
            lambda emb: losses.kl_distill(
                emb["teacher"] @ emb["teacher"].T / 0.1,
                emb["student"] @ emb["student"].T / 0.1,
                3.0,
            )
        )({"teacher": t0, "student": s0})
        np.testing.assert_array_equal(only_teacher["student"], 0.0)


def _cohort(**settings):
    method = methods.create("mcl", settings)
    config = ml_collections.ConfigDict({"teacher": "resnet14", "student": "resnet8"})
    return method, methods.Cohort(method.build_members(config, 10, 1, None, nnx.Rngs(0)))


@pytest.mark.slow
def test_heads_embed_the_pooled_last_stage_and_train_only_through_the_contrastive_terms():
    method, cohort = _cohort()
    assert cohort.member_names == ("teacher", "student", "teacher_embed", "student_embed")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    out = method.forward(cohort, images, train=True)
    for name in ("teacher", "student"):
        e = np.asarray(out["embeddings"][name])
        assert e.shape == (8, 128)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
    assert "embeddings" not in method.forward(cohort, images, train=False)
    graphdef, params, rest = nnx.split(cohort, nnx.Param, ...)

    def head_grads(method):
        def total(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            return method.loss(
                method.forward(model, images, train=True), jnp.asarray(LABELS), jnp.asarray(0.0), 10
            )[0]

        g = jax.grad(total)(params)
        return [
            np.abs(np.asarray(x)).max()
            for m in ("teacher_embed", "student_embed")
            for x in jax.tree.leaves(g[m])
        ]

    assert min(head_grads(method)) > 0
    off = methods.create("mcl", {k: 0.0 for k in mcl.WEIGHTS})
    assert max(head_grads(off)) == 0


def test_it_evaluates_the_pair_and_deploys_the_student():
    method = methods.create("mcl")
    assert method.evaluated_names() == ["student", "teacher", "ensemble"]
    assert method.deployed == "student" and method.fusion_side_members == ()
    assert method.networks(ml_collections.ConfigDict({"teacher": "a", "student": "b"})) == {
        "teacher": "a",
        "student": "b",
    }


@pytest.mark.parametrize(
    "batch, classes, configured, expected",
    [
        (128, 100, None, 2),
        (128, 10, None, 16),
        (32, 10, None, 4),
        (128, 10, 32, 32),
        (128, 100, 0, 0),
    ],
)
def test_class_balanced_batches_by_default(batch, classes, configured, expected):
    """The authors' 64 classes x 2 on CIFAR-100; on fewer classes the fewest images a class
    that fit; `config.images_per_class` overrides (0: shuffled batches)."""
    config = ml_collections.ConfigDict({"batch_size": batch, "images_per_class": configured})
    assert methods.create("mcl").images_per_class(config, classes) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lam_soft_icl": -1.0}, "loss.lam_soft_icl must be >= 0, got -1.0"),
        ({"contrast_tau": 0.0}, "loss.contrast_tau must be > 0, got 0.0"),
        ({"tau": -3.0}, "loss.tau must be > 0"),
        ({"embed_dim": 0}, "loss.embed_dim must be >= 1, got 0"),
        ({"num_branches": 3}, "method 'mcl' has no setting loss.num_branches"),
    ],
)
def test_bad_settings_fail_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        methods.create("mcl", overrides)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_run_trains_on_balanced_batches_and_exports_its_student(fmnist_dir, tmp_path):
    config = tiny_config(fmnist_dir, method="mcl", train_examples=128)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["loss_terms"] == [
        "ce_teacher",
        "ce_student",
        "vcl",
        "soft_vcl",
        "icl",
        "soft_icl",
    ]
    last = results["history"][-1]
    assert set(last) >= {"student", "teacher", "ensemble"}
    path = export.export_run(str(tmp_path / "run"), str(tmp_path / "student.npz"))
    model, predict, meta = export.load_exported(path)
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert accuracy == pytest.approx(last["student"], abs=1e-9)
    assert meta["roles"]["student"] == "resnet8"
    assert results["num_params"]["student"] == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
