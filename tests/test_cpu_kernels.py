"""The optional oneDNN kernels (ffcl_jax.cpu_kernels) against XLA's: every op, every zoo model,
whole train steps; which kernels `config.cpu.kernels` picks, and what happens without them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import cpu_kernels, report, train, xla_cpu
from ffcl_jax.cpu_kernels import build, ops
from ffcl_jax.errors import UserError
from ffcl_jax.models import MODELS, batch_norm, create_model, layers
from tests.conftest import tiny_config

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"oneDNN kernels: {cpu_kernels.unavailable_reason()}"
)


def relative_to_scale(actual, expected) -> float:
    """The largest difference in units of the expected tensor's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def lax_conv(x, w, strides, padding, groups):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# (batch, height, width, in, out, kernel, stride, groups): the zoo's and the fusion module's
# convolutions, with odd sizes, stride 2 on odd and even sizes, grouped and depthwise.
CONV_SHAPES = [
    (4, 28, 28, 1, 16, 3, 1, 1),
    (3, 15, 13, 16, 16, 3, 1, 1),
    (2, 15, 13, 16, 32, 3, 2, 1),
    (2, 14, 14, 16, 32, 1, 2, 1),
    (2, 9, 7, 24, 24, 3, 1, 24),
    (3, 11, 13, 6, 9, 3, 2, 3),
    (5, 7, 7, 128, 64, 1, 1, 1),
]


