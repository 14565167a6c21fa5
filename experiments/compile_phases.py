"""Where the train step's compile time goes for a TPU slice, with and without `scan_blocks`.

    PYTHONPATH=. python experiments/compile_phases.py --config=configs/cifar100.py:tpu \
        --topology=v5e:2x2 --rounds=2 --output=experiments/results/compile_phases_X.json

Builds the train step as `ffcl_jax.compile_for` does and times its three phases separately:
JAX's tracing, lowering to StableHLO, and libtpu's compile, each in wall seconds and the
process's CPU seconds (the TPU compiler runs some passes on several threads, so on a shared
machine wall time depends on the load and CPU time on the work). The settings alternate, each
compile in a fresh process (`--rounds` turns of off, on), so that a drift of the machine's load
hits both alike. Needs libtpu (pip install -e .[tpu]); nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time


def measure(config_arg: str, topology: str, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    from ffcl_jax import compile_for, datasets, train
    from ffcl_jax.config_base import check_config
    from ffcl_jax.parallel import DataParallel

    path, _, arg = config_arg.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    config = module.get_config(arg or None)
    config.scan_blocks = scan
    devices = compile_for.topology_devices(topology)
    data_parallel = DataParallel(config.mesh.data, devices=devices)
    method = check_config(config, data_parallel.size)
    setup, state = train.build(config, method, 48, data_parallel)
    step, _ = train.jit_steps(setup, config)
    state = compile_for.abstract_like(state, data_parallel.replicated)
    shape, data = datasets.dataset_info(config.dataset).image_shape, data_parallel.data
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, *shape), jnp.uint8, sharding=data),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=data),
    }
    times = {}
    with jax.set_mesh(data_parallel.mesh):
        clocks = [(time.perf_counter(), time.process_time())]
        traced = step.trace(state, batch)
        clocks.append((time.perf_counter(), time.process_time()))
        lowered = traced.lower(lowering_platforms=(data_parallel.platform,))
        clocks.append((time.perf_counter(), time.process_time()))
        compiled = lowered.compile()
        clocks.append((time.perf_counter(), time.process_time()))
    for name, start, end in zip(("trace", "lower", "compile"), clocks, clocks[1:], strict=False):
        times[name] = {"wall_seconds": end[0] - start[0], "cpu_seconds": end[1] - start[1]}
    memory = compiled.memory_analysis()
    return {
        "scan_blocks": scan,
        **times,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "temporary_bytes": memory.temp_size_in_bytes,
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cifar100.py:tpu")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output")
    parser.add_argument("--worker", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.config, args.topology, args.worker == "on")
        print("RESULT " + json.dumps(result), flush=True)
        return
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1")
    runs = []
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            done = subprocess.run(
                [sys.executable, __file__, f"--config={args.config}",
                 f"--topology={args.topology}", f"--worker={setting}"],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(done.stderr[-3000:])
            runs.append(json.loads(lines[-1][len("RESULT ") :]))
            run = runs[-1]
            print(
                f"scan_blocks={run['scan_blocks']}: "
                + ", ".join(
                    f"{k} {run[k]['wall_seconds']:.1f} s ({run[k]['cpu_seconds']:.1f} s CPU)"
                    for k in ("trace", "lower", "compile")
                )
                + f", code {run['generated_code_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
    report = {
        "config": args.config,
        "topology": args.topology,
        "runs": runs,
        "machine": f"{os.cpu_count()} CPUs, shared (see load_average_after)",
        "command": " ".join(["python experiments/compile_phases.py", *sys.argv[1:]]),
    }
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
