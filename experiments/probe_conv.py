"""Where the CPU gap to PyTorch sits: four 3x3 convolutions + ReLU, forward and backward.

    python experiments/probe_conv.py                 # batch 128, the demo pair's three stage shapes
    python experiments/probe_conv.py --batch_norm    # conv + BatchNorm + ReLU, as in the networks
    python experiments/probe_conv.py --parts         # forward, + input grads, + weight grads

Times the gradient (input and weights) of `sum(relu(conv(...relu(conv(x, w1))...))^2)` at the
shapes of a Fashion-MNIST ResNet's three stages (28x28x16, 14x14x32, 7x7x64):
- `jax conv`: `lax.conv_general_dilated` (NHWC / HWIO), as the zoo's `nnx.Conv` compiles,
  under XLA's defaults (which hand some of these convolutions to YNNPACK library fusions);
- `jax conv, no YNNPACK`: the same with YNNPACK fusions off (compiler option
  `xla_cpu_experimental_ynn_fusion_type=""`), so every convolution runs XLA's own (Eigen)
  kernel, as under the project's `xla_cpu_ynn_fusion` settings other than `xla_default`;
- `jax conv NCHW`: the same with NCHW / OIHW dimension numbers (XLA picks the physical layout
  itself, so this should not matter);
- `jax im2col`: the same convolution as pad + nine shifted slices concatenated on channels +
  one `dot` (a candidate rewrite for XLA:CPU);
- `jax conv, dX before dW`: `jax conv, no YNNPACK` whose backward computes the input gradient
  first and the weight gradient only after it (a data dependence XLA cannot drop), instead of
  letting XLA:CPU run the two convolutions side by side on the two cores;
- `pytorch`: `torch.nn.functional.conv2d` in NCHW (oneDNN on a CPU), default threads.
With `--batch_norm` each convolution is followed by a training-mode BatchNorm without scale and
bias (batch statistics; in JAX written as flax's BatchNorm computes it, in PyTorch
`F.batch_norm`), so the difference between the two tables is BatchNorm's cost.
With `--parts` the script times, for `jax conv, no YNNPACK` and for PyTorch, three programs
instead: the forward pass alone (`forward`), forward + input gradients (`+ dX`), and forward +
input and weight gradients (`+ dX + dW`, the default table's program), so the differences are
what each part of the backward pass costs.
Each framework runs in its own subprocess (their thread pools would fight over the cores). The
JAX variants' weight gradients are checked against `jax conv`'s (1e-4 of their scale, 1e-2
with BatchNorm) before timing. The table gives min / median milliseconds over `--repeats` after
a warm-up; the script prints it in Markdown with the machine description and writes nothing
else. Results are quoted in docs/performance.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import bench_step  # experiments/, beside this script: the machine description
from absl import app, flags

SHAPES = ((28, 16), (14, 32), (7, 64))  # (height = width, channels) of each stage
LAYERS = 4

flags.DEFINE_integer("batch_size", 128, "Images a step.")
flags.DEFINE_integer("repeats", 20, "Timed calls after the warm-up.")
flags.DEFINE_bool("batch_norm", False, "A training-mode BatchNorm after each convolution.")
flags.DEFINE_bool("parts", False, "Time forward, + input gradients, + weight gradients apart.")
flags.DEFINE_string("worker", None, "Internal: jax or pytorch; prints JSON.")
FLAGS = flags.FLAGS


def time_ms(call, repeats: int) -> tuple[float, float]:
    """Min and median wall time of `call()` (which must block until its result is ready)."""
    for _ in range(3):  # compile / allocator warm-up
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def jax_worker(batch_size: int, repeats: int, batch_norm: bool, parts: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def conv_nchw(x, w):  # x is NHWC and w HWIO as for `conv`; only the convolution differs
        y = jax.lax.conv_general_dilated(
            x.transpose(0, 3, 1, 2),
            w.transpose(3, 2, 0, 1),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return y.transpose(0, 2, 3, 1)

    def conv_im2col(x, w):
        _, height, width, channels = x.shape
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        shifted = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
        # HWIO flattens in the same (row, column, channel) order as the concatenation.
        return jnp.concatenate(shifted, axis=-1) @ w.reshape(9 * channels, -1)

    @jax.custom_vjp
    def conv_dx_first(x, w):
        return conv(x, w)

    def conv_dx_first_backward(residuals, grad):
        x, w = residuals
        grad_x = jax.vjp(lambda x: conv(x, w), x)[1](grad)[0]
        # XLA does not fold `0 * a` for floats (NaN, inf), so this keeps dW after dX.
        x_after = x + jnp.zeros((), x.dtype) * grad_x[0, 0, 0, 0]
        return grad_x, jax.vjp(lambda w: conv(x_after, w), w)[1](grad)[0]

    conv_dx_first.defvjp(lambda x, w: (conv(x, w), (x, w)), conv_dx_first_backward)

    def normalize(y):  # flax's BatchNorm in training mode (its fast variance), no scale/bias
        mean = jnp.mean(y, (0, 1, 2))
        var = jnp.mean(jnp.square(y), (0, 1, 2)) - jnp.square(mean)
        return (y - mean) * jax.lax.rsqrt(var + 1e-5)

    def loss(conv_fn):
        def value(weights, x):
            for w in weights:
                y = conv_fn(x, w)
                x = jax.nn.relu(normalize(y) if batch_norm else y)
            return jnp.sum(x * x)

        return value

    def gradient(conv_fn, options=None, argnums=(0, 1)):
        return jax.jit(jax.grad(loss(conv_fn), argnums=argnums), compiler_options=options)

    no_ynnpack = {"xla_cpu_experimental_ynn_fusion_type": ""}
    if parts:
        programs = (
            ("jax forward", jax.jit(loss(conv), compiler_options=no_ynnpack), False),
            ("jax forward + dX", gradient(conv, no_ynnpack, argnums=1), False),
            ("jax forward + dX + dW", gradient(conv, no_ynnpack), True),
        )
    else:
        programs = (
            ("jax conv", gradient(conv), True),
            ("jax conv, no YNNPACK", gradient(conv, no_ynnpack), True),
            ("jax conv NCHW", gradient(conv_nchw), True),
            ("jax im2col", gradient(conv_im2col), True),
            ("jax conv, dX before dW", gradient(conv_dx_first, no_ynnpack), True),
        )
    reference = gradient(conv)

    def check(name, weight_gradients, expected, shape):
        tolerance = 1e-2 if batch_norm else 1e-4
        for ours, theirs in zip(weight_gradients, expected, strict=True):
            error = float(jnp.max(jnp.abs(ours - theirs)) / jnp.max(jnp.abs(theirs)))
            if error > tolerance:
                raise AssertionError(f"{name} at {shape}: error {error:.1e}")

    rng = np.random.default_rng(0)
    rows = {}
    for size, channels in SHAPES:
        x = jnp.asarray(rng.standard_normal((batch_size, size, size, channels), np.float32))
        scale = (2.0 / (9 * channels)) ** 0.5
        weights = [
            jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32) * scale)
            for _ in range(LAYERS)
        ]
        expected = reference(weights, x)[0]
        for name, step, gives_weight_gradients in programs:
            # The weight gradients must agree with `jax conv`'s, or the timing compares different
            # maths. (Not the input gradient: float32 rounding flips the odd ReLU whose input is
            # ~1e-7, which changes single elements of it by O(1); sums over the batch average
            # that out. With BatchNorm the weight gradient is a small difference of large terms,
            # BatchNorm's backward removing the mean and the x_hat component, so float32 rounding
            # of the convolutions shows up larger: im2col's 1.7e-3 at batch 128.)
            if gives_weight_gradients:
                check(name, step(weights, x)[0], expected, f"{size}x{size}x{channels}")
            rows.setdefault(name, []).append(
                time_ms(lambda s=step, w=weights, x=x: jax.block_until_ready(s(w, x)), repeats)
            )
    return rows


def torch_worker(batch_size: int, repeats: int, batch_norm: bool, parts: bool) -> dict:
    import numpy as np
    import torch

    def layers(h, weights):
        for w in weights:
            y = torch.nn.functional.conv2d(h, w, padding=1)
            if batch_norm:
                y = torch.nn.functional.batch_norm(y, None, None, training=True, eps=1e-5)
            h = torch.relu(y)
        return (h * h).sum()

    def forward(x, weights):
        with torch.no_grad():  # as JAX's forward program, which keeps nothing for a backward
            return layers(x, weights)

    def input_gradient(x, weights):
        frozen = [w.detach() for w in weights]
        return torch.autograd.grad(layers(x, frozen), [x])

    def all_gradients(x, weights):
        return torch.autograd.grad(layers(x, weights), [*weights, x])

    if parts:
        programs = (
            ("pytorch forward", forward),
            ("pytorch forward + dX", input_gradient),
            ("pytorch forward + dX + dW", all_gradients),
        )
    else:
        programs = (("pytorch", all_gradients),)
    rng = np.random.default_rng(0)
    rows = {}
    for size, channels in SHAPES:
        x = torch.from_numpy(rng.standard_normal((batch_size, channels, size, size), np.float32))
        x.requires_grad_(True)
        scale = (2.0 / (9 * channels)) ** 0.5
        weights = [
            torch.from_numpy(
                rng.standard_normal((channels, channels, 3, 3), np.float32) * scale
            ).requires_grad_(True)
            for _ in range(LAYERS)
        ]
        for name, program in programs:
            rows.setdefault(name, []).append(
                time_ms(lambda p=program, x=x, w=weights: p(x, w), repeats)
            )
    return rows


def main(argv):
    del argv
    if FLAGS.worker:
        worker = jax_worker if FLAGS.worker == "jax" else torch_worker
        print(json.dumps(worker(FLAGS.batch_size, FLAGS.repeats, FLAGS.batch_norm, FLAGS.parts)))
        return
    rows = {}
    for framework in ("jax", "pytorch"):
        out = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                f"--worker={framework}",
                f"--batch_size={FLAGS.batch_size}",
                f"--repeats={FLAGS.repeats}",
                f"--batch_norm={FLAGS.batch_norm}",
                f"--parts={FLAGS.parts}",
            ],
            check=True,
            stdout=subprocess.PIPE,  # the worker's errors go to the terminal
            text=True,
        ).stdout
        rows.update(json.loads(out.strip().splitlines()[-1]))
    layer = "3x3 conv + BatchNorm + ReLU" if FLAGS.batch_norm else "3x3 conv + ReLU"
    programs = "forward, + dX, + dX + dW" if FLAGS.parts else "forward + backward"
    cpu = bench_step.machine()
    print(
        f"{LAYERS} x ({layer}), {programs}, batch {FLAGS.batch_size}, "
        f"{cpu['cores']} cores, {cpu['cpu']} ({cpu['isa']}); min / median ms"
    )
    shapes = [f"{size}x{size}x{channels}" for size, channels in SHAPES]
    print("| | " + " | ".join(shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for name, times in rows.items():
        cells = " | ".join(f"{low:.1f} / {mid:.1f}" for low, mid in times)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    app.run(main)