@needs_kernels
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_convolution_and_its_gradients_match_lax(shape):
    n, h, w, cin, cout, k, stride, groups = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), jnp.float32)
    args = ((stride, stride), ((k // 2, k // 2), (k // 2, k // 2)), groups)
    expected, expected_vjp = jax.vjp(lambda x, w: lax_conv(x, w, *args), x, kernel)
    actual, actual_vjp = jax.vjp(lambda x, w: cpu_kernels.conv2d(x, w, *args), x, kernel)
    assert actual.shape == expected.shape
    assert relative_to_scale(actual, expected) <= 1e-5
    cotangent = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    for got, want in zip(actual_vjp(cotangent), expected_vjp(cotangent), strict=True):
        assert relative_to_scale(got, want) <= 1e-5
    # jit changes nothing: the kernels are custom calls in the compiled program.
    jitted = jax.jit(lambda x, w: cpu_kernels.conv2d(x, w, *args))(x, kernel)
    np.testing.assert_array_equal(jitted, actual)


# (batch, the transposed convolution's input h, w, its in and out channels): FFSD's decoder
# blocks (stride 2, ConvTranspose2d(k=3, s=2, p=1, output_padding=1)), odd sizes too.
CONV_TRANSPOSE_SHAPES = [(4, 7, 7, 64, 32), (3, 5, 6, 32, 16), (2, 1, 1, 8, 4)]


@needs_kernels
@pytest.mark.parametrize("shape", CONV_TRANSPOSE_SHAPES)
def test_transposed_convolution_and_its_gradients_match_ffsds_xla_form(shape):
    from ffcl_jax.models.ffsd import ConvTranspose

    n, h, w, cin, cout = shape
    rng = np.random.default_rng(1)
    graphdef, params = nnx.split(ConvTranspose(cin, cout, rngs=nnx.Rngs(0)))
    y = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)

    def apply(y, params):
        return nnx.merge(graphdef, params)(y)

    kernel = params["kernel"][...]
    expected, expected_vjp = jax.vjp(apply, y, params)
    onednn = layers.LayerKernels(conv2d_transpose=cpu_kernels.conv2d_transpose)
    with layers.layer_kernels(onednn):
        actual, actual_vjp = jax.vjp(apply, y, params)
        lowered = jax.jit(apply).lower(y, params).as_text()
    assert "ffcl_onednn_conv_backward_data" in lowered and "convolution" not in lowered
    assert actual.shape == expected.shape == (n, 2 * h, 2 * w, cout)
    assert relative_to_scale(actual, expected) <= 1e-5
    cotangent = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    got, want = jax.tree.leaves(actual_vjp(cotangent)), jax.tree.leaves(expected_vjp(cotangent))
    assert len(got) == len(want) == 2  # the input's and the kernel's
    for g, e in zip(got, want, strict=True):
        assert relative_to_scale(g, e) <= 1e-5
    # It is the convolution's input gradient, by definition.
    strides, padding = (2, 2), ((1, 1), (1, 1))
    _, conv_vjp = jax.vjp(
        lambda x: lax_conv(x, kernel, strides, padding, 1), jnp.zeros(expected.shape)
    )
    direct = cpu_kernels.conv2d_transpose(y, kernel, strides, padding, expected.shape)
    assert relative_to_scale(direct, conv_vjp(y)[0]) <= 1e-5


@needs_kernels
def test_transposed_convolution_checks_its_arguments_when_traced():
    y, kernel = jnp.zeros((2, 4, 4, 8), jnp.float32), jnp.zeros((3, 3, 4, 8), jnp.float32)
    args = ((2, 2), ((1, 1), (1, 1)))
    assert cpu_kernels.conv2d_transpose(y, kernel, *args, (2, 8, 8, 4)).shape == (2, 8, 8, 4)
    with pytest.raises(ValueError, match=r"y must have the shape \(2, 5, 5, 8\)"):
        cpu_kernels.conv2d_transpose(y, kernel, *args, (2, 9, 9, 4))
    with pytest.raises(ValueError, match="x's channels must be w's input channels"):
        cpu_kernels.conv2d_transpose(y, kernel, *args, (2, 8, 8, 5))
    with pytest.raises(ValueError, match="y must be float32"):
        cpu_kernels.conv2d_transpose(y.astype(jnp.float16), kernel, *args, (2, 8, 8, 4))


@needs_kernels
def test_the_primitive_cache_keeps_at_most_its_limit():
    """Least recently used out first; a shape whose primitive was dropped is built again."""
    import ctypes

    library = ctypes.CDLL(str(build.library_path()))  # the loaded library, not another copy
    for hook in (library.FfclCachedPlans, library.FfclSetMaxPlans):
        hook.restype, hook.argtypes = ctypes.c_int64, [ctypes.c_int64]
    previous = library.FfclSetMaxPlans(2)
    try:
        assert library.FfclCachedPlans(0) <= 2
        rng = np.random.default_rng(3)
        w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
        args = ((1, 1), ((1, 1), (1, 1)), 1)
        for size in (5, 6, 7, 5, 7):
            x = jnp.asarray(rng.standard_normal((1, size, size, 2)), jnp.float32)
            got = cpu_kernels.conv2d(x, w, *args)
            assert relative_to_scale(got, lax_conv(x, w, *args)) <= 1e-5
            assert library.FfclCachedPlans(0) <= 2
        assert library.FfclCachedPlans(0) == 2
    finally:
        assert library.FfclSetMaxPlans(previous) == 2


# Run in a fresh process (the count is the process's): three Python threads call a jitted
# program of independent convolutions, and it prints how many threads ran kernel work, and a
# checksum of the results.
_CALLERS_SCRIPT = """
import ctypes, sys, threading
import jax, jax.numpy as jnp, numpy as np
from ffcl_jax import cpu_kernels
from ffcl_jax.cpu_kernels import build
cpu_kernels.set_kernel_thread(sys.argv[1] == "on")
library = ctypes.CDLL(str(build.library_path()))
library.FfclWorkThreads.restype = ctypes.c_int64
xs = [jnp.full((16, 16, 16, 8), i + 1.0) for i in range(4)]
w = jnp.ones((3, 3, 8, 8))
conv = lambda x: cpu_kernels.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), 1)
branches = jax.jit(lambda xs: [conv(conv(x)) for x in xs])
sums = []
def call():
    for _ in range(5):
        sums.append(float(sum(np.asarray(y, np.float64).sum() for y in branches(xs))))
threads = [threading.Thread(target=call) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print(library.FfclWorkThreads(), len(set(sums)), sums[0])
"""


@needs_kernels
def test_kernel_work_runs_on_one_thread_whichever_thread_calls():
    """One thread opens every OpenMP region (libgomp keeps a worker pool per such thread): with
    the kernel thread on, three calling threads give one; off, each caller runs its own."""
    import subprocess
    import sys

    def run(mode):
        done = subprocess.run(
            [sys.executable, "-c", _CALLERS_SCRIPT, mode], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        threads, distinct, total = done.stdout.split()
        return int(threads), int(distinct), float(total)

    on, off = run("on"), run("off")
    assert on[0] == 1 and off[0] > 1, (on, off)
    assert on[1] == off[1] == 1 and on[2] == off[2]


def _xla_batch_norm(x, scale, bias, epsilon, relu=False):
    """`batch_norm.batch_norm_train`, its output through a ReLU under `relu`: what the kernel
    fuses."""
    y, mean, var = batch_norm.batch_norm_train(x, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), mean, var


@needs_kernels
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(
    "shape", [(4, 9, 7, 16), (3, 28, 28, 1), (6, 10), (2, 5, 5, 37), (2, 3, 3, 48)]
)
def test_batch_norm_matches_the_closed_form_and_flax(shape, relu):
    """Channel counts below, at and across the kernel's 16-channel blocks (37 = 2 x 16 + 5)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    channels = shape[-1]
    scale = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    expected = _xla_batch_norm(x, scale, bias, batch_norm.BN_EPSILON, relu)
    actual = cpu_kernels.batch_norm_train(x, scale, bias, batch_norm.BN_EPSILON, relu)
    for got, want in zip(actual, expected, strict=True):
        assert relative_to_scale(got, want) <= 1e-5
    if relu:
        assert float(jnp.min(actual[0])) == 0.0 and float(jnp.mean(actual[0] == 0)) > 0.01
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, batch_norm.BN_EPSILON, relu)[0] * cotangent)

    grads = jax.grad(loss(cpu_kernels.batch_norm_train), (0, 1, 2))(x, scale, bias)
    reference = jax.grad(loss(_xla_batch_norm), (0, 1, 2))(x, scale, bias)
    for got, want in zip(grads, reference, strict=True):
        assert relative_to_scale(got, want) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 9, 7, 16), (6, 10), (2, 5, 5, 37)])
def test_batch_norm_add_relu_is_the_kernel_then_the_add_and_relu(shape):
    """The residual block's fused end computes exactly what `batch_norm_train`, XLA's add and
    XLA's ReLU compute one after the other, and its gradients (the residual's included) agree
    with theirs."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    residual = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    eps = batch_norm.BN_EPSILON

    def unfused(x, scale, bias, residual):
        y, mean, var = cpu_kernels.batch_norm_train(x, scale, bias, eps, False)
        return jax.nn.relu(residual + y), mean, var

    def fused(x, scale, bias, residual):
        return cpu_kernels.batch_norm_add_relu(x, scale, bias, residual, eps)

    outputs = fused(x, scale, bias, residual), unfused(x, scale, bias, residual)
    for got, want in zip(*outputs, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert 0.1 < float(jnp.mean(fused(x, scale, bias, residual)[0] == 0)) < 0.9
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0] * cotangent)

    grads = jax.grad(loss(fused), (0, 1, 2, 3))(x, scale, bias, residual)
    reference = jax.grad(loss(unfused), (0, 1, 2, 3))(x, scale, bias, residual)
    for got, want in zip(grads, reference, strict=True):
        assert relative_to_scale(got, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(grads[3]), np.asarray(reference[3]))


@needs_kernels
def test_batch_norm_kernel_passes_a_nan_on():
    """A NaN input makes its channel NaN, through the fused ReLU too (the trainer stops on a NaN
    loss), and leaves the other channels as they were."""
    x = jnp.ones((2, 3, 3, 4), jnp.float32).at[0, 0, 0, 1].set(jnp.nan)
    x = x + jnp.arange(18, dtype=jnp.float32).reshape(2, 3, 3, 1)
    y, mean, var = cpu_kernels.batch_norm_train(x, jnp.ones(4), jnp.zeros(4), 1e-5, True)
    assert bool(jnp.all(jnp.isnan(y[..., 1]))) and bool(jnp.isnan(mean[1]))
    assert not bool(jnp.any(jnp.isnan(y[..., 0])))


@needs_kernels
def test_batch_norm_kernel_is_exact_where_sums_cancel():
    """Where the incoming gradient nearly cancels over a channel (a shift's gradient at a
    BatchNorm followed by another), plain float32 sums lose most digits: oneDNN's BatchNorm was
    1.4e-3 of scale from float64 here, against XLA's 9e-6 (docs/performance_log.md). The kernel sums
    in double, so it must be at least as exact as XLA's pairwise reductions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 28, 28, 16)) * 2 + 0.5
    dy = rng.standard_normal(x.shape)
    dy -= 0.999 * dy.mean(axis=(0, 1, 2))
    scale, bias = rng.standard_normal(16), rng.standard_normal(16)

    def shift_gradient(fn, dtype):
        def loss(b):
            y = fn(jnp.asarray(x, dtype), jnp.asarray(scale, dtype), b, batch_norm.BN_EPSILON)[0]
            return jnp.sum(y * jnp.asarray(dy, dtype))

        return jax.jit(jax.grad(loss))(jnp.asarray(bias, dtype))

    with jax.enable_x64(True):
        truth = shift_gradient(batch_norm.batch_norm_train, jnp.float64)
        kernel = relative_to_scale(shift_gradient(cpu_kernels.batch_norm_train, jnp.float32), truth)
        xla = relative_to_scale(shift_gradient(batch_norm.batch_norm_train, jnp.float32), truth)
    assert xla <= 1e-4
    assert kernel <= xla, (kernel, xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _xla_values_onednn_gradients(x, w, strides, padding, groups):
    """XLA's convolution forward, oneDNN's backward kernels: the activations (and so every
    ReLU's mask) are XLA's, and only the backward kernels differ."""
    return lax_conv(x, w, strides, padding, groups)


def _xla_forward(x, w, strides, padding, groups):
    return lax_conv(x, w, strides, padding, groups), (x, w)


_xla_values_onednn_gradients.defvjp(_xla_forward, ops._conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _xla_values_kernel_batch_norm_gradients(x, scale, bias, epsilon, relu=False):
    """XLA's BatchNorm (and ReLU) forward, the kernel's backward on XLA's statistics."""
    return _xla_batch_norm(x, scale, bias, epsilon, relu)


def _xla_batch_norm_forward(x, scale, bias, epsilon, relu):
    out = _xla_batch_norm(x, scale, bias, epsilon, relu)
    return out, (x, out[1], out[2], scale, bias)


_xla_values_kernel_batch_norm_gradients.defvjp(_xla_batch_norm_forward, ops._batch_norm_backward)


def _model_pass(name: str, convolution: str, train_mode: bool, dtype=jnp.float32, noise=None):
    """Logits, stage maps, parameter gradients and updated BatchNorm statistics of one pass, its
    convolutions and training-mode BatchNorms XLA's ("xla"), the kernels' ("onednn"), or XLA's
    forward with the kernels' backward ("onednn_backward"). `noise`, a seed: XLA's
    convolutions, each output moved by random float32 roundings (16 units in the last place of
    its magnitude, about what another order of summing a 3x3x32 window gives), its gradient
    untouched."""
    model = create_model(name, 10, in_channels=3, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = jax.tree.map(lambda v: v.astype(dtype), (params, stats))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 16, 16, 3)), dtype)
    layer_index = itertools.count()

    def rounded(x, w, *args):
        y = lax_conv(x, w, *args)
        key = jax.random.fold_in(jax.random.key(noise), next(layer_index))
        ulp = jnp.finfo(jnp.float32).eps * jnp.abs(y)
        rounding = 16 * ulp * jax.random.normal(key, y.shape)
        return y + jax.lax.stop_gradient(rounding)

    conv2d = {
        "onednn": cpu_kernels.conv2d,
        "onednn_backward": _xla_values_onednn_gradients,
        "xla": rounded if noise is not None else cpu_kernels.conv2d,
    }[convolution]
    batch_norm = {
        "onednn": cpu_kernels.batch_norm_train,
        "onednn_backward": _xla_values_kernel_batch_norm_gradients,
        "xla": _xla_batch_norm,
    }[convolution]

    kernels = layers.XLA_OPS
    if convolution != "xla" or noise is not None:
        kernels = layers.LayerKernels(conv2d=conv2d, batch_norm_train=batch_norm)

    def loss(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        with layers.layer_kernels(kernels):
            logits, features = m(x, train=train_mode)
        weights = jnp.arange(10, dtype=dtype)
        return jnp.sum(logits * weights), (logits, features, nnx.state(m, nnx.BatchStat))

    (_, (logits, features, new_stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params
    )
    return logits, features, jax.tree.leaves(grads), jax.tree.leaves(new_stats)


def _gradient_error(grads, exact) -> float:
    assert len(grads) == len(exact)
    return max(relative_to_scale(g, t) for g, t in zip(grads, exact, strict=True))


def _assert_model_agrees(name: str, train_mode: bool) -> None:
    """oneDNN's forward: logits and stage maps to 1e-4 of their scale, BatchNorm running
    statistics to 1e-5 (the PyTorch parity tests' tolerances). oneDNN's backward kernels, given
    XLA's activations: gradients as exact as XLA's own.

    The backward is checked on XLA's activations because a network's gradient is not a
    continuous function of float32 rounding: where a ReLU's input lies within rounding of zero,
    any change of summation order can flip its mask and move a gradient by several % of its
    scale (test_float32_rounding_alone_flips_a_relu). And in training mode a deep network's
    float32 gradients at initialisation are ill-conditioned (BatchNorm's backward over few
    values): XLA's own are up to 2e-5 of their scale away from the float64 result for ResNet-56,
    so two float32 implementations cannot agree to 1e-5 there. The gradients are therefore held
    to the float64 result: oneDNN's largest error over all gradients may be at most twice XLA's
    plus 1e-6; for ResNet-8, the parity tests' student, they must also agree with XLA's directly
    to 1e-5 of scale.
    """
    onednn = _model_pass(name, "onednn", train_mode)
    reference = _model_pass(name, "xla", train_mode)
    assert relative_to_scale(onednn[0], reference[0]) <= 1e-4
    for got, want in zip(onednn[1], reference[1], strict=True):
        assert relative_to_scale(got, want) <= 1e-4
    for got, want in zip(onednn[3], reference[3], strict=True):
        assert relative_to_scale(got, want) <= 1e-5
    backward = _model_pass(name, "onednn_backward", train_mode)[2]
    with jax.enable_x64(True):
        exact = _model_pass(name, "xla", train_mode, jnp.float64)[2]
    onednn_error, xla_error = _gradient_error(backward, exact), _gradient_error(reference[2], exact)
    assert onednn_error <= 2 * xla_error + 1e-6, (onednn_error, xla_error)
    if name == "resnet8":
        for got, want in zip(backward, reference[2], strict=True):
            assert relative_to_scale(got, want) <= 1e-5


@pytest.mark.slow
def test_float32_rounding_alone_flips_a_relu():
    """Why the zoo test checks oneDNN's backward kernels on XLA's activations: XLA's own
    convolutions, their outputs moved by random float32 roundings, move ResNet-32's gradients
    by 2e-2 to 5e-2 of their scale for some draws of that rounding (3 of 6 on AVX-512, the other
    draws 6e-5 to 8e-5, against 6e-6 unmoved): one value sits within rounding of a ReLU's kink.
    oneDNN's forward, 2e-6 from float64 there, lands on its far side (4.9e-2)."""
    with jax.enable_x64(True):
        exact = _model_pass("resnet32", "xla", True, jnp.float64)[2]
    unmoved = _gradient_error(_model_pass("resnet32", "xla", True)[2], exact)
    moved = [
        _gradient_error(_model_pass("resnet32", "xla", True, noise=seed)[2], exact)
        for seed in range(8)
    ]
    assert unmoved < 1e-4
    # Most draws move the gradients smoothly, by about the rounding's size; some jump.
    assert min(moved) < 20 * unmoved, (moved, unmoved)
    assert max(moved) > 1000 * unmoved, (moved, unmoved)


# The fast tier checks the smallest network; CI's full tier every zoo model.
FAST_MODELS = ("resnet8",)


def _zoo_case(name: str, train_mode: bool):
    marks = [] if name in FAST_MODELS else [pytest.mark.slow]
    return pytest.param(
        name, train_mode, marks=marks, id=f"{name}-{'train' if train_mode else 'eval'}"
    )


@needs_kernels
@pytest.mark.parametrize(
    "name,train_mode", [_zoo_case(n, t) for n in sorted(MODELS) for t in (True, False)]
)
def test_every_zoo_model_agrees_with_xla(name, train_mode):
    _assert_model_agrees(name, train_mode)


def _custom_calls(config, num_devices: int = 1) -> tuple[int, int]:
    """Convolution and BatchNorm kernel calls in the config's lowered train step."""
    settings = train.check_config(config, num_devices)
    setup, state = train.build(config, settings, steps_per_epoch=10)
    batch = {
        "image": jnp.zeros((config.batch_size, 28, 28, 1), jnp.uint8),
        "label": jnp.zeros((config.batch_size,), jnp.int32),
    }
    text = jax.jit(setup.train_step).lower(state, batch).as_text()
    return text.count("ffcl_onednn_conv_"), text.count("ffcl_batch_norm_")


@needs_kernels
def test_a_steps_flops_are_counted_with_or_without_the_kernels(fmnist_dir):
    """XLA counts a custom call as no work: the count comes from the step with XLA's ops, so the
    kernels do not change it."""
    counts = []
    for choice in ("onednn", "xla"):
        config = tiny_config(fmnist_dir, **{"cpu.kernels": choice})
        setup, state = train.build(config, train.check_config(config, 1), steps_per_epoch=10)
        assert (setup.counted_train_step is None) is (choice == "xla")
        counts.append(report.train_flops(setup, state, config.batch_size))
    assert counts[0] == counts[1] > 1e8


@needs_kernels
def test_training_runs_the_training_convolution_and_eval_the_inference_one(fmnist_dir):
    config = tiny_config(fmnist_dir, **{"cpu.kernels": "onednn"})
    settings = train.check_config(config, 1)
    setup, state = train.build(config, settings, steps_per_epoch=10)
    batch = {
        "image": jnp.zeros((config.batch_size, 28, 28, 1), jnp.uint8),
        "label": jnp.zeros((config.batch_size,), jnp.int32),
        "mask": jnp.ones((config.batch_size,), jnp.float32),
    }
    trained = jax.jit(setup.train_step).lower(state, batch).as_text()
    evaluated = jax.jit(setup.eval_step).lower(
        state.params, state.batch_stats, batch, state.method_state
    )
    evaluated = evaluated.as_text()
    assert "ffcl_onednn_conv_forward" in trained and "ffcl_onednn_conv_inference" not in trained
    assert "ffcl_onednn_conv_inference" in evaluated and "ffcl_onednn_conv_forward" not in evaluated


@contextlib.contextmanager
def _on_cpu(vendor, isa):
    """As if on a CPU of that vendor and widest vector extension (machine.machine's record)."""
    from unittest import mock

    from ffcl_jax import machine

    here = {**machine.machine(), "vendor": vendor, "isa": isa}
    with mock.patch.object(machine, "machine", lambda: here):
        yield


@needs_kernels
def test_the_kernels_run_where_config_asks_for_them(fmnist_dir):
    config = tiny_config(fmnist_dir, **{"cpu.kernels": "onednn"})
    # resnet8 + resnet8 and the fusion module: 2 x (stem + 3 blocks x 2 + 2 shortcuts) + 2
    # convolutions, each forward, backward-data and backward-weights, but for the two stems'
    # backward-data (nothing needs the images' gradient: JAX drops those calls); as many
    # BatchNorms, each forward and backward.
    layers_with_weights = 2 * 9 + 2
    expected = (3 * layers_with_weights - 2, 2 * layers_with_weights)
    assert _custom_calls(config) == expected
    config.cpu.kernels = "xla"
    assert _custom_calls(config) == (0, 0)
    config.cpu.kernels = "auto"  # built here, one CPU device, float32, a measured CPU
    with _on_cpu("AMD", "AVX-512"):
        assert _custom_calls(config) == expected
    with _on_cpu("Intel", "AVX-512"):
        assert _custom_calls(config) == (0, 0)
        assert "this is Intel AVX-512: --config.cpu.kernels=onednn" in (
            xla_cpu.onednn_fallback_note(config)
        )
        config.cpu.kernels = "onednn"  # takes them anywhere
        assert _custom_calls(config) == expected
        config.cpu.kernels = "auto"
    assert not xla_cpu.use_onednn_kernels(config, num_devices=8)
    config.compute_dtype = "bfloat16"
    assert not xla_cpu.use_onednn_kernels(config)
    config.cpu.kernels = "onednn"  # forced, but bfloat16 layers stay on XLA's kernels
    assert _custom_calls(config) == (0, 0)
    config.compute_dtype, config.batch_norm = "float32", "per_device"
    with pytest.raises(UserError, match="does not run under batch_norm='per_device'"):
        xla_cpu.use_onednn_kernels(config, num_devices=2)


def test_without_the_kernels_auto_says_why_and_onednn_is_an_error(fmnist_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "no C++ compiler (g++)")
    config = tiny_config(fmnist_dir)
    assert not xla_cpu.use_onednn_kernels(config)
    note = xla_cpu.onednn_fallback_note(config)
    assert note == "cpu.kernels: XLA's kernels (no C++ compiler (g++))"
    config.cpu.kernels = "xla"
    assert xla_cpu.onednn_fallback_note(config) is None
    config.cpu.kernels = "onednn"
    with pytest.raises(UserError, match="cpu.kernels=.onednn.: no C[+][+] compiler"):
        xla_cpu.use_onednn_kernels(config)
    config.cpu.kernels = "fast"
    with pytest.raises(UserError, match="unknown config.cpu.kernels 'fast'"):
        train.check_config(config, 1)


@pytest.mark.slow
def test_the_library_builds_from_source_into_a_fresh_cache(tmp_path, monkeypatch):
    """What setup.sh does on a clean machine (the shared cache may already hold a library)."""
    import ctypes

    if build.unsupported_platform() or build.onednn_root() is None:
        pytest.skip("no oneDNN here: the package runs on XLA's kernels")
    monkeypatch.setenv("FFCL_CPU_KERNELS_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", build.BuildWarning)  # -Wall -Wextra: none in our source
        path = build.library_path()
    assert path.is_file() and path.parent.parent == tmp_path
    library = ctypes.CDLL(str(path))
    for symbol in cpu_kernels.TARGETS.values():
        assert getattr(library, symbol)
    assert build.library_path() == path  # found, not rebuilt
    assert [p.name for p in path.parent.iterdir() if p.name != ".lock"] == [build.LIBRARY_NAME]


def test_a_failed_build_is_one_line_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FFCL_CPU_KERNELS_CACHE", str(tmp_path / "cache"))
    if build.unsupported_platform() or build.onednn_root() is None:
        with pytest.raises(build.BuildError):
            build.library_path()
        return
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.raises(build.BuildError, match="compiling the oneDNN kernels failed"):
        build.library_path()
    assert not list((tmp_path / "cache").rglob(build.LIBRARY_NAME))
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.setattr(build.sys, "prefix", str(tmp_path / "nowhere"))
    with pytest.raises(build.BuildError, match="oneDNN not found.*pip install"):
        build.library_path()


# A stand-in for g++: logs its arguments to $FAKE_CXX_LOG and writes the file after -o; warns
# with $FAKE_CXX_WARN, and hangs (with a child, as g++ runs cc1plus) under $FAKE_CXX_HANG.
FAKE_CXX = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi
echo "$@" >> "$FAKE_CXX_LOG"
if [ -n "$FAKE_CXX_HANG" ]; then sleep 120 & wait; fi
if [ -n "$FAKE_CXX_WARN" ]; then echo "$FAKE_CXX_WARN" >&2; fi
out=""
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done
printf fake > "$out"
"""
# As ccache runs the compiler it is given.
WRAPPER = '#!/bin/sh\nexec "$@"\n'


def _script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """library_path() on a fake oneDNN installation with a fake compiler (CXX), into a fresh
    cache: everything but the compile itself, on any machine. Returns the compiler's log."""
    root = tmp_path / "onednn"
    (root / "include/oneapi/dnnl").mkdir(parents=True)
    (root / "include/oneapi/dnnl/dnnl.hpp").write_text("")
    (root / "include/oneapi/dnnl/dnnl_version.h").write_text("#define DNNL_VERSION_MAJOR 3\n")
    (root / "lib").mkdir()
    (root / "lib/libdnnl.so.3").write_text("")
    log = tmp_path / "cxx.log"
    log.write_text("")
    monkeypatch.setattr(build, "unsupported_platform", lambda: None)
    monkeypatch.setenv("DNNL_ROOT", str(root))
    monkeypatch.setenv("FFCL_CPU_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(_script(tmp_path / "fake-c++", FAKE_CXX)))
    monkeypatch.setenv("FAKE_CXX_LOG", str(log))
    for name in ("FAKE_CXX_HANG", "FAKE_CXX_WARN"):
        monkeypatch.delenv(name, raising=False)
    return log


def _compiles(log) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()]


def test_the_build_passes_cxx_as_a_shell_splits_it(fake_build, tmp_path, monkeypatch):
    wrapper = _script(tmp_path / "wrap", WRAPPER)
    monkeypatch.setenv("CXX", f"{wrapper} {tmp_path / 'fake-c++'}")
    path = build.library_path()
    assert path.read_text() == "fake"
    (command,) = _compiles(fake_build)
    # The project's own warnings on; third-party headers as system headers, which warn not.
    assert "-Wall" in command and "-w" not in command
    include = str(jax.ffi.include_dir())
    assert command[command.index(include) - 1] == "-isystem" and f"-I{include}" not in command
    monkeypatch.setenv("CXX", f"{tmp_path / 'no-such-wrapper'} g++")
    with pytest.raises(build.BuildError, match="names no program"):
        build.library_path()
    monkeypatch.setenv("CXX", "'g++")
    with pytest.raises(build.BuildError, match="does not parse"):
        build.library_path()


def test_an_edited_flag_or_compiler_builds_a_new_library(fake_build, tmp_path, monkeypatch):
    first = build.library_path()
    assert build.library_path() == first and len(_compiles(fake_build)) == 1  # cached
    flags = build.kernel_flags
    monkeypatch.setattr(
        build, "kernel_flags", lambda root: (flags(root)[0] + ["-DEDITED"], flags(root)[1])
    )
    edited = build.library_path()
    assert edited != first and len(_compiles(fake_build)) == 2
    assert "-DEDITED" in _compiles(fake_build)[-1]
    wrapper = _script(tmp_path / "wrap", WRAPPER)
    monkeypatch.setenv("CXX", f"{wrapper} {tmp_path / 'fake-c++'}")
    assert build.library_path() not in (first, edited) and len(_compiles(fake_build)) == 3


def test_a_build_that_hangs_is_stopped_and_its_lock_released(fake_build, tmp_path, monkeypatch):
    import fcntl
    import time

    monkeypatch.setenv("FAKE_CXX_HANG", "1")
    monkeypatch.setattr(build, "BUILD_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(build.BuildError) as raised:
        build.library_path()
    # Within seconds: the compiler's child (its cc1plus) was stopped too, or its open stderr
    # would have kept the build waiting for the whole sleep.
    assert time.monotonic() - start < 30
    assert str(raised.value) == "compiling the oneDNN kernels took longer than 1 s and was stopped"
    assert not list((tmp_path / "cache").rglob(build.LIBRARY_NAME))
    (lock,) = (tmp_path / "cache").rglob(".lock")
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
    monkeypatch.delenv("FAKE_CXX_HANG")
    assert build.library_path().is_file()  # the next build goes ahead


def test_compiler_warnings_about_the_source_are_reported(fake_build, monkeypatch):
    monkeypatch.setenv("FAKE_CXX_WARN", "onednn_kernels.cc:9:5: warning: unused variable 'k'")
    with pytest.warns(build.BuildWarning, match="unused variable 'k'"):
        build.library_path()


def test_a_failed_build_says_the_first_error_line():
    fatal = (
        "/tmp/test_errors0/k.cc:1:10: fatal error: nothere.h: No such file or directory\n"
        "    1 | #include <nothere.h>\n"
        "      |          ^~~~~~~~~~~\n"
        "compilation terminated.\n"
    )
    assert build.first_error_line(fatal).endswith(
        "fatal error: nothere.h: No such file or directory"
    )
    link = (
        "/usr/bin/ld: /tmp/ccX.o: in function `f()':\n"
        "k.cc:(.text+0x5): undefined reference to `missing()'\n"
        "collect2: error: ld returned 1 exit status\n"
    )
    assert build.first_error_line(link) == "k.cc:(.text+0x5): undefined reference to `missing()'"
    # A path that merely contains the word is no error line.
    in_function = "/tmp/test_errors0/k.cc: In function 'int f()':\nk.cc:2:3: Error: bad\n"
    assert build.first_error_line(in_function) == "k.cc:2:3: Error: bad"
    assert build.first_error_line("one\ntwo\n\n") == "two"
    assert build.first_error_line("") == "(no output)"


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")


def _compile_tiny(tmp_path, source: str, flags=(), compiler=None):
    path = tmp_path / "tiny.cc"
    path.write_text(source)
    output = tmp_path / "libtiny.so"
    reported = build.compile_library(
        compiler or [shutil.which("g++")], path, output, ["-shared", "-fPIC", "-Wall", *flags]
    )
    return output, reported


@needs_gxx
def test_a_syntax_error_is_reported_by_its_error_line(tmp_path):
    with pytest.raises(build.BuildError) as raised:
        _compile_tiny(tmp_path, 'extern "C" int f() {\n  return 1\n}\n')
    message = str(raised.value)
    assert message.startswith("compiling tiny.cc failed: ") and "\n" not in message
    assert "tiny.cc:2:" in message and "error: expected ';' before '}'" in message, message


@needs_gxx
def test_a_link_error_is_reported_by_the_linkers_line(tmp_path):
    source = 'int missing_function();\nextern "C" int f() { return missing_function(); }\n'
    with pytest.raises(build.BuildError) as raised:
        _compile_tiny(tmp_path, source, ["-Wl,--no-undefined"])
    message = str(raised.value)
    assert "undefined reference to `missing_function()'" in message, message
    assert "collect2" not in message and "\n" not in message


@needs_gxx
def test_the_compile_helper_runs_a_wrapped_compiler_and_returns_its_warnings(tmp_path):
    import ctypes

    wrapper = _script(tmp_path / "wrap", WRAPPER)
    good = 'extern "C" int f(int x) { return 2 * x; }\n'
    library, reported = _compile_tiny(tmp_path, good, compiler=[str(wrapper), "g++"])
    assert reported == "" and ctypes.CDLL(str(library)).f(21) == 42
    unused = 'extern "C" int f(int x) { int unused_here; return x; }\n'
    assert "unused_here" in _compile_tiny(tmp_path, unused)[1]


@pytest.mark.slow
@needs_kernels
def test_three_train_steps_are_as_exact_as_xla(fmnist_dir):
    """A whole cohort (two networks, the fusion module, every loss term) for three steps:
    losses, parameters and running statistics as close to the float64 steps as XLA's float32
    ones are (the losses to 1e-5 more). On this toy problem, at initialisation, three steps
    amplify float32 rounding to several % of some tensors' scale (BatchNorm shifts) in either
    implementation, so the two are compared through the exact result, not to each other: here
    XLA's third loss is 8e-5 from float64, the kernels' 4e-8."""
    from ffcl_jax import datasets, export

    images, labels = datasets.load_idx_split(fmnist_dir, "train")
    runs = {}
    for name, overrides in {
        "onednn": {"cpu.kernels": "onednn"},
        "xla": {"cpu.kernels": "xla"},
        "float64": {"cpu.kernels": "xla", "compute_dtype": "float64"},
    }.items():
        with jax.enable_x64(name == "float64"):
            config = tiny_config(fmnist_dir, **overrides)
            setup, state = train.build(config, train.check_config(config, 1), steps_per_epoch=10)
            step = jax.jit(setup.train_step)
            losses = []
            for i in range(3):
                rows = slice(i * 32, (i + 1) * 32)
                state, metrics = step(state, {"image": images[rows], "label": labels[rows]})
                losses.append(float(metrics["loss"]))
            flat = {**export.flatten(state.params), **export.flatten(state.batch_stats)}
        runs[name] = losses, {k: np.asarray(v, np.float64) for k, v in flat.items()}
    exact_losses = np.array(runs["float64"][0])
    loss_errors = {name: np.abs(np.array(runs[name][0]) - exact_losses) for name in runs}
    assert np.all(loss_errors["onednn"] <= 2 * loss_errors["xla"] + 1e-5 * exact_losses), runs

    def error(name):
        return max(relative_to_scale(runs[name][1][k], v) for k, v in runs["float64"][1].items())

    assert error("onednn") <= 2 * error("xla") + 1e-6, (error("onednn"), error("xla"))


# Every FFI target called directly (bypassing ops.py's checks) with buffers that do not fit
# together: a good call (x (2, 8, 8, 4), w (3, 3, 4, 6), y (2, 8, 8, 6), stride 1, padding 1),
# then each mismatch the kernels must catch before they read a dimension or touch memory.
CONV_OK = {"x": (2, 8, 8, 4), "w": (3, 3, 4, 6), "y": (2, 8, 8, 6)}
CONV_ATTRS = dict(stride_h=1, stride_w=1, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1)
# For each target: the names of its two inputs and its result, as its buffers of CONV_OK.
CONV_TARGETS = {
    "ffcl_onednn_conv_forward": ("x", "w", "y"),
    "ffcl_onednn_conv_inference": ("x", "w", "y"),
    "ffcl_onednn_conv_backward_data": ("y", "w", "x"),  # dy, w -> dx
    "ffcl_onednn_conv_backward_weights": ("x", "y", "w"),  # x, dy -> dw
}
# (which of x, w, y changes, to what, attributes changed, a phrase of the kernel's message); for
# each target, its own names of x, w and y are in the message.
CONV_MISMATCHES = {
    "x_rank": ({"x": (2, 8, 8)}, {}, "rank-4"),
    "w_rank": ({"w": (3, 3, 4)}, {}, "rank-4"),
    "y_rank": ({"y": (2, 8, 8)}, {}, "rank-4"),
    "y_rank_1": ({"y": (2,)}, {}, "rank-4"),
    # (XLA runs no custom call whose result is empty: an input is.)
    "empty_input": ({"input": 0}, {}, "at least 1"),
    "x_channels": ({"x": (2, 8, 8, 5)}, {}, "input channels times groups"),
    "w_inputs": ({"w": (3, 3, 3, 6)}, {}, "input channels times groups"),
    "y_batch": ({"y": (3, 8, 8, 6)}, {}, "batch"),
    "x_batch": ({"x": (1, 8, 8, 4)}, {}, "batch"),
    "y_channels": ({"y": (2, 8, 8, 5)}, {}, "output channels"),
    "w_outputs": ({"w": (3, 3, 4, 7)}, {}, "output channels"),
    "y_height": ({"y": (2, 7, 8, 6)}, {}, "height and width must be 8x8"),
    "y_width": ({"y": (2, 8, 9, 6)}, {}, "height and width must be 8x8"),
    "x_height": ({"x": (2, 9, 8, 4)}, {}, "height and width must be 9x8"),
    "kernel_height": ({"w": (5, 3, 4, 6)}, {}, "height and width must be 6x8"),
    "strided": ({}, {"stride_h": 2}, "height and width must be 4x8"),
    "kernel_too_large": ({"w": (11, 3, 4, 6)}, {}, "larger than the padded"),
    "groups_0": ({}, {"groups": 0}, "groups must be in [1, 2^31]"),
    "groups_negative": ({}, {"groups": -2}, "groups must be in [1, 2^31]"),
    "groups_not_dividing_x": ({"w": (3, 3, 2, 6)}, {"groups": 3}, "input channels times groups"),
    "groups_not_dividing_w": ({"w": (3, 3, 1, 6)}, {"groups": 4}, "multiple of groups"),
    "stride_0": ({}, {"stride_w": 0}, "strides must be in [1, 2^31]"),
    "padding_negative": ({}, {"pad_left": -1}, "padding must be in [0, 2^31]"),
    "padding_huge": ({}, {"pad_top": 2**62}, "padding must be in [0, 2^31]"),
}


def _f32(shape):
    return jnp.ones(shape, jnp.float32)


def _out(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _call_target(target, results, *args, **attrs):
    """The target on `args`, run to completion: its result, or the runtime's exception."""
    return jax.block_until_ready(jax.ffi.ffi_call(target, results)(*args, **attrs))


def _conv_call(target, shapes, attrs):
    first, second, result = CONV_TARGETS[target]
    attrs = {k: np.int64(v) for k, v in {**CONV_ATTRS, "groups": 1, **attrs}.items()}
    args = (_f32(shapes[first]), _f32(shapes[second]))
    return _call_target(target, _out(shapes[result]), *args, **attrs)


def _conv_names(target) -> dict[str, str]:
    """The target's names for x, w and y (its message's)."""
    return {
        "ffcl_onednn_conv_forward": {"x": "x", "w": "w", "y": "y"},
        "ffcl_onednn_conv_inference": {"x": "x", "w": "w", "y": "y"},
        "ffcl_onednn_conv_backward_data": {"x": "dx", "w": "w", "y": "dy"},
        "ffcl_onednn_conv_backward_weights": {"x": "x", "w": "dw", "y": "dy"},
    }[target]


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


@needs_kernels
@pytest.mark.parametrize("target", sorted(CONV_TARGETS))
def test_each_convolution_target_runs_on_buffers_that_fit(target):
    """The control for the mismatches below: CONV_OK is a convolution every target computes."""
    out = _conv_call(target, CONV_OK, {})
    assert out.shape == CONV_OK[CONV_TARGETS[target][2]]
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.max(jnp.abs(out))) > 0


@needs_kernels
@pytest.mark.parametrize("case", sorted(CONV_MISMATCHES))
@pytest.mark.parametrize("target", sorted(CONV_TARGETS))
def test_each_convolution_target_rejects_buffers_that_do_not_fit(target, case):
    """An InvalidArgument error naming the target and every buffer's shape: never a crash, a
    read past a buffer's end, or a result."""
    changed, attrs, phrase = CONV_MISMATCHES[case]
    if "input" in changed:  # the target's first input, with an empty batch
        first = CONV_TARGETS[target][0]
        changed = {first: (0, *CONV_OK[first][1:])}
    shapes = {**CONV_OK, **changed}
    with pytest.raises(Exception, match="INVALID_ARGUMENT") as raised:
        _conv_call(target, shapes, attrs)
    message = str(raised.value)
    assert target in message and phrase in message, message
    for buffer, name in _conv_names(target).items():
        assert f"{name} {_shape_text(shapes[buffer])}" in message, message


BN_SHAPE, BN_CHANNELS = (2, 3, 3, 4), (4,)
# Per target: its inputs' and results' names and shapes, when they fit.
BN_TARGETS = {
    "ffcl_batch_norm_forward": (
        {"x": BN_SHAPE, "scale": BN_CHANNELS, "shift": BN_CHANNELS},
        {"y": BN_SHAPE, "mean": BN_CHANNELS, "variance": BN_CHANNELS},
    ),
    "ffcl_batch_norm_backward": (
        {
            "x": BN_SHAPE,
            "dy": BN_SHAPE,
            "mean": BN_CHANNELS,
            "variance": BN_CHANNELS,
            "scale": BN_CHANNELS,
            "shift": BN_CHANNELS,
        },
        {"dx": BN_SHAPE, "dscale": BN_CHANNELS, "dshift": BN_CHANNELS},
    ),
    "ffcl_batch_norm_add_relu_forward": (
        {"x": BN_SHAPE, "scale": BN_CHANNELS, "shift": BN_CHANNELS, "residual": BN_SHAPE},
        {"y": BN_SHAPE, "mean": BN_CHANNELS, "variance": BN_CHANNELS},
    ),
    "ffcl_batch_norm_add_relu_backward": (
        {
            "x": BN_SHAPE,
            "y": BN_SHAPE,
            "dy": BN_SHAPE,
            "mean": BN_CHANNELS,
            "variance": BN_CHANNELS,
            "scale": BN_CHANNELS,
        },
        {"dx": BN_SHAPE, "dscale": BN_CHANNELS, "dshift": BN_CHANNELS, "dresidual": BN_SHAPE},
    ),
}


def _bn_call(target, changed):
    inputs, results = BN_TARGETS[target]
    args = [_f32(changed.get(name, shape)) for name, shape in inputs.items()]
    outs = tuple(_out(changed.get(name, shape)) for name, shape in results.items())
    relu = {} if "add_relu" in target else {"relu": False}  # the fused add's ReLU is always on
    return _call_target(target, outs, *args, epsilon=np.float32(1e-5), **relu)


def _bn_mismatches():
    """(target, buffer, its wrong shape, a phrase of the message): every per-channel buffer
    too short (1 element: the case that once read past scale's end) and too long, every
    tensor of the wrong shape, and an x of the wrong rank or empty."""
    cases = []
    for target, (inputs, results) in BN_TARGETS.items():
        for name, shape in {**inputs, **results}.items():
            if shape == BN_CHANNELS:
                cases += [(target, name, (1,), "channels"), (target, name, (5,), "channels")]
                cases.append((target, name, (4, 1), "channels"))
            elif name != "x":
                cases += [(target, name, (2, 3, 3, 5), "shape must be x's")]
                cases.append((target, name, (2, 9, 4), "shape must be x's"))
        cases += [(target, "x", (4,), "NHWC or NC"), (target, "x", (0, 4), "at least 1")]
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}") for c in cases]


@needs_kernels
@pytest.mark.parametrize("target", sorted(BN_TARGETS))
def test_each_batch_norm_target_runs_on_buffers_that_fit(target):
    outs = _bn_call(target, {})
    assert [o.shape for o in outs] == list(BN_TARGETS[target][1].values())


@needs_kernels
@pytest.mark.parametrize("target,buffer,shape,phrase", _bn_mismatches())
def test_each_batch_norm_target_rejects_buffers_that_do_not_fit(target, buffer, shape, phrase):
    with pytest.raises(Exception, match="INVALID_ARGUMENT") as raised:
        _bn_call(target, {buffer: shape})
    message = str(raised.value)
    assert target in message and phrase in message, message
    assert f"{buffer} {_shape_text(shape)}" in message, message


def _traced_conv(x_shape, w_shape, strides=(1, 1), padding=((1, 1), (1, 1)), groups=1, **dtype):
    """ops.conv2d traced only (no kernel runs, none need be built): its output's shape."""
    x = jax.ShapeDtypeStruct(x_shape, dtype.get("x", jnp.float32))
    w = jax.ShapeDtypeStruct(w_shape, dtype.get("w", jnp.float32))
    return jax.eval_shape(lambda x, w: ops.conv2d(x, w, strides, padding, groups), x, w).shape


@pytest.mark.parametrize(
    "x_shape,w_shape,kwargs,phrase",
    [
        ((2, 8, 8), (3, 3, 4, 6), {}, "expects an NHWC x and HWIO w"),
        ((2, 8, 8, 4), (3, 4, 6), {}, "expects an NHWC x and HWIO w"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"x": jnp.float16}, "x must be float32"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"w": jnp.int32}, "w must be float32"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"strides": (0, 1)}, "strides must be positive"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"strides": (1, -1)}, "strides must be positive"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"strides": (1.5, 1)}, "strides must be positive"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"strides": 1}, "strides must be (h, w)"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"padding": "SAME"}, "padding ((top, bottom)"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"padding": ((1, -1), (1, 1))}, "padding must be ints"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"groups": 0}, "groups must be a positive int"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"groups": True}, "groups must be a positive int"),
        ((2, 8, 8, 4), (3, 3, 2, 6), {"groups": 3}, "groups must divide"),
        ((2, 8, 8, 6), (3, 3, 2, 4), {"groups": 3}, "groups must divide"),
        ((2, 8, 8, 4), (3, 3, 4, 6), {"groups": 2}, "input channels times groups"),
        ((2, 8, 8, 5), (3, 3, 4, 6), {}, "input channels times groups"),
        ((0, 8, 8, 4), (3, 3, 4, 6), {}, "at least 1"),
        ((2, 2, 2, 4), (5, 5, 4, 6), {"padding": ((1, 1), (1, 1))}, "kernel is larger"),
    ],
)
def test_conv2d_checks_its_arguments_when_traced(x_shape, w_shape, kwargs, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)) as raised:
        _traced_conv(x_shape, w_shape, **kwargs)
    assert f"x {x_shape}" in str(raised.value) and f"w {w_shape}" in str(raised.value)


