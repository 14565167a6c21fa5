"""The oneDNN kernels as differentiable JAX functions (`jax.custom_vjp` over `jax.ffi.ffi_call`).

Each takes what its XLA counterpart takes (NHWC activations, HWIO weights, float32) and must be
called only after `ffcl_jax.cpu_kernels.available()` returned True (which registers the
targets). Their gradients are oneDNN's backward kernels; second derivatives are not defined.
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


def conv_output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    kh, kw, _, out_ch = w_shape
    (pt, pb), (pl, pr) = padding
    return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, out_ch)


def _forward(x, w, strides, padding, groups):
    out = jax.ShapeDtypeStruct(conv_output_shape(x.shape, w.shape, strides, padding), x.dtype)
    call = jax.ffi.ffi_call("ffcl_onednn_conv_forward", out, vmap_method="sequential")
    return call(x, w, **_conv_attrs(strides, padding, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, w, strides, padding, groups):
    """`lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO",
    "NHWC"), feature_group_count=groups)` for float32, with explicit `((top, bottom), (left,
    right))` padding and static Python ints for everything but the arrays."""
    return _forward(x, w, strides, padding, groups)


def _conv2d_fwd(x, w, strides, padding, groups):
    return _forward(x, w, strides, padding, groups), (x, w)


def _conv2d_bwd(strides, padding, groups, residuals, dy):
    x, w = residuals
    attrs = _conv_attrs(strides, padding, groups)
    dx = jax.ffi.ffi_call(
        "ffcl_onednn_conv_backward_data",
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        vmap_method="sequential",
    )(dy, w, **attrs)
    dw = jax.ffi.ffi_call(
        "ffcl_onednn_conv_backward_weights",
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        vmap_method="sequential",
    )(x, dy, **attrs)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _batch_norm_forward(x, scale, bias, epsilon, relu):
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
    NC) tensor, as `layers.batch_norm_train` returns them, with `y` through a ReLU under `relu`.
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
