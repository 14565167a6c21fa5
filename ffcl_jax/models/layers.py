"""Layer constructors shared by the model zoo, initialised as the PyTorch CIFAR KD zoos do.

The PyTorch references (RepDistiller, FFL-pytorch) initialise convolutions with
`kaiming_normal_(mode="fan_out", nonlinearity="relu")` (an *untruncated* normal), BatchNorm with
scale 1 / bias 0, and leave `nn.Linear` at its default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for
both weight and bias. Matching them keeps accuracy comparable and makes weight conversion to the
PyTorch reference a pure re-layout.

BatchNorm, with its training-mode backward and device-group statistics, is in `batch_norm`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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
    BatchNorm differentiates with the closed form (`batch_norm.batch_norm_train`); `scan_blocks`:
    the identical blocks of a stage run as one `jax.lax.scan` (`scan_blocks` below), which the
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
# The fields that swap in a kernel for one of XLA's ops: those whose default (None) means XLA's.
KERNEL_FIELDS = tuple(
    field.name for field in dataclasses.fields(LayerKernels) if field.default is None
)


def with_xla_ops(kernels: LayerKernels) -> LayerKernels:
    """`kernels` with every swapped-in kernel back to XLA's op, the other choices kept."""
    return dataclasses.replace(kernels, **dict.fromkeys(KERNEL_FIELDS))


_kernels = contextvars.ContextVar("layer_kernels", default=XLA_OPS)  # noqa: B039 - frozen


def current_kernels() -> LayerKernels:
    """What the layers compute with in the step being traced (`layer_kernels`)."""
    return _kernels.get()


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


def float32_kernel(kernel: Callable | None, module_dtype, *arrays) -> Callable | None:
    """`kernel` for a layer that computes in float32 on float32 arrays, else None."""
    if kernel is None or module_dtype not in (None, jnp.float32):
        return None
    if any(a.dtype != jnp.float32 for a in arrays):
        return None
    return kernel


def float32_layer_kernel(name: str, module_dtype, x, *params) -> tuple[Callable | None, tuple]:
    """`(LayerKernels.<name>, params)` for a layer that computes in float32 on float32 arrays,
    the params cast to vary like `x` (`varying_like`); `(None, params)` where XLA computes."""
    kernel = float32_kernel(getattr(current_kernels(), name), module_dtype, x, *params)
    if kernel is None:
        return None, params
    return kernel, varying_like(x, *params)


def varying_like(x, *params):
    """`params` cast to vary over the shard_map mesh axes `x` varies over (per-device
    BatchNorm): a custom VJP cannot return the per-shard gradient of an invariant input; the
    transpose of this cast sums the parameters' gradient over the shards, as autodiff does."""
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(params[0])))
    if not missing:
        return params
    return tuple(jax.lax.pcast(v, missing, to="varying") for v in params)


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes `x` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier versions


class Conv(nnx.Conv):
    """nnx.Conv (same variables, same result); a float32, bias-free, undilated convolution runs
    as `LayerKernels.conv2d` where the trainer set one."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        undilated = {self.input_dilation, self.kernel_dilation} <= {None, 1, (1, 1)}
        explicit = all(isinstance(v, (tuple, list)) for v in (self.padding, self.strides))
        plain = self.bias is None and self.mask is None and undilated and explicit
        conv2d, (kernel,) = float32_layer_kernel("conv2d", self.dtype, inputs, kernel)
        if not (plain and inputs.ndim == 4 and conv2d):
            return self._named(super().__call__(inputs))
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
        if current_kernels().remat != "conv_outputs":
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


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` upcast to float32 when narrower (bfloat16), kept when wider (`compute_dtype="float64"`,
    for exact comparisons): statistics, pooled means and the loss terms need no less."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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
        if current_kernels().scan_blocks and len(blocks) > 2:
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
    policy = remat_policy(current_kernels().remat)
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
    policy = remat_policy(current_kernels().remat, scanned=True) if train else None
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