def test_conv2d_traces_what_the_checks_let_through():
    assert _traced_conv((2, 8, 8, 4), (3, 3, 4, 6)) == (2, 8, 8, 6)
    assert _traced_conv((2, 9, 7, 6), (3, 3, 2, 6), (2, 2), ((1, 1), (1, 1)), 3) == (2, 5, 4, 6)
    unpadded = _traced_conv((1, 5, 5, 2), (1, 1, 2, 3), (np.int64(1), 1), ((0, 0), (0, 0)))
    assert unpadded == (1, 5, 5, 3)


def _traced_batch_norm(x_shape, scale_shape, bias_shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(x_shape, dtype)
    scale, bias = (jax.ShapeDtypeStruct(s, jnp.float32) for s in (scale_shape, bias_shape))
    return jax.eval_shape(lambda *a: ops.batch_norm_train(*a, 1e-5, True), x, scale, bias)


@pytest.mark.parametrize(
    "x_shape,scale_shape,bias_shape,dtype,phrase",
    [
        ((2, 3, 3, 4), (1,), (4,), jnp.float32, "scale must have shape (4,)"),
        ((2, 3, 3, 4), (4,), (1,), jnp.float32, "bias must have shape (4,)"),
        ((2, 3, 3, 4), (4, 1), (4,), jnp.float32, "scale must have shape (4,)"),
        ((2, 3, 3, 4), (4,), (5,), jnp.float32, "bias must have shape (4,)"),
        ((4,), (4,), (4,), jnp.float32, "expects an NHWC or NC x"),
        ((0, 4), (4,), (4,), jnp.float32, "at least 1"),
        ((2, 4), (4,), (4,), jnp.bfloat16, "x must be float32"),
    ],
)
def test_batch_norm_train_checks_its_arguments_when_traced(
    x_shape, scale_shape, bias_shape, dtype, phrase
):
    with pytest.raises(ValueError, match=re.escape(phrase)) as raised:
        _traced_batch_norm(x_shape, scale_shape, bias_shape, dtype)
    assert f"x {x_shape}" in str(raised.value) and f"scale {scale_shape}" in str(raised.value)


def test_batch_norm_train_traces_what_the_checks_let_through():
    y, mean, var = _traced_batch_norm((2, 3, 3, 4), (4,), (4,))
    assert (y.shape, mean.shape, var.shape) == ((2, 3, 3, 4), (4,), (4,))


def test_the_counted_step_has_no_kernel_left_and_keeps_the_other_choices():
    """Every field that swaps in a kernel goes back to XLA's op, found from the dataclass so a
    new kernel field cannot be missed; the choices that are not kernels stay as they were."""
    every_kernel = dataclasses.replace(
        layers.XLA_OPS,
        **{name: (lambda *args: args) for name in layers.KERNEL_FIELDS},
        closed_form_batch_norm=True,
        scan_blocks=True,
        remat="dots",
    )
    counted = xla_cpu.countable(every_kernel)
    callables = [f.name for f in dataclasses.fields(counted) if callable(getattr(counted, f.name))]
    assert callables == []
    assert set(layers.KERNEL_FIELDS) >= {"conv2d", "conv2d_transpose", "batch_norm_train"}
    assert (counted.closed_form_batch_norm, counted.scan_blocks, counted.remat) == (
        True,
        True,
        "dots",
    )
