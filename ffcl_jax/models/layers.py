"""Layer constructors shared by the model zoo, initialised as the PyTorch CIFAR KD zoos do.

The PyTorch references (RepDistiller, FFL-pytorch) initialise convolutions with
`kaiming_normal_(mode="fan_out", nonlinearity="relu")` (an *untruncated* normal), BatchNorm with
scale 1 / bias 0, and leave `nn.Linear` at its default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for
both weight and bias. Matching them keeps accuracy comparable and makes weight conversion to the
PyTorch reference a pure re-layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ffcl_jax.errors import UserError

# torch.nn.init.kaiming_normal_(mode="fan_out"): He-normal on fan_out ("normal" is untruncated).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# PyTorch BatchNorm2d defaults: momentum 0.1 (flax: 0.9 on the running average), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """How the layers compute, where a backend has something faster than XLA's own: the seam
    through which the trainer hands an accelerator (`ffcl_jax.xla_cpu.layer_kernels`: oneDNN on
    XLA:CPU) to the models, which know none. The defaults are XLA's ops.

    `conv2d(x, w, strides, padding, groups)` replaces float32, bias-free, undilated NHWC
    convolutions; `conv2d_transpose(y, w, strides, padding, out_shape)` their transposes (the
    input gradient of `conv2d(., w, strides, padding, 1)` as a layer); `batch_norm_train(x,
    scale, bias, epsilon, relu) -> (y, mean, var)` replaces float32 training-mode BatchNorm (its
    ReLU fused); `batch_norm_add_relu(x, scale, bias, residual, epsilon) -> (relu(residual + y),
    mean, var)` replaces it where a residual block ends; `closed_form_batch_norm`: training-mode
    BatchNorm differentiates with the closed form (`batch_norm_train` below); `scan_blocks`: the
    identical blocks of a stage run as one `jax.lax.scan` (`scan_blocks` below), which the
    compiler builds once per stage instead of once per block; `remat`: what a residual block's
    backward pass keeps from its forward pass
    (`REMAT_POLICIES`, `run_block` below)."""

    conv2d: Callable | None = None
    conv2d_transpose: Callable | None = None
    batch_norm_train: Callable | None = None
    batch_norm_add_relu: Callable | None = None
    closed_form_batch_norm: bool = False
    scan_blocks: bool = False
    remat: str = "auto"


XLA_OPS = LayerKernels()  # the layers as written: every op XLA's
_kernels = contextvars.ContextVar("layer_kernels", default=XLA_OPS)  # noqa: B039 - frozen


@contextlib.contextmanager
def layer_kernels(kernels: LayerKernels):
    """While a step is traced under it, the layers compute with `kernels`."""
    token = _kernels.set(kernels)
    try:
        yield
    finally:
        _kernels.reset(token)


# What a residual block's backward pass keeps from its forward pass (`config.remat`): "none",
# whatever autodiff saves (BatchNorm's float32 intermediates, the ReLUs' outputs); "conv_outputs",
# only the convolutions' outputs (named CONV_OUTPUT in `Conv`), BatchNorm's apply, the ReLUs and
# the adds recomputed from them; "dots", every convolution's and matrix product's output; "auto",
# "dots" in a `scan_blocks` loop's body (else the loop stacks every residual of a block) and
# "none" for unrolled blocks, where the TPU compiler's own choices moved fewer bytes
# (docs/performance.md).
REMAT_POLICIES = ("auto", "none", "conv_outputs", "dots")
CONV_OUTPUT = "conv_output"


def remat_policy(name: str, *, scanned: bool = False):
    """The `jax.checkpoint` policy of `config.remat` (`REMAT_POLICIES`) for an unrolled block or
    a loop's body (`scanned`); None for none."""
    if name == "auto":
        name = "dots" if scanned else "none"
    if name == "conv_outputs":
        return jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
    if name == "dots":
        return jax.checkpoint_policies.dots_saveable
    if name == "none":
        return None
    raise UserError(f"config.remat={name!r}: use one of {', '.join(REMAT_POLICIES)}")


def _float32_kernel(kernel: Callable | None, module_dtype, *arrays) -> Callable | None:
    """`kernel` for a layer that computes in float32 on float32 arrays, else None."""
    if kernel is None or module_dtype not in (None, jnp.float32):
        return None
    if any(a.dtype != jnp.float32 for a in arrays):
        return None
    return kernel


