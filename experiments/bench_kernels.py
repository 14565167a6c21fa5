"""The demo pair's convolution and BatchNorm layers alone: oneDNN via jax.ffi, XLA, PyTorch.

    python experiments/bench_kernels.py                       # batch 128, 30 repeats
    python experiments/bench_kernels.py --threads=1           # oneDNN/PyTorch on one thread

For every distinct convolution of the ResNet-20 + ResNet-8 pair on Fashion-MNIST (and of its
fusion module) it times the forward pass, the input gradient (dX) and the weight gradient (dW),
and for every BatchNorm shape its training forward and backward, each as its own jitted call
on fixed random float32 data (min and median of `--repeats` after a warm-up):
- `onednn`: the `ffcl_jax.cpu_kernels` FFI targets, called directly;
- `xla`: `lax.conv_general_dilated` and its autodiff transposes, and `batch_norm.batch_norm_train`
  (the closed-form BatchNorm), compiled with the XLA:CPU settings the trainer uses for this
  pair (its YNNPACK list as a compiler option, `XLA_FLAGS` as the CLI sets them);
- `torch`: the PyTorch reference's ops on NCHW tensors (`aten.convolution_backward`,
  `aten.native_batch_norm_backward` for the parts), in a subprocess of its own.
Each layer's time is weighted by how often the pair uses it; the totals are the convolution
and BatchNorm work of one train step of the pair. Writes
`experiments/results/bench_kernels_<isa>.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import bench_results  # experiments/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, count in the demo pair, H, W, in channels, out channels, kernel, stride, groups)
CONVS = [
    ("stem 28x28 1->16", 2, 28, 28, 1, 16, 3, 1, 1),
    ("28x28 16->16", 8, 28, 28, 16, 16, 3, 1, 1),
    ("28->14 16->32 s2", 2, 28, 28, 16, 32, 3, 2, 1),
    ("28->14 16->32 1x1 s2", 2, 28, 28, 16, 32, 1, 2, 1),
    ("14x14 32->32", 6, 14, 14, 32, 32, 3, 1, 1),
    ("14->7 32->64 s2", 2, 14, 14, 32, 64, 3, 2, 1),
    ("14->7 32->64 1x1 s2", 2, 14, 14, 32, 64, 1, 2, 1),
    ("7x7 64->64", 6, 7, 7, 64, 64, 3, 1, 1),
    ("fusion 7x7 depthwise 128", 1, 7, 7, 128, 128, 3, 1, 128),
    ("fusion 7x7 1x1 128->64", 1, 7, 7, 128, 64, 1, 1, 1),
]
# (name, count, H, W, channels): every BatchNorm of the pair, by output shape.
BATCH_NORMS = [
    ("bn 28x28x16", 10, 28, 28, 16),
    ("bn 14x14x32", 10, 14, 14, 32),
    ("bn 7x7x64", 11, 7, 7, 64),
    ("bn 7x7x128", 1, 7, 7, 128),
]
CONV_PARTS = ("fwd", "dX", "dW")
BN_PARTS = ("fwd", "bwd")


def _time(fn, args, repeats: int) -> dict:
    fn(*args)
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times)}


def _jax_inputs(rng, batch, h, w, cin, cout, k, stride, groups):
    import jax.numpy as jnp

    pad = k // 2
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, out_h, out_w, cout)), jnp.float32)
    return x, wt, dy, ((pad, pad), (pad, pad))


def _conv_jax(backend: str, strides, padding, groups, options):
    """Jitted forward, input-gradient and weight-gradient functions of one convolution."""
    import jax

    from ffcl_jax.cpu_kernels import ops

    if backend == "onednn":

        def backward(x, wt, dy):
            return ops._conv2d_bwd(strides, padding, groups, (x, wt), dy)

        return (
            # The training form of the forward pass, as the train step runs it.
            jax.jit(lambda x, wt: ops._conv2d_fwd(x, wt, strides, padding, groups)[0]),
            jax.jit(lambda x, wt, dy: backward(x, wt, dy)[0]),
            jax.jit(lambda x, wt, dy: backward(x, wt, dy)[1]),
        )

    def conv(x, wt):
        return jax.lax.conv_general_dilated(
            x,
            wt,
            strides,
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    def d_x(x, wt, dy):
        return jax.vjp(lambda x: conv(x, wt), x)[1](dy)[0]

    def d_w(x, wt, dy):
        return jax.vjp(lambda wt: conv(x, wt), wt)[1](dy)[0]

    return tuple(jax.jit(f, compiler_options=options) for f in (conv, d_x, d_w))


def _blocking(fn):
    import jax

    return lambda *args: jax.block_until_ready(fn(*args))


def run_jax(backend: str, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import fashion_mnist
    from ffcl_jax import cpu_kernels, xla_cpu
    from ffcl_jax.cpu_kernels import ops
    from ffcl_jax.models import batch_norm

    options = xla_cpu.compiler_options(fashion_mnist.get_config())
    if backend == "onednn" and not cpu_kernels.available():
        sys.exit(f"bench_kernels: {cpu_kernels.unavailable_reason()}")
    rng = np.random.default_rng(0)
    out = {}
    for name, _, h, w, cin, cout, k, stride, groups in CONVS:
        x, wt, dy, padding = _jax_inputs(rng, batch, h, w, cin, cout, k, stride, groups)
        fwd, d_x, d_w = _conv_jax(backend, (stride, stride), padding, groups, options)
        out[name] = {
            "fwd": _time(_blocking(fwd), (x, wt), repeats),
            "dX": _time(_blocking(d_x), (x, wt, dy), repeats),
            "dW": _time(_blocking(d_w), (x, wt, dy), repeats),
        }
    bn = ops.batch_norm_train if backend == "onednn" else batch_norm.batch_norm_train

    def bn_forward(x, s, b):
        return bn(x, s, b, batch_norm.BN_EPSILON)

    def bn_backward(x, s, b, dy):
        return jax.vjp(lambda *a: bn(*a, batch_norm.BN_EPSILON)[0], x, s, b)[1](dy)

    fwd = jax.jit(bn_forward, compiler_options=options)
    bwd = jax.jit(bn_backward, compiler_options=options)
    for name, _, h, w, c in BATCH_NORMS:
        x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
        scale, bias = jnp.ones(c), jnp.zeros(c)
        dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        forward = _time(_blocking(fwd), (x, scale, bias), repeats)
        # The backward's jit also runs the forward (its residuals): report the difference.
        both = _time(_blocking(bwd), (x, scale, bias, dy), repeats)
        out[name] = {
            "fwd": forward,
            "bwd": {key: max(both[key] - forward[key], 0.0) for key in both},
        }
    return out


def _torch_conv_parts(x, wt, dy, stride, pad, groups):
    import torch

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, wt, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], groups, mask
        )

    return (
        lambda: torch.nn.functional.conv2d(x, wt, None, stride, pad, 1, groups),
        backward([True, False, False]),
        backward([False, True, False]),
    )


def _torch_batch_norm_parts(x, dy):
    import torch

    aten = torch.ops.aten
    c = x.shape[1]
    scale, bias = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    stats = (running_mean, running_var)
    _, mean, invstd = aten.native_batch_norm(x, scale, bias, *stats, True, 0.1, 1e-5)
    return (
        lambda: aten.native_batch_norm(x, scale, bias, *stats, True, 0.1, 1e-5),
        lambda: aten.native_batch_norm_backward(
            dy, x, scale, *stats, mean, invstd, True, 1e-5, [True] * 3
        ),
    )


def run_torch(batch: int, repeats: int) -> dict:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)

    def tensor(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    out = {}
    with torch.no_grad():
        for name, _, h, w, cin, cout, k, stride, groups in CONVS:
            x, wt = tensor((batch, cin, h, w)), tensor((cout, cin // groups, k, k))
            dy = torch.randn_like(
                torch.nn.functional.conv2d(x, wt, None, stride, k // 2, 1, groups)
            )
            parts = _torch_conv_parts(x, wt, dy, stride, k // 2, groups)
            out[name] = {
                part: _time(fn, (), repeats) for part, fn in zip(CONV_PARTS, parts, strict=True)
            }
        for name, _, h, w, c in BATCH_NORMS:
            x = tensor((batch, c, h, w))
            parts = _torch_batch_norm_parts(x, torch.randn_like(x))
            out[name] = {
                part: _time(fn, (), repeats) for part, fn in zip(BN_PARTS, parts, strict=True)
            }
    return out


def _weighted(results: dict, key: str, names) -> float:
    counts = {row[0]: row[1] for row in CONVS + BATCH_NORMS}
    return sum(counts[n] * sum(part[key] for part in results[n].values()) for n in names)


def table(results: dict) -> str:
    frameworks = list(results)
    lines = [
        "| layer (x count) | part | "
        + " | ".join(f"{f} min / median ms" for f in frameworks)
        + " | xla / onednn (median) |",
        "|---|---|" + "---|" * len(frameworks) + "---|",
    ]
    for row in CONVS + BATCH_NORMS:
        name, count = row[0], row[1]
        for part in CONV_PARTS if row in CONVS else BN_PARTS:
            cells = [results[f][name][part] for f in frameworks]
            ratio = "-"
            if "onednn" in results and "xla" in results:
                medians = [results[f][name][part]["median_ms"] for f in ("xla", "onednn")]
                ratio = f"{medians[0] / medians[1]:.2f}" if medians[1] > 0 else "-"
            lines.append(
                f"| {name} (x{count}) | {part} | "
                + " | ".join(f"{c['min_ms']:.2f} / {c['median_ms']:.2f}" for c in cells)
                + f" | {ratio} |"
            )
    groups = {
        "16-channel convolutions (28x28)": [r[0] for r in CONVS if r[2] == 28],
        "all convolutions": [r[0] for r in CONVS],
        "all BatchNorms": [r[0] for r in BATCH_NORMS],
        "convolutions + BatchNorms": [r[0] for r in CONVS + BATCH_NORMS],
    }
    lines += [
        "",
        "| demo pair, weighted by count (median ms) | "
        + " | ".join(frameworks)
        + " | xla / onednn | torch / onednn |",
        "|---|" + "---|" * (len(frameworks) + 2),
    ]
    for label, names in groups.items():
        totals = {f: _weighted(results[f], "median_ms", names) for f in frameworks}
        ratios = [
            f"{totals[other] / totals['onednn']:.2f}"
            if "onednn" in totals and other in totals and totals["onednn"] > 0
            else "-"
            for other in ("xla", "torch")
        ]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{totals[f]:.1f}" for f in frameworks)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--frameworks", default="onednn,xla,torch")
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS for oneDNN and torch (0: as set)"
    )
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    if args.one:
        if args.one == "torch":
            result = run_torch(args.batch, args.repeats)
        else:
            result = run_jax(args.one, args.batch, args.repeats)
        print(json.dumps(result))
        return
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # The CLI's process setting (XLA_FLAGS); the compiler options are set per jit above.
    from configs import fashion_mnist
    from ffcl_jax import process_env, xla_cpu

    config = fashion_mnist.get_config()
    env["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, env.get("XLA_FLAGS", ""))
    results = {}
    for framework in args.frameworks.split(","):
        # One process per framework, one after the other: their thread pools never compete.
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--one={framework}",
                f"--batch={args.batch}",
                f"--repeats={args.repeats}",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"bench_kernels: {framework} failed:\n{proc.stderr[-2000:]}")
        results[framework] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{framework}: done", file=sys.stderr)
    machine = bench_results.machine()
    command = "python experiments/bench_kernels.py " + " ".join(sys.argv[1:])
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads or "default",
        "xla_flags": env["XLA_FLAGS"],
        "glibc_tunables": process_env.tunables_in_effect(env.get("GLIBC_TUNABLES", "")),
        "command": command.strip(),
        "results": results,
    }
    output = args.output or os.path.join(
        bench_results.RESULTS,
        f"bench_kernels_{machine['isa'].lower().replace('-', '')}"
        + (f"_threads{args.threads}" if args.threads else "")
        + ".json",
    )
    with open(output, "w") as f:
        json.dump(record, f, indent=1)
    print(
        f"{machine['cores']}-core {machine['cpu']} ({machine['isa']}), batch {args.batch}, "
        f"{args.repeats} repeats; `{record['command']}` -> {output}\n"
    )
    print(table(results))


if __name__ == "__main__":
    from ffcl_jax import process_env

    # As the CLI runs: malloc as `$FFCL_MALLOC` says (the worker processes inherit it).
    env = process_env.with_malloc(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    main()
