"""Model zoo: shapes for any input, parameter counts of the PyTorch CIFAR KD zoos, PyTorch-style
initialisation, the registry's errors, and the fusion module on heterogeneous pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import methods
from ffcl_jax.errors import UserError
from ffcl_jax.models import MODELS, batch_norm, create_model
from ffcl_jax.models.fusion import FusionModule
from ffcl_jax.models.layers import avg_pool_to
from tests.helpers import tiers


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def pair_cohort(name, teacher, student, in_channels, *, seed=0, fusion_channels=None, **loss):
    """Method `name` (with `loss` settings) and its teacher/student cohort for 10 classes."""
    method = methods.create(name, loss)
    config = ml_collections.ConfigDict(
        {"teacher": teacher, "student": student, "fusion_channels": fusion_channels}
    )
    members = method.build_members(config, 10, in_channels, None, nnx.Rngs(seed))
    return method, methods.Cohort(members)


# Parameter counts with 100 classes, as RepDistiller / the CRD paper tables list them (millions).
REFERENCE_MILLIONS = {
    "resnet8": 0.08,
    "resnet14": 0.18,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_1": 0.18,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.25,
    "wrn_28_10": 36.5,
}


@pytest.mark.parametrize("name", tiers.cases(sorted(MODELS), tiers.FAST_ZOO))
def test_parameter_counts_match_the_pytorch_zoo(name):
    model = create_model(name, 100, in_channels=3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        n_params(model) / 1e6, REFERENCE_MILLIONS[name], rtol=0.03, atol=0.005
    )


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_2"])
# The fast tier keeps the odd size with two channels; the full tier every shape.
@pytest.mark.parametrize(
    "shape",
    tiers.cases(
        [(32, 32, 3), (28, 28, 1), (12, 20, 2)], ("shape2",), ids=["shape0", "shape1", "shape2"]
    ),
)
def test_outputs_for_any_input_size_and_channels(name, shape):
    model = create_model(name, 7, in_channels=shape[-1], rngs=nnx.Rngs(0))
    logits, features = model(jnp.ones((2, *shape)), train=False)
    assert logits.shape == (2, 7)
    assert len(features) == 3
    h, w = shape[:2]
    for i, (f, c) in enumerate(zip(features, model.stage_channels, strict=True)):
        assert f.shape == (2, -(-h // 2**i), -(-w // 2**i), c)


@pytest.mark.slow
def test_every_model_runs_on_small_inputs():
    for name in MODELS:
        if name == "wrn_28_10":
            continue  # 36M parameters; covered by the parameter count test
        model = create_model(name, 10, in_channels=1, rngs=nnx.Rngs(0))
        logits, features = model(jnp.ones((1, 8, 8, 1)), train=True)
        assert logits.shape == (1, 10) and len(features) == 3, name


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UserError) as info:
        create_model("resnet9", 10, rngs=nnx.Rngs(0))
    message = str(info.value)
    assert "unknown model 'resnet9'" in message
    for name in MODELS:
        assert name in message


def test_initialisation_follows_pytorch():
    model = create_model("resnet110", 100, rngs=nnx.Rngs(0))
    kernel = model.stages[2][5].conv1.kernel[...]  # 3x3x64x64
    fan_out = 3 * 3 * 64
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / fan_out), rtol=0.05)
    # Untruncated normal: with 37k draws some lie beyond 2 standard deviations.
    assert np.abs(kernel).max() > 2.5 * np.sqrt(2.0 / fan_out)
    bn = model.stages[2][5].bn1
    np.testing.assert_array_equal(bn.scale[...], 1.0)
    np.testing.assert_array_equal(bn.bias[...], 0.0)
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5  # PyTorch momentum 0.1, eps 1e-5
    bound = 1 / np.sqrt(64)
    for w in (model.classifier.kernel[...], model.classifier.bias[...]):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound


def test_resnet_shortcuts_where_shape_changes():
    model = create_model("resnet8x4", 10, rngs=nnx.Rngs(0))
    # Stem 32 -> stage 64 at stride 1: the channel change alone needs a projection.
    assert model.stages[0][0].shortcut_conv is not None
    small = create_model("resnet20", 10, rngs=nnx.Rngs(0))
    assert small.stages[0][0].shortcut_conv is None
    assert small.stages[1][0].shortcut_conv is not None
    assert small.stages[1][1].shortcut_conv is None


def test_fusion_heterogeneous_pair_shapes_and_gradients():
    method, cohort = pair_cohort("ffl", "wrn_16_2", "resnet8x4", 3)
    assert cohort.fused_knowledge is None  # no feature term: no feature modules
    fusion = cohort.fusion
    assert fusion.depthwise.kernel.shape == (3, 3, 1, 128 + 256)  # groups = C_T + C_S
    assert fusion.pointwise.kernel.shape == (1, 1, 384, 256)  # C_fused defaults to C_S
    assert fusion.classifier.kernel.shape == (256, 10)
    out = method.forward(cohort, jnp.ones((2, 16, 16, 3)), train=True)
    assert out["fused_logits"].shape == (2, 10)
    assert method.evaluated_names() == ["student", "teacher", "fused", "ensemble"]
    assert set(method.evaluated(out)) == set(method.evaluated_names())
    _, wide = pair_cohort("ffl", "wrn_16_2", "resnet8x4", 3, fusion_channels=64)
    assert wide.fusion.pointwise.kernel.shape == (1, 1, 384, 64)  # config.fusion_channels
    assert wide.fusion.classifier.kernel.shape == (64, 10)

    # Different spatial sizes: the larger map is average-pooled to the smaller.
    fusion = FusionModule(6, 4, 3, fused_channels=5, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    f_t = jnp.asarray(rng.normal(size=(2, 8, 8, 6)), jnp.float32)
    f_s = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
    assert fusion(f_t, f_s, train=True).shape == (2, 3)
    assert fusion.pointwise.kernel.shape == (1, 1, 10, 5)
    # No stop-gradient: the fused loss reaches both networks' features.
    g_t, g_s = jax.grad(lambda a, b: fusion(a, b, train=False).sum(), argnums=(0, 1))(f_t, f_s)
    assert float(jnp.abs(g_t).max()) > 0 and float(jnp.abs(g_s).max()) > 0


def test_fusion_pools_exactly_like_a_manual_average():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    expected = np.asarray(x).reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(avg_pool_to(x, (2, 2)), expected)
    with pytest.raises(UserError, match="integer multiple"):
        avg_pool_to(jnp.ones((1, 6, 6, 1)), (4, 4))


def test_cohort_without_fusion_has_no_fused_output():
    method, cohort = pair_cohort("dml", "resnet8", "resnet8", 1)
    assert cohort.fusion is None and cohort.fused_knowledge is None
    out = method.forward(cohort, jnp.ones((1, 8, 8, 1)), train=False)
    assert "fused_logits" not in out
    assert list(method.evaluated(out)) == method.evaluated_names()
    assert method.evaluated_names() == ["student", "teacher", "ensemble"]


def test_bfloat16_compute_keeps_float32_parameters():
    model = create_model("resnet8", 10, in_channels=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    logits, _ = model(jnp.ones((2, 8, 8, 1)), train=True)
    assert logits.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "options",
    [{"use_scale": False}, {"use_bias": False}, {"axis": 1}, {"use_fast_variance": False}],
    ids=["no_scale", "no_bias", "channels_at_axis_1", "two_pass_variance"],
)
def test_batch_norm_built_otherwise_runs_as_flax_under_every_kernel_choice(options):
    """The closed form and the kernel compute BatchNorm's default form only: a layer built with
    other options must compute exactly what nnx.BatchNorm computes, never read a missing scale
    or normalise the wrong axis."""
    x = jax.random.normal(jax.random.key(0), (8, 6, 5, 5), jnp.float32) * 3 + 1
    channels = 6 if options.get("axis") == 1 else 5

    def run(closed_form):
        bn = batch_norm.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **options)
        with batch_norm.closed_form_batch_norm_backward(closed_form):
            y = bn(x, use_running_average=False)
        return y, bn.mean[...], bn.var[...]

    expected = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **options)
    y = expected(x, use_running_average=False)
    for closed_form in (False, True):
        got_y, got_mean, got_var = run(closed_form)
        np.testing.assert_array_equal(got_y, y)
        np.testing.assert_array_equal(got_mean, expected.mean[...])
        np.testing.assert_array_equal(got_var, expected.var[...])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_closed_form_batch_norm_matches_flax_forward_and_autodiff(dtype):
    """batch_norm.BatchNorm under `closed_form_batch_norm_backward`: flax's forward and running
    statistics exactly (float32), and the gradients autodiff gives."""
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 6), jnp.float32) * 3 + 1
    cotangent = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    x, cotangent = x.astype(dtype), cotangent.astype(dtype)

    def make():
        bn = batch_norm.batch_norm(6, dtype=dtype, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.linspace(0.5, 2.0, 6)
        bn.bias[...] = jnp.linspace(-1.0, 1.0, 6)
        return bn

    def run(closed_form):
        bn = make()
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

        def loss(params, x):
            model = nnx.merge(graphdef, params, stats, copy=True)
            with batch_norm.closed_form_batch_norm_backward(closed_form):
                y = model(x, use_running_average=False)
            return jnp.sum(y.astype(jnp.float32) * cotangent), (y, nnx.state(model, nnx.BatchStat))

        (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return y, new_stats, grads

    y_a, stats_a, (params_a, x_a) = run(False)
    y_c, stats_c, (params_c, x_c) = run(True)
    assert y_c.dtype == y_a.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    if dtype == jnp.float32:
        np.testing.assert_array_equal(np.asarray(y_c), np.asarray(y_a))
        for a, c in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_c), strict=True):
            np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(y_c), f32(y_a), **tol)
    np.testing.assert_allclose(f32(x_c), f32(x_a), **tol)
    for a, c in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_c), strict=True):
        np.testing.assert_allclose(f32(c), f32(a), **tol)
    assert float(jnp.max(jnp.abs(x_a.astype(jnp.float32)))) > 0.1  # a gradient worth comparing


@pytest.mark.parametrize(
    "stages, fusions",
    [
        pytest.param((2,), 0, id="fused-map"),
        pytest.param((0, 1, 2), 2, id="stage-fusion", marks=pytest.mark.slow),
    ],
)
def test_fused_feature_knowledge_modules_shapes_and_unchanged_initialisation(stages, fusions):
    """Adapters map each network's stage to the fused map's channels and resolution; the
    feature modules are created last, so the other parameters start exactly as without them."""
    feat_form = {(2,): "fused_map", (0, 1, 2): "stage_fusion"}[stages]
    _, plain = pair_cohort("ffcl", "wrn_16_2", "resnet8", 1, seed=1, lam_feat=0.0)
    method, cohort = pair_cohort("ffcl", "wrn_16_2", "resnet8", 1, seed=1, feat_form=feat_form)
    assert plain.fused_knowledge is None
    for role in ("teacher", "student", "fusion"):
        a, b = (
            nnx.state(getattr(plain, role), nnx.Param),
            nnx.state(getattr(cohort, role), nnx.Param),
        )
        jax.tree.map(np.testing.assert_array_equal, a, b)
    knowledge = cohort.fused_knowledge
    assert len(knowledge.stage_fusions) == fusions
    out = method.forward(cohort, jnp.ones((2, 16, 16, 1)), train=True)
    assert len(out["feature_targets"]) == len(stages)
    assert len(out["stage_fused_logits"]) == fusions
    student_channels = (16, 32, 64)
    for stage, maps in zip(stages, out["feature_targets"], strict=True):
        size = 16 // 2**stage
        expected = (2, size, size, student_channels[stage])  # C_fused = C_S
        assert {k: v.shape for k, v in maps.items()} == dict.fromkeys(maps, expected)
    assert all(z.shape == (2, 10) for z in out["stage_fused_logits"])
    assert "feature_targets" not in method.forward(cohort, jnp.ones((2, 16, 16, 1)), train=False)
    # The fused maps come from the fusion module: without it there is nothing to build.
    with pytest.raises(UserError, match="takes its targets from the fusion module"):
        methods.create(
            "ffcl", {"feat_form": feat_form, "use_fusion": False, "lam_fuse": 0, "lam_ens": 0}
        )


def test_feature_stages_must_exist_in_both_networks():
    with pytest.raises(UserError, match=r"loss.feat_stages has stage 3, but .* stages 0\.\.2"):
        pair_cohort("ffcl", "resnet8", "wrn_16_2", 1, feat_stages=(0, 3))
