"""FFSD's heads besides its fusion module (`models.fusion.FusionModule`, fed detached maps): the
leader's trans-fusion head and the self-distillation decoders (docs/baseline_sources/ffsd.md).

`TransFusion`: depthwise 3x3 conv -> BN -> ReLU -> 1x1 conv to the fusion module's input
channels -> BN -> ReLU, on the leader's last-stage map; its attention learns that of the
students' concatenated last maps. `Decoder`: one block per stage below the last, each a
transposed 3x3 convolution of stride 2 (PyTorch's `ConvTranspose2d(k=3, s=2, p=1,
output_padding=1)`: the resolution doubles exactly) -> BN -> ReLU, from a last-stage map back to
a network's earlier stages' channels; its outputs, deepest first, are returned shallowest first
so that output k pairs with stage k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.batch_norm import batch_norm
from ffcl_jax.models.layers import conv, float32_layer_kernel


def _uniform_init(fan_in: int):
    """PyTorch's default for convolutions: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ConvTranspose(nnx.Module):
    """Bias-free `ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)`.

    The kernel is kept as (kh, kw, out, in), so that the converter's conv layout
    (`convert._kernel_to_torch`) gives PyTorch's (in, out, kh, kw); PyTorch leaves the authors'
    decoders at its default init, U(+-1/sqrt(out * 9)) (its fan-in of a transposed kernel)."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype=None, rngs: nnx.Rngs):
        init = _uniform_init(out_ch * 9)
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, out_ch, in_ch), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        transpose, (kernel,) = float32_layer_kernel("conv2d_transpose", self.dtype, x, kernel)
        if transpose is not None:  # (kh, kw, out, in) is the HWIO kernel of the convolution
            n, h, w, _ = x.shape
            return transpose(
                x, kernel, (2, 2), ((1, 1), (1, 1)), (n, 2 * h, 2 * w, kernel.shape[2])
            )
        # The gradient of a stride-2 convolution: dilate the input, pad (k-1-p, k-1-p+op), and
        # correlate with the spatially flipped kernel, in and out swapped.
        hwio = jnp.transpose(kernel, (0, 1, 3, 2))[::-1, ::-1]
        return jax.lax.conv_general_dilated(
            x,
            hwio,
            window_strides=(1, 1),
            padding=((1, 2), (1, 2)),
            lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class DecoderBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv = ConvTranspose(in_ch, out_ch, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train, relu=True)


class Decoder(nnx.Module):
    """From a last-stage map to maps of every earlier stage of a network with `stage_channels`."""

    def __init__(self, stage_channels: tuple[int, ...], *, dtype=None, rngs: nnx.Rngs):
        channels = list(reversed(stage_channels))  # deepest first
        self.blocks = nnx.List(
            [
                DecoderBlock(a, b, dtype=dtype, rngs=rngs)
                for a, b in zip(channels, channels[1:], strict=False)
            ]
        )

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        """The decoded maps, shallowest stage first (one fewer than the network's stages)."""
        outputs = []
        for block in self.blocks:
            x = block(x, train=train)
            outputs.append(x)
        return outputs[::-1]


class TransFusion(nnx.Module):
    def __init__(self, channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs):
        self.depthwise = conv(channels, channels, 3, groups=channels, dtype=dtype, rngs=rngs)
        self.depthwise_bn = batch_norm(channels, dtype=dtype, rngs=rngs)
        self.pointwise = conv(channels, out_channels, 1, dtype=dtype, rngs=rngs)
        self.pointwise_bn = batch_norm(out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        frozen = not train
        x = self.depthwise_bn(self.depthwise(x), use_running_average=frozen, relu=True)
        return self.pointwise_bn(self.pointwise(x), use_running_average=frozen, relu=True)
