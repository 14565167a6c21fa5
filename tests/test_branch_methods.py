"""The branch methods (ONE, CL-ILR, OKDDip; PCL's own terms are in test_kdcl_pcl.py): their loss
terms against NumPy, which tensors the KL terms leave untrained, presets, and a whole run whose
exported student is the plain network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import datasets, export, losses, methods, train
from ffcl_jax.errors import UserError
from tests.conftest import tiny_config
from tests.helpers import numpy_reference as ref

RNG = np.random.default_rng(0)
LOGITS = [RNG.standard_normal((5, 4)) * 2 for _ in range(3)]
GATE = RNG.dirichlet(np.ones(3), size=5)
LABELS = np.array([0, 3, 1, 2, 3])
PEER_LOGITS = [RNG.standard_normal((5, 4)) * 2 for _ in range(4)]  # leader, 3 peers
ATTENTION = RNG.dirichlet(np.ones(3), size=(5, 3))  # batch, peer, peer (rows sum to 1)


def test_branch_ensemble_and_mean_of_others_match_numpy():
    gated = losses.branch_ensemble([jnp.asarray(z) for z in LOGITS], jnp.asarray(GATE))
    np.testing.assert_allclose(gated, sum(GATE[:, [i]] * LOGITS[i] for i in range(3)), atol=1e-6)
    mean = losses.branch_ensemble([jnp.asarray(z) for z in LOGITS])
    np.testing.assert_allclose(mean, sum(LOGITS) / 3, atol=1e-6)
    others = losses.mean_of_others([jnp.asarray(z) for z in LOGITS])
    for i in range(3):
        expected = sum(LOGITS[j] for j in range(3) if j != i) / 2
        np.testing.assert_allclose(others[i], expected, rtol=1e-5, atol=1e-6)


def _objective(name, epoch, **overrides):
    method = methods.create(name, overrides)
    settings = method.settings
    logits = PEER_LOGITS if name == "okddip" else LOGITS
    outputs = {"branch_logits": [jnp.asarray(z, jnp.float32) for z in logits]}
    if settings.gate == "one":
        outputs["gate_weights"] = jnp.asarray(GATE, jnp.float32)
    if settings.branch_target == "attention":
        outputs["peer_attention"] = jnp.asarray(ATTENTION, jnp.float32)
    total, terms = method.loss(outputs, jnp.asarray(LABELS), jnp.asarray(epoch), 4)
    return settings, float(total), terms


@pytest.mark.parametrize("method", ["one", "cl_ilr"])
def test_objective_matches_numpy(method):
    settings, total, terms = _objective(method, epoch=20)
    tau, ramp = settings.tau, np.exp(-5 * (1 - 20 / settings.rampup_epochs) ** 2)
    ce = sum(ref.cross_entropy(z, LABELS) for z in LOGITS)
    if method == "one":
        ensemble = sum(GATE[:, [i]] * LOGITS[i] for i in range(3))
        targets = [ensemble] * 3
        expected = ce + ref.cross_entropy(ensemble, LABELS)
        assert tuple(terms) == ("ce_branches", "ce_ensemble", "kl_to_branches", "rampup_weight")
    else:
        targets = [sum(LOGITS[j] for j in range(3) if j != i) / 2 for i in range(3)]
        expected = ce
        assert tuple(terms) == ("ce_branches", "kl_to_branches", "rampup_weight")
    kl = sum(ref.kl(z, t, tau) for z, t in zip(LOGITS, targets, strict=True))
    np.testing.assert_allclose(float(terms["kl_to_branches"]), kl, rtol=1e-5)
    np.testing.assert_allclose(total, expected + ramp * kl, rtol=1e-5)
    np.testing.assert_allclose(float(terms["rampup_weight"]), ramp, rtol=1e-5)


def test_okddip_objective_matches_numpy():
    settings, total, terms = _objective("okddip", epoch=100)  # past the ramp-up: w = 1
    leader, peers = PEER_LOGITS[0], PEER_LOGITS[1:]
    mixes = [np.einsum("bq,qbc->bc", ATTENTION[:, a], np.stack(peers)) for a in range(3)]
    kl = sum(ref.kl(z, t, settings.tau) for z, t in zip(peers, mixes, strict=True))
    kl += ref.kl(leader, sum(peers) / 3, settings.tau)
    np.testing.assert_allclose(float(terms["kl_to_branches"]), kl, rtol=1e-5)
    np.testing.assert_allclose(
        total, sum(ref.cross_entropy(z, LABELS) for z in PEER_LOGITS) + kl, rtol=1e-5
    )
    assert tuple(terms) == ("ce_branches", "kl_to_branches", "rampup_weight")


def test_okddip_attention_learns_from_its_targets_and_the_peers_do_not_through_them():
    """The attention is trained by the peers' KL terms alone (as in the authors' code, or it
    would stay at its initialisation); a peer's logits reach no other peer through a target."""
    peers = [jnp.asarray(z, jnp.float32) for z in PEER_LOGITS[1:]]

    def first_peer_kl(attention, peers):
        target = losses.attention_targets(peers, attention)[0]
        return losses.kl_to_learned_target(peers[0], target, 3.0)

    attention_gradient, peer_gradients = jax.grad(first_peer_kl, (0, 1))(
        jnp.asarray(ATTENTION, jnp.float32), peers
    )
    assert np.abs(np.asarray(attention_gradient[:, 0])).max() > 1e-4  # row 0 mixes peer 0's target
    np.testing.assert_array_equal(attention_gradient[:, 1:], 0.0)
    assert np.abs(np.asarray(peer_gradients[0])).max() > 0
    for g in peer_gradients[1:]:
        np.testing.assert_array_equal(g, 0.0)


