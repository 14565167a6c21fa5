"""Each loss term against NumPy computed by hand; gradients through KD targets are zero."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffcl_jax import losses
from tests.helpers import numpy_reference as ref


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 7)) * 3, rng.normal(size=(6, 7)) * 3


@pytest.mark.parametrize("tau", [1.0, 3.0, 4.0])
def test_kl_matches_numpy(logits, tau):
    s, t = logits
    got = losses.kl_distill(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), tau)
    np.testing.assert_allclose(got, ref.kl(s, t, tau), rtol=1e-5)


def test_kl_direction_sum_over_classes_and_tau_squared(logits):
    s, t = (jnp.asarray(x, jnp.float32) for x in logits)
    # Direction: KL(s <- t) takes t as the target; KL is not symmetric.
    assert not np.isclose(losses.kl_distill(s, t, 1.0), losses.kl_distill(t, s, 1.0), rtol=1e-3)
    np.testing.assert_allclose(
        losses.kl_distill(s, t, 1.0), ref.kl(logits[0], logits[1], 1.0), rtol=1e-5
    )
    # Sum over classes: a mean over the 7 classes would be 7 times smaller.
    num_classes = s.shape[-1]
    log_q, log_p = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
    mean_over_classes = jnp.mean(jnp.exp(log_q) * (log_q - log_p))
    np.testing.assert_allclose(
        losses.kl_distill(s, t, 1.0), num_classes * mean_over_classes, rtol=1e-5
    )
    # tau^2: the value at tau is tau^2 times the un-scaled KL of the softened distributions.
    tau = 4.0
    unscaled = ref.kl(logits[0], logits[1], tau) / tau**2
    np.testing.assert_allclose(losses.kl_distill(s, t, tau), tau**2 * unscaled, rtol=1e-5)


def test_kl_is_zero_for_identical_logits(logits):
    s = jnp.asarray(logits[0], jnp.float32)
    np.testing.assert_allclose(losses.kl_distill(s, s, 3.0), 0.0, atol=1e-6)


def test_kl_target_gets_no_gradient(logits):
    s, t = (jnp.asarray(x, jnp.float32) for x in logits)
    grad_target = jax.grad(lambda t_: losses.kl_distill(s, t_, 3.0))(t)
    grad_student = jax.grad(lambda s_: losses.kl_distill(s_, t, 3.0))(s)
    chex.assert_trees_all_equal(grad_target, jnp.zeros_like(t))
    assert float(jnp.abs(grad_student).max()) > 1e-3


def test_kl_in_float32_under_bfloat16_inputs(logits):
    s, t = (jnp.asarray(x * 30, jnp.bfloat16) for x in logits)
    value = losses.kl_distill(s, t, 3.0)
    assert value.dtype == jnp.float32
    assert np.isfinite(value)
    np.testing.assert_allclose(
        value, ref.kl(np.asarray(s, np.float64), np.asarray(t, np.float64), 3.0), rtol=1e-4
    )


def test_cross_entropy_matches_numpy(logits):
    s = logits[0]
    labels = np.array([0, 1, 2, 3, 4, 6])
    expected = -np.mean(ref.log_softmax(s)[np.arange(6), labels])
    np.testing.assert_allclose(
        losses.cross_entropy(jnp.asarray(s, jnp.float32), jnp.asarray(labels)), expected, rtol=1e-5
    )


def test_ensemble_logits_is_the_mean():
    np.testing.assert_allclose(
        losses.ensemble_logits(jnp.array([[1.0, 3.0]]), jnp.array([[3.0, -1.0]])), [[2.0, 1.0]]
    )


def np_attention(f):
    a = np.mean(f**2, axis=-1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_attention_map_and_distance_match_numpy():
    rng = np.random.default_rng(1)
    fs, ft = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 9))
    np.testing.assert_allclose(
        losses.attention_map(jnp.asarray(fs, jnp.float32)), np_attention(fs), rtol=1e-5
    )
    expected = np.mean(np.sum((np_attention(fs) - np_attention(ft)) ** 2, axis=-1))
    got = losses.attention_distance(jnp.asarray(fs, jnp.float32), jnp.asarray(ft, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_attention_distance_pools_the_larger_map():
    rng = np.random.default_rng(2)
    fs, ft = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 8, 8, 6))
    pooled = ft.reshape(2, 4, 2, 4, 2, 6).mean(axis=(2, 4))
    expected = np.mean(np.sum((np_attention(fs) - np_attention(pooled)) ** 2, axis=-1))
    got = losses.attention_distance(jnp.asarray(fs, jnp.float32), jnp.asarray(ft, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_attention_transfer_stages_and_directions():
    rng = np.random.default_rng(3)
    fs = [jnp.asarray(rng.normal(size=(2, 8 // 2**i, 8 // 2**i, 4)), jnp.float32) for i in range(3)]
    ft = [jnp.asarray(rng.normal(size=(2, 8 // 2**i, 8 // 2**i, 6)), jnp.float32) for i in range(3)]
    d = [float(losses.attention_distance(fs[i], ft[i])) for i in range(3)]
    one_way = losses.attention_transfer(fs, ft, (0, 2), "teacher_to_student")
    np.testing.assert_allclose(one_way, d[0] + d[2], rtol=1e-5)
    mutual = losses.attention_transfer(fs, ft, (0, 1, 2), "mutual")
    np.testing.assert_allclose(mutual, 2 * sum(d), rtol=1e-5)  # the distance is symmetric
    # teacher_to_student: no gradient into the teacher's maps; mutual: gradient into both.
    g_t = jax.grad(lambda t: losses.attention_transfer(fs, t, (0, 1, 2), "teacher_to_student"))(ft)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in g_t)
    g_t = jax.grad(lambda t: losses.attention_transfer(fs, t, (0, 1, 2), "mutual"))(ft)
    assert all(float(jnp.abs(g).max()) > 0.0 for g in g_t)


def test_virtual_teacher_target_matches_numpy():
    labels = np.array([2, 0])
    k, a, temperature = 5, 0.99, 20.0
    p_d = np.full((2, k), (1 - a) / (k - 1))
    p_d[np.arange(2), labels] = a
    expected = np.exp(p_d / temperature) / np.exp(p_d / temperature).sum(-1, keepdims=True)
    got = losses.virtual_teacher_target(jnp.asarray(labels), k, a, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.argmax(got, -1) == labels)  # always right


def test_fixed_target_kl_matches_numpy_and_label_smoothing(logits):
    s = logits[0]
    labels = np.array([0, 1, 2, 3, 4, 6])
    target = np.full((6, 7), 0.1 / 7)
    target[np.arange(6), labels] += 0.9
    np.testing.assert_allclose(
        losses.label_smoothing_target(jnp.asarray(labels), 7, 0.1), target, rtol=1e-6
    )
    expected = np.mean(np.sum(target * (np.log(target) - ref.log_softmax(s)), axis=-1))
    got = losses.fixed_target_kl(jnp.asarray(s, jnp.float32), jnp.asarray(target, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "epoch, rampup, expected",
    [
        (0, 80, np.exp(-5.0)),
        (40, 80, np.exp(-5 * 0.25)),
        (80, 80, 1.0),
        (200, 80, 1.0),
        (0, 0, 1.0),
        (3, 0, 1.0),
    ],
)
def test_rampup_weight(epoch, rampup, expected):
    np.testing.assert_allclose(
        losses.rampup_weight(jnp.asarray(epoch), rampup), expected, rtol=1e-6
    )


def test_l2_normalize_of_a_zero_vector_is_zero_with_a_finite_gradient():
    """A stage map a ReLU zeroed for one example (or a fused map's all-zero position) gives a
    zero attention map and a zero gradient, as torch.nn.functional.normalize does, not NaN."""
    rng = np.random.default_rng(4)
    f = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
    f[1] = 0.0
    other = jnp.asarray(rng.normal(size=(3, 4, 4, 5)), jnp.float32)
    value, grad = jax.value_and_grad(lambda x: losses.attention_distance(x, other))(jnp.asarray(f))
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad[1]).max()) == 0.0 and float(jnp.abs(grad[0]).max()) > 0
    np.testing.assert_array_equal(losses.attention_map(jnp.asarray(f))[1], 0.0)
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x) * jnp.asarray([1.0, 2.0])))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_attention_mean_reduction_weights_every_stage_equally():
    """'mean' is RepDistiller's at_loss: the squared difference averaged over positions, i.e.
    'sum' divided by the H*W of the compared maps."""
    rng = np.random.default_rng(5)
    fs, ft = rng.normal(size=(3, 6, 6, 4)), rng.normal(size=(3, 6, 6, 8))
    expected = np.mean(np.mean((np_attention(fs) - np_attention(ft)) ** 2, axis=-1))
    got = losses.attention_distance(
        jnp.asarray(fs, jnp.float32), jnp.asarray(ft, jnp.float32), "mean"
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    total = losses.attention_distance(jnp.asarray(fs, jnp.float32), jnp.asarray(ft, jnp.float32))
    np.testing.assert_allclose(total, 36 * expected, rtol=1e-5)


def np_channel_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fused_map_distance_matches_numpy_and_ignores_scale():
    rng = np.random.default_rng(6)
    adapted, fused = rng.normal(size=(2, 3, 3, 4)), np.abs(rng.normal(size=(2, 3, 3, 4)))
    per_position = np.sum((np_channel_normalize(adapted) - np_channel_normalize(fused)) ** 2, -1)
    expected = np.mean(np.mean(per_position, axis=(1, 2)))
    a, f = jnp.asarray(adapted, jnp.float32), jnp.asarray(fused, jnp.float32)
    np.testing.assert_allclose(losses.fused_map_distance(a, f), expected, rtol=1e-5)
    # Scale-free: 2 - 2 cos per position, whatever the scale of either map.
    np.testing.assert_allclose(losses.fused_map_distance(7.0 * a, 0.1 * f), expected, rtol=1e-5)
    assert float(losses.fused_map_distance(f, 3.0 * f)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="must match"):
        losses.fused_map_distance(a, f[:, :2])


def test_fused_map_is_only_a_target_and_teaches_both_networks():
    rng = np.random.default_rng(7)
    maps = {
        k: jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
        for k in ("fused", "teacher", "student")
    }
    maps["fused"] = maps["fused"].at[0, 0, 0].set(0.0)  # an all-zero position stays finite
    total = losses.fused_map_transfer([maps])
    expected = losses.fused_map_distance(maps["teacher"], maps["fused"]) + (
        losses.fused_map_distance(maps["student"], maps["fused"])
    )
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    grads = jax.grad(lambda m: losses.fused_map_transfer([m]))(maps)
    assert float(jnp.abs(grads["fused"]).max()) == 0.0
    assert float(jnp.abs(grads["teacher"]).max()) > 0
    assert float(jnp.abs(grads["student"]).max()) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
