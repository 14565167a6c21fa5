"""Probe: the trainer's train step compiled for H100 GPUs on a machine without one.

    pip install --no-deps --target .cuda_site jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
    PYTHONPATH=.:.cuda_site JAX_PLATFORMS=cpu python experiments/gpu_compile_probe.py gpu 8

The CUDA plugin of the pinned jax compiles for a GPU described by an XLA `GpuTargetConfig`
(below: an H100 SXM, from its published figures) through `jax.experimental.topologies`, as
libtpu does for TPU slices. It builds the step as `ffcl_jax.compile_for` does and prints what
XLA says of it: compile time, per-GPU memory, collectives, the cuDNN calls. No FLOPs: the GPU
executable's cost analysis is None (docs/performance.md, "Compiled for TPU slices").
"""

from __future__ import annotations

import collections
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from configs.cifar100 import get_config
from ffcl_jax import compile_for, train
from ffcl_jax.parallel import DataParallel

# NVIDIA H100 SXM 80 GB: 132 SMs, compute capability 9.0, 50 MB L2, 3.35 TB/s HBM3, 1.98 GHz.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main(arg: str, num_gpus: int) -> None:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{num_gpus}", target_config=H100_SXM
    ).devices
    config = get_config(arg)
    data_parallel = DataParallel(-1, devices=devices)
    settings = train.check_config(config, data_parallel.size)
    setup, state = train.build(config, settings, 390, data_parallel)
    train_step, _ = train.jit_steps(setup, config)
    state = compile_for.abstract_like(state, data_parallel.replicated)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.batch_size, 32, 32, 3), jnp.uint8, sharding=data_parallel.data
        ),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=data_parallel.data),
    }
    started = time.perf_counter()
    with jax.set_mesh(data_parallel.mesh):
        compiled = train_step.trace(state, batch).lower(lowering_platforms=("cuda",)).compile()
    seconds = time.perf_counter() - started
    print(f"{devices[0].device_kind} x{num_gpus}, {arg}: compiled in {seconds:.0f} s")
    print(compiled.memory_analysis())
    print("cost analysis:", compiled.cost_analysis())
    text = compiled.as_text()
    print("collectives:", compile_for.collectives(text))
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    print("custom calls:", dict(calls))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    main(sys.argv[1], int(sys.argv[2]))