def test_the_targets_take_no_gradient_from_the_kl_terms():
    """ONE: the gated ensemble teaches the branches, so the KL term must not train the gate nor
    pull a branch through the ensemble; CL-ILR: branch i's KL reaches no other branch."""

    def kl_one(gate, branch_logits):
        ensemble = losses.branch_ensemble(branch_logits, gate)
        return sum(losses.kl_distill(z, ensemble, 3.0) for z in branch_logits)

    branch_logits = [jnp.asarray(z, jnp.float32) for z in LOGITS]
    gate_gradient, branch_gradients = jax.grad(kl_one, (0, 1))(jnp.asarray(GATE), branch_logits)
    np.testing.assert_array_equal(gate_gradient, 0.0)
    # Each branch's gradient is its own KL's only (what it would be with a constant target).
    ensemble = np.asarray(losses.branch_ensemble(branch_logits, jnp.asarray(GATE)))
    for z, got in zip(branch_logits, branch_gradients, strict=True):
        want = jax.grad(lambda z: losses.kl_distill(z, jnp.asarray(ensemble), 3.0))(z)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    def kl_of_first(branch_logits):
        return losses.kl_distill(branch_logits[0], losses.mean_of_others(branch_logits)[0], 3.0)

    gradients = jax.grad(kl_of_first)(branch_logits)
    assert np.abs(np.asarray(gradients[0])).max() > 0
    for g in gradients[1:]:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("one", {"num_branches": 1}, "loss.num_branches must be >= 2, got 1"),
        ("one", {"gate": "attention"}, "unknown loss.gate 'attention'"),
        ("one", {"branch_stages": 3}, "loss.gate='one' reads the shared trunk"),
        ("one", {"branch_stages": 0}, "loss.branch_stages must be in 1..3, got 0"),
        ("one", {"lam_branch_kd": -1.0}, "loss.lam_ensemble_ce and loss.lam_branch_kd must be"),
        ("one", {"tau": 0.0}, "loss.tau must be > 0"),
        ("one", {"lam_mutual": 1.0}, "method 'one' has no setting loss.lam_mutual"),
        ("dml", {"gate": "one"}, "method 'dml' has no setting loss.gate"),
        ("okddip", {"num_branches": 2}, "'attention' needs loss.num_branches >= 3"),
        ("cl_ilr", {"branch_target": "self"}, "unknown loss.branch_target 'self'"),
    ],
)
def test_branch_settings_are_checked(name, overrides, message):
    with pytest.raises(UserError) as info:
        methods.create(name, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_branch_presets():
    one, cl_ilr, okddip = (methods.create(n).settings for n in ("one", "cl_ilr", "okddip"))
    assert (one.num_branches, one.gate, one.lam_ensemble_ce, one.branch_target) == (
        3,
        "one",
        1.0,
        "ensemble",
    )
    assert (cl_ilr.num_branches, cl_ilr.backprop_rescale, cl_ilr.branch_target) == (
        4,
        True,
        "others",
    )
    assert (cl_ilr.gate, cl_ilr.lam_ensemble_ce) == ("none", 0.0)
    assert (okddip.num_branches, okddip.branch_target, okddip.gate) == (4, "attention", "none")
    for s in (one, cl_ilr, okddip):
        assert (s.tau, s.rampup_epochs, s.branch_stages, s.lam_branch_kd) == (3.0, 80.0, 1, 1.0)
        assert not (s.separate_views or s.peer_ensemble)
    assert methods.create("okddip").evaluated_names() == [
        "student",
        "ensemble",
        "branch_1",
        "branch_2",
        "branch_3",
    ]


LOGGED_TERMS = {
    "one": ("ce_branches", "ce_ensemble", "kl_to_branches"),
    "cl_ilr": ("ce_branches", "kl_to_branches"),
    "okddip": ("ce_branches", "kl_to_branches"),
    "pcl": ("ce_branches", "ce_ensemble", "kl_to_branches", "kl_temporal_mean"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LOGGED_TERMS))
def test_a_branch_run_exports_its_student_as_the_plain_network(method, fmnist_dir, tmp_path):
    """The student a run reports (for PCL, the temporal mean's branch 0) is what `export`
    writes: a plain zoo network that predicts exactly the reported accuracy."""
    config = tiny_config(fmnist_dir, method=method, train_examples=128)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    last = results["history"][-1]
    assert {"student", "ensemble", "branch_1", "branch_2"} <= set(last)
    assert ("online_student" in last) == (method == "pcl")
    assert "teacher" not in last and "fused" not in last
    assert results["loss_terms"] == list(LOGGED_TERMS[method])
    # The deployable student: branch 0 with the shared trunk, a plain resnet8 (load_exported
    # fills a freshly built zoo network and refuses any missing or extra array).
    path = export.export_run(str(tmp_path / "run"), str(tmp_path / "student.npz"))
    model, predict, meta = export.load_exported(path)
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert accuracy == pytest.approx(last["student"], abs=1e-9)
    assert meta["roles"]["student"] == "resnet8"
    assert results["num_params"]["student"] == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )


def _kl_gradients(student, target, tau):
    """By hand, for L = tau^2 mean_batch KL(softmax(target/tau) || softmax(student/tau)):
    (dL/dstudent, dL/dtarget). dKL/ds = p - q for the student's scaled logits s; for the
    target's, softmax's Jacobian applied to log q - log p + 1 gives q (log q - log p - KL)."""
    q, p = ref.softmax(target / tau), ref.softmax(student / tau)
    kl = np.sum(q * (np.log(q) - np.log(p)), -1, keepdims=True)
    scale = tau / len(student)  # tau^2 / tau per logit, the batch mean
    return scale * (p - q), scale * q * (np.log(q) - np.log(p) - kl)


def _branch_kd_gradients(name, stop_target_gradient):
    method = methods.create(name, {"stop_target_gradient": stop_target_gradient})
    logits = PEER_LOGITS if name == "okddip" else LOGITS

    def kl_to_branches(branch_logits):
        outputs = {"branch_logits": branch_logits, "peer_attention": jnp.asarray(ATTENTION)}
        return method.loss(outputs, jnp.asarray(LABELS), jnp.asarray(100), 4)[1]["kl_to_branches"]

    with jax.enable_x64(True):
        grads = jax.grad(kl_to_branches)([jnp.asarray(z, jnp.float64) for z in logits])
    return [np.asarray(g) for g in grads]


