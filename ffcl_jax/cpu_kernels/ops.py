"""The oneDNN kernels as differentiable JAX functions (`jax.custom_vjp` over `jax.ffi.ffi_call`).

Each takes what its XLA counterpart takes (NHWC activations, HWIO weights, float32) and must be
called only after `ffcl_jax.cpu_kernels.available()` returned True (which registers the
targets). Their gradients are oneDNN's backward kernels; second derivatives are not defined.

Both check their arguments when traced and raise ValueError with the shapes: the kernels check
their buffers again (and fail the call, not the process), but an error here names the caller's
line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _conv_attrs(strides, padding, groups) -> dict:
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    return dict(
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
        pad_top=np.int64(pad_top),
        pad_bottom=np.int64(pad_bottom),
        pad_left=np.int64(pad_left),
        pad_right=np.int64(pad_right),
        groups=np.int64(groups),
    )


def _describe(**arrays) -> str:
    return ", ".join(f"{name} {tuple(a.shape)} {a.dtype}" for name, a in arrays.items())


def _check_float32(where: str, **arrays) -> None:
    for name, a in arrays.items():
        if a.dtype != jnp.float32:
            raise ValueError(f"{where}: {name} must be float32 ({_describe(**arrays)})")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_conv_args(x, w, strides, padding, groups) -> None:
    """Raises ValueError unless `conv2d` can compute this convolution: NHWC float32 `x`, HWIO
    float32 `w`, positive strides, non-negative padding, `groups` dividing both channel counts
    with `x`'s channels = `w`'s inputs x groups, and a kernel no larger than the padded input."""
    shapes = f"{_describe(x=x, w=w)}, strides {strides}, padding {padding}, groups {groups}"
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d: expects an NHWC x and HWIO w ({shapes})")
    _check_float32("conv2d", x=x, w=w)
    try:
        (pt, pb), (pl, pr) = padding
        strides_h, strides_w = strides
    except (TypeError, ValueError):
        raise ValueError(
            f"conv2d: strides must be (h, w) and padding ((top, bottom), (left, right)) ({shapes})"
        ) from None
    if not all(_is_int(s) and s >= 1 for s in (strides_h, strides_w)):
        raise ValueError(f"conv2d: strides must be positive ints ({shapes})")
    if not all(_is_int(p) and p >= 0 for p in (pt, pb, pl, pr)):
        raise ValueError(f"conv2d: padding must be ints >= 0 ({shapes})")
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int ({shapes})")
    if min(x.shape) < 1 or min(w.shape) < 1:
        raise ValueError(f"conv2d: every dimension must be at least 1 ({shapes})")
    if x.shape[3] % groups or w.shape[3] % groups:
        raise ValueError(f"conv2d: groups must divide x's and w's channels ({shapes})")
    if x.shape[3] != w.shape[2] * groups:
        raise ValueError(f"conv2d: x's channels must be w's input channels times groups ({shapes})")
    if x.shape[1] + pt + pb < w.shape[0] or x.shape[2] + pl + pr < w.shape[1]:
        raise ValueError(f"conv2d: the kernel is larger than the padded input ({shapes})")


def check_batch_norm_args(x, scale, bias) -> None:
    """Raises ValueError unless `batch_norm_train` can normalise `x`: float32 NHWC or NC, every
    dimension at least 1, `scale` and `bias` float32 of shape (channels,)."""
    shapes = _describe(x=x, scale=scale, bias=bias)
    if x.ndim < 2:
        raise ValueError(f"batch_norm_train: expects an NHWC or NC x ({shapes})")
    _check_float32("batch_norm_train", x=x, scale=scale, bias=bias)
    if min(x.shape) < 1:
        raise ValueError(f"batch_norm_train: every dimension of x must be at least 1 ({shapes})")
    for name, a in (("scale", scale), ("bias", bias)):
        if a.shape != x.shape[-1:]:
            raise ValueError(
                f"batch_norm_train: {name} must have shape ({x.shape[-1]},), one value per "
                f"channel of x ({shapes})"
            )


def conv_output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    kh, kw, _, out_ch = w_shape
    (pt, pb), (pl, pr) = padding
    return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, out_ch)


def _forward(x, w, strides, padding, groups, target):
    check_conv_args(x, w, strides, padding, groups)
    out = jax.ShapeDtypeStruct(conv_output_shape(x.shape, w.shape, strides, padding), x.dtype)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(x, w, **_conv_attrs(strides, padding, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, w, strides, padding, groups):
    """`lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO",
    "NHWC"), feature_group_count=groups)` for float32, with explicit `((top, bottom), (left,
    right))` padding and static Python ints for everything but the arrays. Undifferentiated (an
    eval step), it runs oneDNN's inference form of the convolution."""
    return _forward(x, w, strides, padding, groups, "ffcl_onednn_conv_inference")


def _conv2d_fwd(x, w, strides, padding, groups):
    return _forward(x, w, strides, padding, groups, "ffcl_onednn_conv_forward"), (x, w)


def _backward_data(dy, w, x_shape, strides, padding, groups):
    return jax.ffi.ffi_call(
        "ffcl_onednn_conv_backward_data",
        jax.ShapeDtypeStruct(x_shape, dy.dtype),
        vmap_method="sequential",
    )(dy, w, **_conv_attrs(strides, padding, groups))


