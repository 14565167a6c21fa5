"""Probe: the demo's steps compiled with and without a warm persistent compilation cache.

    PYTHONPATH=. JAX_PLATFORMS=cpu python experiments/compile_cache_probe.py --pairs=2 \
        --output=experiments/results/compile_cache_fashion_mnist_demo_cpu.json

Every measurement is a fresh process that sets itself up as `python -m ffcl_jax.main` does
(XLA_FLAGS from the config, then `compilation_cache.configure`), builds the train and eval steps
of `configs/fashion_mnist.py:demo` as the trainer does (`train.build`, `train.jit_steps`) and
times their compilation (`Lowered.compile`: XLA's compile, or the load of a cached program) apart
from tracing and lowering (which every process pays; the cache does not hold them). A cold
process gets an empty cache folder, the warm one right after it the folder the cold one filled.
JAX's default threshold applies, as in the trainer: only programs that took >= 1 s to compile
are written. Only ratios within a pair mean anything on a machine shared with other work.

    PYTHONPATH=.:LIBTPU_SITE JAX_PLATFORMS=cpu python experiments/compile_cache_probe.py \
        --tpu_topology=v5e:2x2 --output=experiments/results/compile_cache_tpu_compile_only.json

does the same for a small jitted function compiled for a TPU slice's compile-only devices (what
`ffcl_jax.compile_for` compiles on), and records whether the warm process loads it and what JAX
warned.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(cache_dir: str) -> dict:
    from configs.fashion_mnist import get_config
    from ffcl_jax import xla_cpu

    config = get_config("demo")
    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, os.environ.get("XLA_FLAGS", ""))
    import jax
    import jax.numpy as jnp

    from ffcl_jax import compilation_cache, input_pipeline, train
    from ffcl_jax.config_base import check_config, eval_batch_size
    from ffcl_jax.parallel import DataParallel

    compilation_cache.configure(cache_dir)
    data_parallel = DataParallel(config.mesh.data)
    method = check_config(config, data_parallel.size)
    steps = input_pipeline.steps_per_epoch(config.train_examples, config.batch_size)
    setup, state = train.build(config, method, steps, data_parallel)
    train_step, eval_step = train.jit_steps(setup, config)
    state = jax.device_put(state, data_parallel.replicated)
    shape, data = setup.info.image_shape, data_parallel.data
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, *shape), jnp.uint8, sharding=data),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=data),
    }
    n = eval_batch_size(config, data_parallel.size)
    eval_batch = {
        "image": jax.ShapeDtypeStruct((n, *shape), jnp.uint8, sharding=data),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data),
        "mask": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=data),
    }
    result, method_state = {}, state.method_state
    with jax.set_mesh(data_parallel.mesh):
        for name, jitted, args in (
            ("train_step", train_step, (state, batch)),
            ("eval_step", eval_step, (state.params, state.batch_stats, eval_batch, method_state)),
        ):
            started = time.perf_counter()
            lowered = jitted.trace(*args).lower()
            lowered_at = time.perf_counter()
            with compilation_cache.Counter() as cache:
                lowered.compile()
            result[name] = {
                "trace_and_lower_seconds": lowered_at - started,
                "compile_seconds": time.perf_counter() - lowered_at,
                "compilation_cache": cache.summary(),
            }
    result["onednn_kernels"] = setup.onednn_kernels
    return result


def tpu_child(cache_dir: str, topology: str) -> dict:
    import warnings

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ffcl_jax import compilation_cache, compile_for

    compilation_cache.configure(cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # a small program
    devices = compile_for.topology_devices(topology)
    mesh = jax.make_mesh(
        (len(devices),), ("d",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    f = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
    with warnings.catch_warnings(record=True) as caught, compilation_cache.Counter() as cache:
        warnings.simplefilter("always")
        with jax.set_mesh(mesh):
            lowered = f.trace(x).lower(lowering_platforms=("tpu",))
            started = time.perf_counter()
            lowered.compile()
    return {
        "compile_seconds": time.perf_counter() - started,
        "compilation_cache": cache.summary(),
        "warnings": [str(w.message) for w in caught],
    }


def run_child(cache_dir: str, topology: str = "") -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, f"--child={cache_dir}", f"--tpu_topology={topology}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--output")
    parser.add_argument("--tpu_topology", default="")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.tpu_topology:
            print(json.dumps(tpu_child(args.child, args.tpu_topology)))
        else:
            print(json.dumps(child(args.child)))
        return
    if args.tpu_topology:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = run_child(cache_dir, args.tpu_topology)
            warm = run_child(cache_dir, args.tpu_topology)
        report = {
            "what": "a small jitted function compiled for a TPU slice's compile-only devices, "
            "in a fresh process with an empty cache folder, then one with the folder it filled",
            "topology": args.tpu_topology,
            "jax": importlib.metadata.version("jax"),
            "libtpu": importlib.metadata.version("libtpu"),
            "cold": cold,
            "warm": warm,
            "command": " ".join(["python experiments/compile_cache_probe.py", *sys.argv[1:]]),
        }
        print(json.dumps(report, indent=2))
        if args.output:
            with open(args.output, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
        return
    load_before = os.getloadavg()
    pairs = []
    for _ in range(args.pairs):
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = run_child(cache_dir)
            warm = run_child(cache_dir)
        pair = {"cold": cold, "warm": warm}
        for name in ("train_step", "eval_step"):
            pair[f"{name}_cold_over_warm"] = (
                cold[name]["compile_seconds"] / warm[name]["compile_seconds"]
            )
        pairs.append(pair)
        print(json.dumps({k: v for k, v in pair.items() if k.endswith("_warm")}), flush=True)
    import jax

    report = {
        "what": "compile time of configs/fashion_mnist.py:demo's steps on the CPU, a fresh "
        "process each, cold (empty cache folder) then warm (the folder the cold one filled)",
        "caveat": "measured on a machine shared with other work (load average below): only the "
        "ratio within a pair is meaningful",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "pairs": pairs,
        "command": " ".join(["python experiments/compile_cache_probe.py", *sys.argv[1:]]),
    }
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