def float32_layer_kernel(name: str, module_dtype, x, *params) -> tuple[Callable | None, tuple]:
    """`(LayerKernels.<name>, params)` for a layer that computes in float32 on float32 arrays,
    the params cast to vary like `x` (`_varying_like`); `(None, params)` where XLA computes."""
    kernel = _float32_kernel(getattr(_kernels.get(), name), module_dtype, x, *params)
    if kernel is None:
        return None, params
    return kernel, _varying_like(x, *params)


def _varying_like(x, *params):
    """`params` cast to vary over the shard_map mesh axes `x` varies over (per-device
    BatchNorm): a custom VJP cannot return the per-shard gradient of an invariant input; the
    transpose of this cast sums the parameters' gradient over the shards, as autodiff does."""
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(params[0])))
    if not missing:
        return params
    return tuple(jax.lax.pcast(v, missing, to="varying") for v in params)


class Conv(nnx.Conv):
    """nnx.Conv (same variables, same result); a float32, bias-free, undilated convolution runs
    as `LayerKernels.conv2d` where the trainer set one."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        undilated = {self.input_dilation, self.kernel_dilation} <= {None, 1, (1, 1)}
        explicit = all(isinstance(v, (tuple, list)) for v in (self.padding, self.strides))
        plain = self.bias is None and self.mask is None and undilated and explicit
        conv2d = _float32_kernel(_kernels.get().conv2d, self.dtype, inputs, kernel)
        if not (plain and inputs.ndim == 4 and conv2d):
            return self._named(super().__call__(inputs))
        (kernel,) = _varying_like(inputs, kernel)
        y = conv2d(
            inputs,
            kernel,
            tuple(self.strides),
            tuple(map(tuple, self.padding)),
            self.feature_group_count,
        )
        return self._named(y)

    @staticmethod
    def _named(y: jax.Array) -> jax.Array:
        """`y` named for the "conv_outputs" remat policy; untouched otherwise, so that a step
        without it traces as before."""
        if _kernels.get().remat != "conv_outputs":
            return y
        return checkpoint_name(y, CONV_OUTPUT)


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    *,
    groups: int = 1,
    dtype=None,
    rngs: nnx.Rngs,
) -> Conv:
    """Bias-free convolution with PyTorch-style symmetric padding (`padding=kernel // 2`).

    Explicit padding rather than "SAME": for stride 2 on an even size, "SAME" pads (0, 1) while
    PyTorch pads (1, 1), which shifts every downsampled feature map by one pixel.
    """
    pad = kernel // 2
    return Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


# In training mode, BatchNorm's backward pass as autodiff writes it goes through the variance
# formula term by term: on XLA:CPU that is many separate broadcasts and reductions per layer. The
# closed form (two per-channel sums of the incoming gradient) is the same maths and makes a deep
# pair's step faster on the CPU (`LayerKernels.closed_form_batch_norm`).


@contextlib.contextmanager
def closed_form_batch_norm_backward(enabled: bool = True):
    """While tracing under it, `BatchNorm` in training mode uses `batch_norm_train`."""
    with layer_kernels(dataclasses.replace(_kernels.get(), closed_form_batch_norm=enabled)):
        yield


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` upcast to float32 when narrower (bfloat16), kept when wider (`compute_dtype="float64"`,
    for exact comparisons): statistics, pooled means and the loss terms need no less."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes `x` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier versions


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
        kernels = _kernels.get()
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
            kernel = _float32_kernel(kernels.batch_norm_train, self.dtype, x, self.scale[...])
            if relu and residual is not None:
                fused = _float32_kernel(
                    kernels.batch_norm_add_relu, self.dtype, x, self.scale[...], residual
                )
        if not kernel and not fused and not (training and kernels.closed_form_batch_norm):
            return end(super().__call__(x, use_running_average, mask=mask))
        scale, bias = _varying_like(x, self.scale[...], self.bias[...])
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


def _torch_linear_bias_init(fan_in: int):
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(in_features: int, out_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=dense_kernel_init,
        bias_init=_torch_linear_bias_init(in_features),
        dtype=dtype,
        rngs=rngs,
    )


def build_stages(block, in_ch: int, widths, blocks_per_stage: int, *, dtype, rngs: nnx.Rngs):
    """Three-stage CIFAR layout: `blocks_per_stage` blocks per width, the first block of every
    stage but the first downsampling by 2. Returns the stages and the final channel count."""
    stages = []
    for stage_index, width in enumerate(widths):
        blocks = []
        for block_index in range(blocks_per_stage):
            stride = 2 if stage_index > 0 and block_index == 0 else 1
            blocks.append(block(in_ch, width, stride, dtype=dtype, rngs=rngs))
            in_ch = width
        stages.append(nnx.List(blocks))
    return nnx.List(stages), in_ch


class ZooNetwork(nnx.Module):
    """A zoo network in parts: `stem`, its `stages` (each a list of blocks), `head`. Its
    forward pass returns `(logits, stage maps)`; multi-branch networks (models/branches.py) run
    the same parts separately, so a branch is the zoo network's own code."""

    def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
        raise NotImplementedError

    def head(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """`(logits, last stage map)` from the last stage's output."""
        raise NotImplementedError

    def run_stage(self, index: int, x: jax.Array, *, train: bool) -> jax.Array:
        blocks = list(self.stages[index])
        if _kernels.get().scan_blocks and len(blocks) > 2:
            # The first block changes the stride or the width; the others are alike.
            return scan_blocks(blocks[1:], run_block(blocks[0], x, train=train), train=train)
        for block in blocks:
            x = run_block(block, x, train=train)
        return x

    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        x = self.stem(x, train=train)
        features = []
        for index in range(len(self.stages)):
            x = self.run_stage(index, x, train=train)
            features.append(x)
        logits, features[-1] = self.head(x, train=train)
        return logits, features


def run_block(block, x: jax.Array, *, train: bool) -> jax.Array:
    """`block(x)`, in training under `jax.checkpoint` with the `LayerKernels.remat` policy: its
    backward pass recomputes from the saved values what the policy does not save. The block's
    BatchNorm statistics are written back as a plain call leaves them."""
    policy = remat_policy(_kernels.get().remat)
    if policy is None or not train:
        return block(x, train=train)
    graphdef, state = nnx.split(block)

    def forward(state, x):
        block = nnx.merge(graphdef, state)
        return block(x, train=True), nnx.state(block, nnx.BatchStat)

    y, stats = jax.checkpoint(forward, policy=policy)(state, x)
    nnx.update(block, stats)
    return y


def scan_blocks(blocks, x: jax.Array, *, train: bool) -> jax.Array:
    """`x` through `blocks` in order, as one `jax.lax.scan` over their variables stacked on a new
    leading axis: the compiler builds one block's forward and backward pass, not one per block.
    The blocks keep their own variables (checkpoints, export and conversion see one layout):
    the stack is built here, its gradient flows back to each block's parameters, and the
    BatchNorm statistics the scan updates are written back to each block. Blocks that differ
    in structure run one after the other instead."""
    graphdef = nnx.graphdef(blocks[0])
    if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
        for block in blocks:
            x = run_block(block, x, train=train)
        return x
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])

    def body(carry, state):
        block = nnx.merge(graphdef, state)
        y = block(carry, train=train)
        return y, nnx.state(block, nnx.BatchStat) if train else None

    # The remat policy (`run_block`) applies to the loop's body; without one ("none") autodiff
    # stacks every residual of a block over the loop, where the compiler can no longer
    # recompute them instead. Inside a scan no CSE can merge the recomputation with the forward.
    policy = remat_policy(_kernels.get().remat, scanned=True) if train else None
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, stats = jax.lax.scan(body, x, stacked)
    if train:  # each block's running statistics, as the unrolled blocks leave them
        for i, block in enumerate(blocks):
            nnx.update(block, jax.tree.map(lambda leaf, i=i: leaf[i], stats))
    return x


