"""KDCL and PCL: their loss terms against NumPy, which tensors their targets leave untrained, the
views each network or branch trains on, PCL's temporal mean, and their settings' checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import datasets, input_pipeline, losses, methods, train
from ffcl_jax.errors import UserError
from tests.conftest import tiny_config
from tests.helpers import numpy_reference as ref

RNG = np.random.default_rng(1)
LABELS = np.array([0, 3, 1, 2, 3])
PAIR_LOGITS = [RNG.standard_normal((5, 4)) * 2 for _ in range(2)]  # teacher, student
BRANCH_LOGITS = [RNG.standard_normal((5, 4)) * 2 for _ in range(3)]
MEAN_LOGITS = [RNG.standard_normal((5, 4)) * 2 for _ in range(3)]  # the temporal mean's
PEER_ENSEMBLE = RNG.standard_normal((5, 4)) * 2


def _as_jax(arrays):
    return [jnp.asarray(z, jnp.float32) for z in arrays]


def test_min_logit_ensemble_matches_numpy():
    got = losses.min_logit_ensemble(_as_jax(PAIR_LOGITS), jnp.asarray(LABELS))
    rows = np.arange(len(LABELS))
    shifted = [z - z[rows, LABELS][:, None] for z in PAIR_LOGITS]
    np.testing.assert_allclose(got, np.minimum(*shifted), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[rows, LABELS], 0.0)


@pytest.mark.parametrize("rule", ["mean", "min_logit"])
def test_kdcl_objective_matches_numpy(rule):
    method = methods.create("kdcl", {"collaborative_target": rule})
    z_t, z_s = PAIR_LOGITS
    outputs = {"teacher_logits": jnp.asarray(z_t), "student_logits": jnp.asarray(z_s)}
    total, terms = method.loss(outputs, jnp.asarray(LABELS), jnp.asarray(0), 4)
    if rule == "mean":
        target = (z_t + z_s) / 2
    else:
        rows = np.arange(len(LABELS))
        target = np.minimum(z_t - z_t[rows, LABELS][:, None], z_s - z_s[rows, LABELS][:, None])
    kl = ref.kl(z_t, target, 4.0) + ref.kl(z_s, target, 4.0)
    np.testing.assert_allclose(float(terms["kl_collaborative"]), kl, rtol=1e-5)
    ce = ref.cross_entropy(z_t, LABELS) + ref.cross_entropy(z_s, LABELS)
    np.testing.assert_allclose(float(total), 0.5 * ce + 0.5 * kl, rtol=1e-5)  # no ramp-up
    assert tuple(terms) == ("ce_teacher", "ce_student", "kl_collaborative", "rampup_weight")
    assert float(terms["rampup_weight"]) == 1.0


def test_kdcl_target_takes_no_gradient():
    """Each network is pulled toward the pair's ensemble, never the ensemble toward it: the
    teacher's KL term gives the student no gradient, under either rule."""
    labels = jnp.asarray(LABELS)
    targets = {
        "mean": lambda z_t, z_s: losses.ensemble_logits(z_t, z_s),
        "min_logit": lambda z_t, z_s: losses.min_logit_ensemble([z_t, z_s], labels),
    }
    for rule in targets:

        def teacher_kl(z_t, z_s, rule=rule):
            return losses.kl_distill(z_t, targets[rule](z_t, z_s), 4.0)

        grad_t, grad_s = jax.grad(teacher_kl, (0, 1))(*_as_jax(PAIR_LOGITS))
        assert np.abs(np.asarray(grad_t)).max() > 1e-4
        np.testing.assert_array_equal(grad_s, 0.0)