def _backward_weights(x, dy, w_shape, strides, padding, groups):
    return jax.ffi.ffi_call(
        "ffcl_onednn_conv_backward_weights",
        jax.ShapeDtypeStruct(w_shape, x.dtype),
        vmap_method="sequential",
    )(x, dy, **_conv_attrs(strides, padding, groups))


def _conv2d_bwd(strides, padding, groups, residuals, dy):
    x, w = residuals
    dx = _backward_data(dy, w, x.shape, strides, padding, groups)
    return dx, _backward_weights(x, dy, w.shape, strides, padding, groups)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def check_conv_transpose_args(y, w, strides, padding, out_shape) -> None:
    """Raises ValueError unless `conv2d_transpose` can compute: `conv2d` of an `out_shape` input
    with `w` must be valid and give `y`'s shape."""
    _check_float32("conv2d_transpose", y=y, w=w)
    x = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    try:
        check_conv_args(x, w, strides, padding, 1)
    except ValueError as e:
        raise ValueError(
            f"conv2d_transpose, of the convolution of an input x {x.shape}: {e}"
        ) from None
    expected = conv_output_shape(out_shape, w.shape, strides, padding)
    if y.shape != expected:
        raise ValueError(
            f"conv2d_transpose: y must have the shape {expected} that a convolution of an "
            f"{tuple(out_shape)} input with w gives ({_describe(y=y, w=w)})"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_transpose(y, w, strides, padding, out_shape):
    """The transpose of `conv2d(., w, strides, padding, 1)` applied to `y`: that convolution's
    input gradient for the output gradient `y`, an input of `out_shape` (NHWC; it fixes what
    PyTorch's ConvTranspose2d calls output_padding). `w` is the convolution's HWIO kernel, its
    inputs `out_shape`'s channels and its outputs `y`'s; float32, static Python ints."""
    check_conv_transpose_args(y, w, strides, padding, out_shape)
    return _backward_data(y, w, tuple(out_shape), strides, padding, 1)


def _conv2d_transpose_fwd(y, w, strides, padding, out_shape):
    return conv2d_transpose(y, w, strides, padding, out_shape), (y, w)


def _conv2d_transpose_bwd(strides, padding, out_shape, residuals, g):
    # The transpose is linear in y with the convolution as its adjoint: <g, A_w' y> = <A_w g, y>.
    y, w = residuals
    dy = _forward(g, w, strides, padding, 1, "ffcl_onednn_conv_forward")
    return dy, _backward_weights(g, y, w.shape, strides, padding, 1)


conv2d_transpose.defvjp(_conv2d_transpose_fwd, _conv2d_transpose_bwd)


def _batch_norm_forward(x, scale, bias, epsilon, relu):
    check_batch_norm_args(x, scale, bias)
    channels = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    y, mean, var = jax.ffi.ffi_call(
        "ffcl_batch_norm_forward",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
        vmap_method="sequential",
    )(x, scale, bias, epsilon=np.float32(epsilon), relu=bool(relu))
    return (y, mean, var), (x, mean, var, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon, relu=False):
    """`(y, batch mean, biased batch variance)` over all axes but the last of a float32 NHWC (or
    NC) tensor, as `batch_norm.batch_norm_train` returns them, with `y` through a ReLU under `relu`.
    The statistics' cotangents are ignored (the caller stops their gradient, as the
    running-average update does). Its sums are in double: more exact than XLA's."""
    return _batch_norm_forward(x, scale, bias, epsilon, relu)[0]


def _batch_norm_backward(epsilon, relu, residuals, cotangents):
    x, mean, var, scale, bias = residuals
    channels = jax.ShapeDtypeStruct(scale.shape, scale.dtype)
    return jax.ffi.ffi_call(
        "ffcl_batch_norm_backward",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
        vmap_method="sequential",
    )(x, cotangents[0], mean, var, scale, bias, epsilon=np.float32(epsilon), relu=bool(relu))


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


def _batch_norm_add_relu_forward(x, scale, bias, residual, epsilon):
    check_batch_norm_args(x, scale, bias)
    if residual.shape != x.shape or residual.dtype != jnp.float32:
        raise ValueError(
            "batch_norm_add_relu: residual must be float32 of x's shape "
            f"({_describe(x=x, residual=residual)})"
        )
    channels = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    y, mean, var = jax.ffi.ffi_call(
        "ffcl_batch_norm_add_relu_forward",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
        vmap_method="sequential",
    )(x, scale, bias, residual, epsilon=np.float32(epsilon))
    return (y, mean, var), (x, y, mean, var, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_add_relu(x, scale, bias, residual, epsilon):
    """`(relu(residual + y), batch mean, biased batch variance)`, `y` BatchNorm's training-mode
    output as in `batch_norm_train`: a residual block's end in one pass over its output. The
    statistics' cotangents are ignored, as there."""
    return _batch_norm_add_relu_forward(x, scale, bias, residual, epsilon)[0]


def _batch_norm_add_relu_backward(epsilon, residuals, cotangents):
    x, y, mean, var, scale = residuals
    like_x = jax.ShapeDtypeStruct(x.shape, x.dtype)
    channels = jax.ShapeDtypeStruct(scale.shape, scale.dtype)
    return jax.ffi.ffi_call(
        "ffcl_batch_norm_add_relu_backward",
        (like_x, channels, channels, like_x),
        vmap_method="sequential",
    )(x, y, cotangents[0], mean, var, scale, epsilon=np.float32(epsilon))


batch_norm_add_relu.defvjp(_batch_norm_add_relu_forward, _batch_norm_add_relu_backward)