def member_views(images: jax.Array, count: int) -> list[jax.Array]:
    """The image batch each of `count` cohort members sees: one NHWC batch shared by all, or,
    for a batch of views (`batch x views x H x W x C`, `input_pipeline`'s `num_views`), view i
    for member i."""
    if images.ndim == 4:
        return [images] * count
    if images.shape[1] != count:
        raise ValueError(f"a batch of {images.shape[1]} views for {count} cohort members")
    return [images[:, i] for i in range(count)]


def global_avg_pool(x: jax.Array) -> jax.Array:
    """NHWC -> NC, averaged in at least float32 so that bf16 runs do not lose the mean."""
    return jnp.mean(at_least_float32(x), axis=(1, 2)).astype(x.dtype)


def avg_pool_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Average-pools an NHWC map down to spatial `size` with a window equal to the stride.

    Used to match feature maps of different resolutions (fusion, attention transfer); the
    ratio must be an integer so that every output pixel averages the same number of inputs.
    """
    h, w = x.shape[1:3]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if h % th or w % tw or h < th or w < tw:
        raise UserError(
            f"cannot average-pool a {h}x{w} feature map to {th}x{tw}: the larger size must be an "
            "integer multiple of the smaller; choose networks whose stage resolutions divide"
        )
    window = (h // th, w // tw)
    return nnx.avg_pool(x, window_shape=window, strides=window)