def test_peer_mean_distillation_matches_numpy_and_leaves_the_means_untrained():
    got = losses.peer_mean_distillation(_as_jax(BRANCH_LOGITS), _as_jax(MEAN_LOGITS), 3.0)
    want = sum(
        sum(ref.kl(z, MEAN_LOGITS[j], 3.0) for j in range(3) if j != i) / 2
        for i, z in enumerate(BRANCH_LOGITS)
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # A branch never learns from its own temporal mean, and the means get no gradient.
    grad_branches, grad_means = jax.grad(
        lambda b, m: losses.peer_mean_distillation(b, m, 3.0), (0, 1)
    )(_as_jax(BRANCH_LOGITS), _as_jax(MEAN_LOGITS))
    for g in grad_means:
        np.testing.assert_array_equal(g, 0.0)
    own_only = jax.grad(
        lambda z: sum(losses.kl_distill(z, jnp.asarray(MEAN_LOGITS[j]), 3.0) for j in (1, 2)) / 2
    )(jnp.asarray(BRANCH_LOGITS[0], jnp.float32))
    np.testing.assert_allclose(grad_branches[0], own_only, rtol=1e-5, atol=1e-7)


def _pcl_outputs():
    return {
        "branch_logits": _as_jax(BRANCH_LOGITS),
        "peer_ensemble_logits": jnp.asarray(PEER_ENSEMBLE, jnp.float32),
        "mean_branch_logits": _as_jax(MEAN_LOGITS),
        "student_logits": jnp.asarray(BRANCH_LOGITS[0], jnp.float32),
    }


def test_pcl_objective_matches_numpy():
    method = methods.create("pcl")
    # Epoch 100: past the ramp-up.
    total, terms = method.loss(_pcl_outputs(), jnp.asarray(LABELS), jnp.asarray(100), 4)
    ce = sum(ref.cross_entropy(z, LABELS) for z in BRANCH_LOGITS)
    kl_ensemble = sum(ref.kl(z, PEER_ENSEMBLE, 3.0) for z in BRANCH_LOGITS)
    kl_mean = sum(
        sum(ref.kl(z, MEAN_LOGITS[j], 3.0) for j in range(3) if j != i) / 2
        for i, z in enumerate(BRANCH_LOGITS)
    )
    np.testing.assert_allclose(
        float(terms["ce_ensemble"]), ref.cross_entropy(PEER_ENSEMBLE, LABELS), rtol=1e-5
    )
    np.testing.assert_allclose(float(terms["kl_to_branches"]), kl_ensemble, rtol=1e-5)
    np.testing.assert_allclose(float(terms["kl_temporal_mean"]), kl_mean, rtol=1e-5)
    expected = ce + ref.cross_entropy(PEER_ENSEMBLE, LABELS) + kl_ensemble + kl_mean
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert tuple(terms) == (
        "ce_branches",
        "ce_ensemble",
        "kl_to_branches",
        "kl_temporal_mean",
        "rampup_weight",
    )


def test_the_peer_ensemble_learns_from_its_cross_entropy_alone():
    """PCL's peer-ensemble classifier teaches the branches but is not pulled toward them."""
    method = methods.create("pcl")

    def term(ensemble, name):
        outputs = dict(_pcl_outputs(), peer_ensemble_logits=ensemble)
        _, terms = method.loss(outputs, jnp.asarray(LABELS), jnp.asarray(100), 4)
        return terms[name]

    ensemble = jnp.asarray(PEER_ENSEMBLE, jnp.float32)
    np.testing.assert_array_equal(jax.grad(term)(ensemble, "kl_to_branches"), 0.0)
    assert np.abs(np.asarray(jax.grad(term)(ensemble, "ce_ensemble"))).max() > 1e-4


def _train_data(num_views, fmnist_dir, on_device=False):
    config = tiny_config(
        fmnist_dir, train_examples=64, batch_size=16, augment="pad_crop_flip", pad=2
    )
    images, labels = datasets.load_split(config, "train")
    if on_device:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return input_pipeline.DeviceTrainData(
            config, images, labels, 16, sharding, sharding, num_views=num_views
        )
    return input_pipeline.TrainData(config, images, labels, 16, num_views=num_views)


@pytest.mark.parametrize("on_device", [False, True], ids=["tf_data", "on_device"])
def test_views_are_independent_augmentations_and_view_0_is_the_single_view(fmnist_dir, on_device):
    single = next(iter(_train_data(1, fmnist_dir, on_device).epoch(1)))
    batch = next(iter(_train_data(3, fmnist_dir, on_device).epoch(1)))
    images = np.asarray(batch["image"])
    assert images.shape == (16, 3, *np.asarray(single["image"]).shape[1:])
    np.testing.assert_array_equal(images[:, 0], single["image"])
    np.testing.assert_array_equal(batch["label"], single["label"])
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(images[:, a], images[:, b])


def _cohort(name):
    """`name`'s method and its cohort of resnet8s for 5 classes of 1-channel images."""
    method = methods.create(name)
    config = ml_collections.ConfigDict({"teacher": "resnet8", "student": "resnet8"})
    return method, methods.Cohort(method.build_members(config, 5, 1, None, nnx.Rngs(0)))


def test_each_branch_and_each_network_sees_its_own_view():
    """A batch of views routes view i to branch i (the trunk run on each view), and view 0 to
    the teacher, view 1 to the student of a pair: the same logits as each given its view alone."""
    views = jax.random.normal(jax.random.key(0), (4, 3, 12, 12, 1))
    pcl, branches = _cohort("pcl")
    assert pcl.num_views == 3
    together = pcl.forward(branches, views, train=False)
    for i in range(3):
        alone = pcl.forward(branches, views[:, i], train=False)["branch_logits"][i]
        np.testing.assert_allclose(together["branch_logits"][i], alone, rtol=1e-5, atol=1e-6)
    assert together["peer_ensemble_logits"].shape == (4, 5)
    kdcl, pair = _cohort("kdcl")
    assert kdcl.num_views == 2 and set(pair.member_names) == {"teacher", "student"}
    together = kdcl.forward(pair, views[:, :2], train=False)
    for i, name in enumerate(("teacher_logits", "student_logits")):
        alone = kdcl.forward(pair, views[:, i], train=False)[name]
        np.testing.assert_allclose(together[name], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a batch of 3 views for 2 cohort members"):
        kdcl.forward(pair, views, train=False)


def test_kdcl_on_one_view_and_its_evaluated_models():
    kdcl = methods.create("kdcl", {"separate_views": False})
    assert kdcl.num_views == 1
    outputs = {
        "teacher_logits": jnp.asarray(PAIR_LOGITS[0]),
        "student_logits": jnp.asarray(PAIR_LOGITS[1]),
    }
    evaluated = kdcl.evaluated(outputs)
    assert list(evaluated) == kdcl.evaluated_names() == ["student", "teacher", "ensemble"]
    np.testing.assert_allclose(evaluated["ensemble"], sum(PAIR_LOGITS) / 2, rtol=1e-6)


def test_pcl_evaluates_the_temporal_mean_as_its_student():
    """With the temporal mean, the student and the branches are the mean's (what PCL deploys),
    the online branch 0 is `online_student`, and the ensemble is the online peer ensemble."""
    pcl = methods.create("pcl")
    online = _pcl_outputs()
    mean = {
        "student_logits": online["mean_branch_logits"][0],
        "branch_logits": online["mean_branch_logits"],
        "peer_ensemble_logits": online["peer_ensemble_logits"] + 1.0,
    }
    evaluated = pcl.evaluated(online, mean)
    names = ["student", "ensemble", "branch_1", "branch_2", "online_student"]
    assert pcl.evaluated_names() == names and set(evaluated) == set(names)
    np.testing.assert_array_equal(evaluated["student"], MEAN_LOGITS[0].astype(np.float32))
    np.testing.assert_array_equal(evaluated["branch_2"], MEAN_LOGITS[2].astype(np.float32))
    np.testing.assert_array_equal(evaluated["online_student"], BRANCH_LOGITS[0].astype(np.float32))
    np.testing.assert_array_equal(evaluated["ensemble"], online["peer_ensemble_logits"])
    # Without a temporal mean PCL keeps no state and evaluates its online branches.
    no_mean = methods.create("pcl", {"temporal_mean_decay": 0.0, "lam_temporal_kd": 0.0})
    assert "online_student" not in no_mean.evaluated_names()
    assert no_mean.init_state({"w": jnp.ones(2)}, {}) is None
    _, terms = no_mean.loss(_pcl_outputs(), jnp.asarray(LABELS), jnp.asarray(100), 4)
    assert "kl_temporal_mean" not in terms


@pytest.mark.slow
def test_the_temporal_mean_follows_the_weights_with_the_warm_up_decay(fmnist_dir):
    """mean <- d mean + (1 - d) params after each step, d = min(1 - 1/(step + 1), decay)."""
    config = tiny_config(fmnist_dir, method="pcl")
    method = train.check_config(config, 1)
    assert method.name == "pcl" and method.num_views == 3
    setup, state = train.build(config, method, steps_per_epoch=4)
    assert setup.loss_terms == ("ce_branches", "ce_ensemble", "kl_to_branches", "kl_temporal_mean")
    assert set(state.method_state) == {"mean_params", "mean_batch_stats"}
    # The mean starts as a copy of the initial weights and statistics.
    chex.assert_trees_all_equal(state.method_state["mean_params"], state.params)
    chex.assert_trees_all_equal(state.method_state["mean_batch_stats"], state.batch_stats)
    step = jax.jit(setup.train_step)
    rng = np.random.default_rng(0)
    weights = []
    for _ in range(3):
        batch = {
            "image": rng.integers(0, 256, (8, 3, 28, 28, 1)).astype(np.uint8),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        state, metrics = step(state, batch)
        weights.append(state.params)
        assert np.isfinite(float(metrics["kl_temporal_mean"]))
    # d = 0, 1/2, 2/3 at steps 0, 1, 2: while d < decay, the plain mean of the weights so far.
    expected = jax.tree.map(lambda p1, p2, p3: (p1 + p2 + p3) / 3, *weights)
    chex.assert_trees_all_close(state.method_state["mean_params"], expected, rtol=1e-5, atol=1e-6)
    # The mean's BatchNorm statistics are its own (it runs with other weights from step 3 on).
    online, mean = (
        nnx.to_flat_state(s) for s in (state.batch_stats, state.method_state["mean_batch_stats"])
    )
    assert any(not np.allclose(a[1][...], b[1][...]) for a, b in zip(online, mean, strict=True))


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("kdcl", {"use_fusion": True}, "method 'kdcl' has no setting loss.use_fusion"),
        ("kdcl", {"lam_mutual": 1.0}, "method 'kdcl' has no setting loss.lam_mutual"),
        ("kdcl", {"collaborative_target": "max"}, "unknown loss.collaborative_target 'max'"),
        ("kdcl", {"collaborative_target": "none"}, "unknown loss.collaborative_target 'none'"),
        ("kdcl", {"kd_alpha": -0.1}, "loss.kd_alpha must be in [0, 1]"),
        ("ffl", {"separate_views": True}, "method 'ffl' has no setting loss.separate_views"),
        ("one", {"separate_views": True}, "it takes neither loss.peer_ensemble"),
        ("one", {"peer_ensemble": True}, "it takes neither loss.peer_ensemble"),
        ("one", {"temporal_mean_decay": 0.99}, "method 'one' has no setting loss.temporal_mean"),
        ("pcl", {"temporal_mean_decay": 0.0}, "set loss.temporal_mean_decay > 0"),
        ("pcl", {"temporal_mean_decay": 1.0}, "loss.temporal_mean_decay must be in [0, 1)"),
        ("pcl", {"lam_temporal_kd": -1.0}, "loss.lam_temporal_kd must be >= 0"),
        ("pcl", {"gate": "one"}, "it takes neither loss.peer_ensemble"),
        ("dml", {"temporal_mean_decay": 0.99}, "method 'dml' has no setting loss.temporal_mean"),
        ("pcl", {"num_branches": 1}, "loss.num_branches must be >= 2"),
    ],
)
def test_impossible_kdcl_and_pcl_settings_fail_in_one_line(method, overrides, message):
    with pytest.raises(UserError) as info:
        methods.create(method, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
