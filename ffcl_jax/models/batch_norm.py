"""BatchNorm for the model zoo: nnx.BatchNorm with PyTorch BatchNorm2d's defaults, ending a
residual block with the add and the ReLU; in training mode differentiated in closed form, with
statistics over groups of devices, or run as a `layers.LayerKernels` kernel.

Apart from `layers` (convolutions, dense layers, the zoo network's parts, and the kernel choice
this module builds on): the one layer with a training mode of its own, running statistics and a
custom VJP.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.layers import (
    at_least_float32,
    current_kernels,
    float32_kernel,
    layer_kernels,
    varying_like,
)

# PyTorch BatchNorm2d defaults: momentum 0.1 (flax: 0.9 on the running average), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# In training mode, BatchNorm's backward pass as autodiff writes it goes through the variance
# formula term by term: on XLA:CPU that is many separate broadcasts and reductions per layer. The
# closed form (two per-channel sums of the incoming gradient) is the same maths and makes a deep
# pair's step faster on the CPU (`LayerKernels.closed_form_batch_norm`).


@contextlib.contextmanager
def closed_form_batch_norm_backward(enabled: bool = True):
    """While tracing under it, `BatchNorm` in training mode uses `batch_norm_train`."""
    with layer_kernels(dataclasses.replace(current_kernels(), closed_form_batch_norm=enabled)):
        yield


def _batch_norm_forward(x, scale, bias, epsilon):
    """nnx.BatchNorm's training forward (fast variance), in at least float32 whatever `x`'s
    dtype."""
    axes = tuple(range(x.ndim - 1))
    x32 = at_least_float32(x)
    mean = jnp.mean(x32, axes)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
    """`(y, batch mean, batch variance)` over all axes but the last, with the closed-form backward.

    The statistics are returned for the running averages only: their cotangents are ignored (the
    caller must stop their gradient, as BatchNorm's running-average update does).
    """
    return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_backward(epsilon, residuals, cotangents):
    del epsilon
    x, mean, rstd, scale = residuals
    g = at_least_float32(cotangents[0])
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    x_hat = (at_least_float32(x) - mean) * rstd
    grad_bias = jnp.sum(g, axes)
    grad_scale = jnp.sum(g * x_hat, axes)
    grad_x = (scale * rstd / count) * (count * g - grad_bias - x_hat * grad_scale)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


batch_norm_train.defvjp(
    lambda x, scale, bias, epsilon: _batch_norm_forward(x, scale, bias, epsilon),
    _batch_norm_backward,
)


_batch_norm_groups = contextvars.ContextVar("batch_norm_groups", default=None)


@contextlib.contextmanager
def batch_norm_groups(axis_name: str, groups: list[list[int]]):
    """While a step is traced under it, inside `shard_map` over `axis_name`, training-mode
    BatchNorm takes its statistics over the rows of each group of devices (`groups`, indices
    along `axis_name`, `jax.lax.pmean`'s `axis_index_groups`), differentiated by autodiff."""
    token = _batch_norm_groups.set((axis_name, groups))
    try:
        yield
    finally:
        _batch_norm_groups.reset(token)


def _grouped_batch_norm(x, scale, bias, epsilon, axis_name, groups):
    """`(y, mean, var)` as `_batch_norm_forward`, the statistics averaged over each group's
    devices (every device holds as many rows, so the mean of their means is the group's)."""
    axes = tuple(range(x.ndim - 1))
    x32 = at_least_float32(x)
    mean, mean_square = jax.lax.pmean(
        (jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)),
        axis_name,
        axis_index_groups=groups,
    )
    var = jnp.maximum(mean_square - jnp.square(mean), 0.0)
    y = (x32 - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return y.astype(x.dtype), mean, var


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm (same variables, same forward), with `residual` added to its output and
    `relu=True` applying a ReLU last: `relu(residual + bn(x))` ends a residual block. With
    `LayerKernels.closed_form_batch_norm` its training mode differentiates with the closed form;
    with `LayerKernels.batch_norm_train` (`batch_norm_add_relu` where a residual and the ReLU
    follow) a float32 training-mode layer runs as that kernel instead, the ReLU and the add
    fused. Those paths compute nnx.BatchNorm's default form only (`_default_form`); a layer built
    with other options runs as nnx.BatchNorm."""

    def __call__(
        self, x, use_running_average=None, *, mask=None, relu: bool = False, residual=None
    ):
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = not use_running_average and mask is None
        grouped = _batch_norm_groups.get() if training else None
        if training and not self._default_form(x):
            if grouped is not None:
                raise ValueError(
                    "batch_norm='groups:N' computes BatchNorm over the last axis with a scale "
                    "and a bias and no axis_name; this layer is built otherwise"
                )
            training = False  # nnx.BatchNorm's own training mode, below
        kernels = current_kernels()
        inner_relu = relu and residual is None  # else the ReLU follows the add

        def end(y):
            if residual is not None:
                y = residual + y
            return nnx.relu(y) if relu else y

        if grouped is not None:
            y, mean, var = _grouped_batch_norm(
                x, self.scale[...], self.bias[...], self.epsilon, *grouped
            )
            y = self._update_and_cast(nnx.relu(y) if inner_relu else y, mean, var)
            return y if inner_relu else end(y)
        kernel = fused = None
        if training and x.ndim in (2, 4):
            kernel = float32_kernel(kernels.batch_norm_train, self.dtype, x, self.scale[...])
            if relu and residual is not None:
                fused = float32_kernel(
                    kernels.batch_norm_add_relu, self.dtype, x, self.scale[...], residual
                )
        if not kernel and not fused and not (training and kernels.closed_form_batch_norm):
            return end(super().__call__(x, use_running_average, mask=mask))
        scale, bias = varying_like(x, self.scale[...], self.bias[...])
        if fused:
            return self._update_and_cast(*fused(x, scale, bias, residual, self.epsilon))
        if kernel:
            y, mean, var = kernel(x, scale, bias, self.epsilon, inner_relu)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            y = nnx.relu(y) if inner_relu else y
        y = self._update_and_cast(y, mean, var)
        return y if inner_relu else end(y)

    def _default_form(self, x) -> bool:
        """Whether the layer is nnx.BatchNorm's default form, the one the kernel, the closed form
        and the grouped statistics compute: statistics per entry of the last axis over this
        device's batch (no axis_name), with a scale and a bias, the variance as E[x^2] - E[x]^2."""
        return (
            self.axis_name is None
            and self.use_scale
            and self.use_bias
            and self.use_fast_variance
            and self.axis % x.ndim == x.ndim - 1
        )

    def _update_and_cast(self, y, mean, var):
        """Updates the running statistics with a training batch's; `y` in the layer's dtype."""
        stop = jax.lax.stop_gradient
        self.mean[...] = stop(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = stop(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y.astype(self.dtype) if self.dtype is not None else y


def batch_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> BatchNorm:
    return BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