@pytest.mark.parametrize("stop", [True, False])
def test_cl_ilr_target_gradient_matches_the_hand_derivation(stop):
    """CL-ILR's targets t_i = mean_{j != i} z_j: stopped (ours), or, as the authors' code,
    trained too: then branch k's gradient gains d/dt_i of every other branch's term / (m - 1)."""
    m, tau = 3, methods.create("cl_ilr").settings.tau
    targets = [sum(LOGITS[j] for j in range(m) if j != i) / (m - 1) for i in range(m)]
    expected = []
    for k in range(m):
        grad = _kl_gradients(LOGITS[k], targets[k], tau)[0]
        if not stop:
            grad = grad + sum(
                _kl_gradients(LOGITS[i], targets[i], tau)[1] / (m - 1) for i in range(m) if i != k
            )
        expected.append(grad)
    for got, want in zip(_branch_kd_gradients("cl_ilr", stop), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_okddip_authors_gradient_reaches_the_peers_through_the_leader_and_mix_targets():
    """With `stop_target_gradient=False` (the authors' code), the leader's target (the peers'
    mean) trains the peers by the hand derivation, and each peer's attention-weighted target
    trains the peers it mixes; with the default, the leader's term trains the leader alone."""
    tau, peers = methods.create("okddip").settings.tau, PEER_LOGITS[1:]
    mean = sum(peers) / 3
    leader_grad, from_leader = _kl_gradients(PEER_LOGITS[0], mean, tau)
    stopped = _branch_kd_gradients("okddip", True)
    authors = _branch_kd_gradients("okddip", False)
    np.testing.assert_allclose(stopped[0], leader_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(authors[0], leader_grad, rtol=1e-10, atol=1e-12)
    mixes = np.einsum("bpq,qbc->pbc", ATTENTION, np.stack(peers))
    for a in range(3):
        own = _kl_gradients(peers[a], mixes[a], tau)[0]
        np.testing.assert_allclose(stopped[1 + a], own, rtol=1e-10, atol=1e-12)
        # Peer a's logits in every mix b (weight attention[:, b, a]) and in the leader's mean.
        as_target = sum(
            ATTENTION[:, b, a][:, None] * _kl_gradients(peers[b], mixes[b], tau)[1]
            for b in range(3)
        )
        want = own + as_target + from_leader / 3
        np.testing.assert_allclose(authors[1 + a], want, rtol=1e-10, atol=1e-12)


def test_okddip_reports_the_peers_mean_as_its_ensemble():
    """As OKDDip's code reports it: the three peers' mean, without the leader; the other branch
    methods report the ensemble their objective uses."""
    outputs = {
        "student_logits": jnp.asarray(PEER_LOGITS[0]),
        "branch_logits": [jnp.asarray(z) for z in PEER_LOGITS],
    }
    evaluated = methods.create("okddip").evaluated(outputs)
    np.testing.assert_allclose(evaluated["ensemble"], sum(PEER_LOGITS[1:]) / 3, atol=1e-6)
    outputs["branch_logits"] = [jnp.asarray(z) for z in LOGITS]
    evaluated = methods.create("cl_ilr", {"num_branches": 3}).evaluated(outputs)
    np.testing.assert_allclose(evaluated["ensemble"], sum(LOGITS) / 3, atol=1e-6)
