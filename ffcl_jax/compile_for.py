"""Compile the trainer's steps for a TPU slice that is not here, and report what they cost.

    python -m ffcl_jax.compile_for --config=configs/cifar100.py:tpu --topology=v5e:4x4 \
        --output=compile_for_cifar100_tpu_v5e_4x4.json

With libtpu installed (`pip install -e .[tpu]`), JAX gets a compile-only client for any TPU slice
topology (`jax.experimental.topologies`), on any machine: the real TPU compiler, no chip. This
module builds the train and eval steps exactly as `train.train_and_evaluate` does (the config's
checks, `parallel.DataParallel` over the slice's devices, `train.build`, `train.jit_steps`; the
state replicated and the global batch sharded over every chip of every host), compiles them for
the slice and reports, per chip: compile time; memory (arguments, outputs, temporaries,
generated code) against the chip's HBM; FLOPs and bytes accessed per step (XLA's cost
analysis); every collective in the optimised HLO with its count and bytes; the per-chip batch
the compiled program takes; and a roofline lower bound of the step time from the chip's
published bf16 peak and HBM bandwidth (`CHIPS`), with the epoch time it implies.

Every time here is a compiler-based lower bound, never a measurement: no TPU runs anything.
Like MaxText's `train_compile.py`, it answers "does it fit, and what will the step cost" before
the slice is rented.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ffcl_jax import compilation_cache, datasets, input_pipeline, storage, train
from ffcl_jax.config_base import check_config, eval_batch_size
from ffcl_jax.errors import UserError, parse_flags_or_exit
from ffcl_jax.parallel import DataParallel, small_batch_warning

BOUND_LABEL = (
    "compiler-based lower bounds (XLA's cost and memory analysis of the program compiled for "
    "the target; no TPU ran it): not measurements"
)


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's published figures (Google Cloud TPU documentation, read 2026-12-03)."""

    name: str
    bf16_flops_per_second: float  # peak compute per chip (bf16)
    hbm_bytes: float  # HBM capacity per chip
    hbm_bytes_per_second: float  # HBM bandwidth per chip
    source: str


GiB = 2**30
# Keyed by the device kind libtpu gives the slice's devices. A v4 or v5p chip holds two
# TensorCores that JAX drives as one device (megacore), so every figure is per chip.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * GiB, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 918e12, 32e9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# libtpu's default for v4 is one device per TensorCore; on a real v4 slice JAX sees one device per
# chip (megacore), so that is what the step is compiled for. v5p's default is already megacore.
MEGACORE_GENERATIONS = ("v4", "v5p")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:8x8, v4:2x2x2, v5p:2x2x1"

# Split sizes, to count the steps of an epoch without reading the data set.
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}
TEST_EXAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "fashion_mnist": 10_000}

# Collective ops of XLA's HLO (an async pair counts once, at its "-start").
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?:-start)?\(",
    re.MULTILINE,
)
_ARRAY_SHAPE = re.compile(r"\b(pred|[subfc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU slice (`jax.experimental.topologies`), one a chip."""
    from jax.experimental import topologies

    generation = topology.split(":")[0]
    options = {"chip_config_name": "megacore"} if generation in MEGACORE_GENERATIONS else {}
    try:
        slice_ = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
        return slice_.devices
    except RuntimeError as exc:  # jax's JaxRuntimeError included
        message = str(exc).strip().splitlines()[0]
        if "not installed" in message:
            raise UserError(
                "compiling for a TPU slice needs libtpu: pip install -e '.[tpu]' (the libtpu "
                "that matches this jax)"
            ) from exc
        if "lockfile" in message:
            raise UserError(
                "another process holds libtpu; set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (nothing runs on "
                "a TPU here) or wait for it"
            ) from exc
        raise UserError(
            f"unknown TPU topology {topology!r} ({message}); use GENERATION:SHAPE, for example "
            f"{TOPOLOGY_EXAMPLES}"
        ) from exc


def chip_of(devices) -> Chip:
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise UserError(
            f"no published figures for {kind!r} in compile_for.CHIPS; known: {', '.join(CHIPS)}"
        )
    return CHIPS[kind]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Every collective of an HLO module's text: `{op: {"count", "bytes"}}`, bytes of the result
    (per chip; an async start's shape holds its operand and result buffers, both counted)."""
    found: dict[str, dict[str, int]] = {}
    for match in _COLLECTIVE_LINE.finditer(hlo_text):
        entry = found.setdefault(match["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += shape_bytes(match["shape"])
    return found


def while_loops(hlo_text: str) -> int:
    """The loops in an HLO module. XLA's cost analysis counts a loop's body once, whatever its
    trip count, and a collective in a body appears once in its text: where there are loops
    (config.scan_blocks), the FLOPs, bytes, collectives and step bound of the report are lower
    than the step's."""
    return len(re.findall(r"\swhile\(", hlo_text))


def shape_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (`f32[16,3]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY_SHAPE.findall(shape):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, Any]:
    """The step can be no faster than its FLOPs at the bf16 peak, nor than its HBM traffic at
    the HBM bandwidth: the larger of the two is a lower bound of the step time."""
    compute = flops / chip.bf16_flops_per_second
    memory = bytes_accessed / chip.hbm_bytes_per_second
    return {
        "compute_bound_seconds": compute,
        "memory_bound_seconds": memory,
        "step_bound_seconds": max(compute, memory),
        "limited_by": "compute" if compute >= memory else "HBM bandwidth",
    }


def memory_report(stats, chip: Chip) -> dict[str, Any]:
    """Per-chip bytes of one compiled step; donated arguments alias their outputs."""
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
    }
    memory["total"] = (
        memory["arguments"]
        + memory["outputs"]
        - memory["aliased"]
        + memory["temporaries"]
        + memory["generated_code"]
    )
    memory["fraction_of_hbm"] = memory["total"] / chip.hbm_bytes
    return memory


def state_bytes(state) -> dict[str, int]:
    """Bytes of the train state each chip holds (it is replicated), by part: what every step
    reads and writes whatever its batch, the fixed part beside the per-image bytes."""

    def size(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    parts = {
        "weights": size(state.params),
        "optimizer_state": size(state.opt_state),
        "batch_norm_statistics": size(state.batch_stats),
        "method_state": size(state.method_state),
    }
    return {**parts, "total": sum(parts.values())}


def abstract_like(tree, sharding: NamedSharding):
    """Shapes and dtypes of `tree`'s arrays, placed by `sharding`: what `jit(...).trace` takes for
    devices that cannot hold data (compile-only ones)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_step(
    jitted, args, data_parallel: DataParallel, chip: Chip, batch_position: int = -1
) -> dict[str, Any]:
    """Traces, lowers and compiles one jitted step for the mesh's platform; its report.
    `args[batch_position]` is the batch; every other argument is state."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with jax.set_mesh(data_parallel.mesh), compilation_cache.Counter() as cache:
        lowered = jitted.trace(*args).lower(lowering_platforms=(data_parallel.platform,))
        compiled = lowered.compile()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    (arg_shardings, _) = compiled.input_shardings
    batch_position %= len(args)
    batch_sharding = arg_shardings[batch_position]
    per_chip_batch = {
        name: list(batch_sharding[name].shard_shape(spec.shape))
        for name, spec in args[batch_position].items()
    }
    images = per_chip_batch["image"][0]
    state_shardings = jax.tree.leaves(
        [s for i, s in enumerate(arg_shardings) if i != batch_position]
    )
    stablehlo = lowered.as_text()
    optimized = compiled.as_text()
    return {
        "compile_seconds": seconds,
        # This process's CPU time over the same span: what the compile cost, whatever else
        # shared the machine (wall seconds grow with the load, CPU seconds much less).
        "compile_cpu_seconds": cpu_seconds,
        "host_load_average": os.getloadavg()[0],  # the last minute's, at the compile's end
        # No hits here: JAX's persistent cache writes programs compiled for a compile-only
        # TPU client but cannot load them (docs/performance.md); counted in case it learns to.
        "compilation_cache": cache.summary(),
        "per_chip_batch": per_chip_batch,
        "state_replicated": all(s.is_fully_replicated for s in state_shardings),
        "memory_bytes": memory_report(compiled.memory_analysis(), chip),
        "flops": flops,
        "bytes_accessed": bytes_accessed,
        "bytes_accessed_per_image": bytes_accessed / images,  # fixed part included
        "collectives": collectives(optimized),
        "roofline": roofline(flops, bytes_accessed, chip),
        "while_loops": while_loops(optimized),
        # What the TPU compiler must never see: float64, host callbacks, CPU-only kernels.
        "float64_ops": len(re.findall(r"\bf64\b", stablehlo)),
        "host_callbacks": stablehlo.count("callback"),
        "cpu_kernel_calls": stablehlo.count("ffcl_onednn_"),
    }


def compile_for(config, devices, topology: str = "") -> dict[str, Any]:
    """Builds the trainer's train and eval steps for `config` over `devices` (a TPU slice's
    compile-only devices), compiles both for their platform and returns the report."""
    if config.compute_dtype == "float64":
        raise UserError("TPUs have no float64: use compute_dtype float32 or bfloat16")
    chip = chip_of(devices)
    data_parallel = DataParallel(config.mesh.data, devices=devices)
    method = check_config(config, data_parallel.size)
    info = datasets.dataset_info(config.dataset)
    train_examples = TRAIN_EXAMPLES[config.dataset] - config.validation_size
    if config.train_examples:
        train_examples = min(train_examples, config.train_examples)
    steps_per_epoch = input_pipeline.steps_per_epoch(train_examples, config.batch_size)
    setup, state = train.build(config, method, steps_per_epoch, data_parallel)
    train_step, eval_step = train.jit_steps(setup, config)

    fixed_bytes = state_bytes(state)
    state = abstract_like(state, data_parallel.replicated)
    shape, batch, data = info.image_shape, config.batch_size, data_parallel.data
    views = (method.num_views,) if method.num_views > 1 else ()
    train_batch = {
        "image": jax.ShapeDtypeStruct((batch, *views, *shape), jnp.uint8, sharding=data),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
    }
    eval_batch = eval_batch_size(config, data_parallel.size)
    eval_batch_spec = {
        "image": jax.ShapeDtypeStruct((eval_batch, *shape), jnp.uint8, sharding=data),
        "label": jax.ShapeDtypeStruct((eval_batch,), jnp.int32, sharding=data),
        "mask": jax.ShapeDtypeStruct((eval_batch,), jnp.float32, sharding=data),
    }
    train_report = compile_step(train_step, (state, train_batch), data_parallel, chip)
    eval_report = compile_step(
        eval_step,
        (state.params, state.batch_stats, eval_batch_spec, state.method_state),
        data_parallel,
        chip,
        batch_position=2,
    )

    test_examples = TEST_EXAMPLES[config.dataset]
    if config.test_examples:
        test_examples = min(test_examples, config.test_examples)
    eval_steps = -(-(config.validation_size or test_examples) // eval_batch)
    train_seconds = steps_per_epoch * train_report["roofline"]["step_bound_seconds"]
    eval_seconds = eval_steps * eval_report["roofline"]["step_bound_seconds"]
    # config.data_on_device keeps the training split (uint8 images, int32 labels) on every chip.
    split_bytes = train_examples * (math.prod(shape) + 4) if config.data_on_device else 0
    return {
        "times_are": BOUND_LABEL,
        "host_backend": jax.default_backend(),  # where this process computes: never the TPU
        "topology": topology,
        "chips": data_parallel.size,
        "hosts": len({d.process_index for d in devices}),
        "chip": dataclasses.asdict(chip),
        "jax": jax.__version__,
        "libtpu": _libtpu_version(),
        "teacher": config.teacher,
        "student": config.student,
        "method": config.method,
        "compute_dtype": config.compute_dtype,
        "batch_norm": config.batch_norm,
        "scan_blocks": config.get("scan_blocks", False),
        "parameter_bytes": fixed_bytes["weights"],
        "fixed_bytes": fixed_bytes,
        "global_batch": config.batch_size,
        # chip_of admits TPU chips only: the lane padding applies to every slice compiled here.
        "warnings": [
            w for w in [small_batch_warning(config.batch_size, data_parallel.size, "tpu")] if w
        ],
        "eval_global_batch": eval_batch,
        "steps_per_epoch": steps_per_epoch,
        "eval_steps_per_epoch": eval_steps,
        "train_step": train_report,
        "eval_step": eval_report,
        "training_split_on_chip_bytes": split_bytes,
        "train_step_and_split_fraction_of_hbm": (
            (train_report["memory_bytes"]["total"] + split_bytes) / chip.hbm_bytes
        ),
        "epoch_bound_seconds": {
            "train": train_seconds,
            "eval": eval_seconds,
            "total": train_seconds + eval_seconds,
        },
    }


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def format_report(report: dict[str, Any]) -> str:
    """The report as lines for a terminal."""
    chip = report["chip"]
    lines = [
        f"{report['teacher']} + {report['student']} ({report['method']}, "
        f"{report['compute_dtype']}, BatchNorm {report['batch_norm']}) compiled for "
        f"{report['topology'] or chip['name']}: {report['chips']} chips on {report['hosts']} "
        f"host(s), global batch {report['global_batch']}",
        f"chip {chip['name']}: {chip['bf16_flops_per_second'] / 1e12:g} TFLOP/s bf16 peak, "
        f"{chip['hbm_bytes_per_second'] / 1e9:g} GB/s HBM, {_gib(chip['hbm_bytes'])} HBM "
        f"({chip['source']})",
        *report.get("warnings", []),
    ]
    fixed = report.get("fixed_bytes")
    if fixed:
        lines.append(
            f"fixed per chip, whatever the batch: state {_mib(fixed['total'])} (weights "
            f"{_mib(fixed['weights'])}, optimizer {_mib(fixed['optimizer_state'])}, BatchNorm "
            f"statistics {_mib(fixed['batch_norm_statistics'])}, method "
            f"{_mib(fixed['method_state'])}), read and written every step"
        )
    for name in ("train_step", "eval_step"):
        step = report[name]
        memory, bound = step["memory_bytes"], step["roofline"]
        ops = ", ".join(
            f"{op} x{c['count']} ({_mib(c['bytes'])})" for op, c in step["collectives"].items()
        )
        cache = step.get("compilation_cache") or {}
        how = "loaded from the compilation cache" if cache.get("hits") else "compiled"
        lines += [
            f"{name}: {how} in {step['compile_seconds']:.1f} s; per-chip batch "
            f"{step['per_chip_batch']['image']}; state replicated: {step['state_replicated']}",
            f"  memory per chip {_mib(memory['total'])} = {memory['fraction_of_hbm']:.1%} of HBM "
            f"(arguments {_mib(memory['arguments'])}, outputs {_mib(memory['outputs'])}, "
            f"aliased {_mib(memory['aliased'])}, temporaries {_mib(memory['temporaries'])}, "
            f"code {_mib(memory['generated_code'])})",
            f"  per chip per step: {step['flops'] / 1e9:.2f} GFLOP, "
            f"{step['bytes_accessed'] / 1e9:.3f} GB accessed "
            f"({step['bytes_accessed_per_image'] / 1e6:.2f} MB an image); "
            f"collectives: {ops or 'none'}",
            f"  step >= {bound['step_bound_seconds'] * 1e3:.3f} ms (compute "
            f"{bound['compute_bound_seconds'] * 1e3:.3f} ms, HBM "
            f"{bound['memory_bound_seconds'] * 1e3:.3f} ms: {bound['limited_by']})",
        ]
        if step.get("while_loops"):
            lines.append(
                f"  {step['while_loops']} loop(s): XLA's cost analysis counts each loop body "
                "once, so the FLOPs, bytes, collectives and step bound above undercount the "
                "step; compile with --config.scan_blocks=false for them"
            )
    epoch = report["epoch_bound_seconds"]
    lines += [
        f"epoch >= {epoch['total']:.3f} s ({report['steps_per_epoch']} train steps "
        f"{epoch['train']:.3f} s + {report['eval_steps_per_epoch']} eval steps "
        f"{epoch['eval']:.3f} s); training split on each chip "
        f"{_mib(report['training_split_on_chip_bytes'])}",
        f"times are {report['times_are']}",
    ]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------- command line


def main(argv, config, topology: str, output: str | None) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = compile_for(config, topology_devices(topology), topology)
    except UserError as exc:
        _fail(str(exc))
    report["command"] = " ".join(["python -m ffcl_jax.compile_for", *sys.argv[1:]])
    print(format_report(report), flush=True)
    if output:
        storage.write_text(storage.path(output), json.dumps(report, indent=2) + "\n")
        print(f"report written to {output}")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
    import os

    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, "Training configuration file, as for ffcl_jax.main.", lock_config=True
    )
    topology = flags.DEFINE_string(
        "topology", None, f"TPU slice, GENERATION:SHAPE ({TOPOLOGY_EXAMPLES})."
    )
    output = flags.DEFINE_string("output", None, "Write the report as JSON here (or gs://).")
    # Nothing may run on a TPU (on a TPU VM this process would otherwise take its chips): JAX
    # computes on the CPU, libtpu only compiles. Several such processes may share libtpu, and
    # none needs the metadata server of a Cloud TPU VM.
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

    def main_with_flags(argv):
        if config.value is None or not topology.value:
            _fail(f"--config and --topology are required (a topology: {TOPOLOGY_EXAMPLES})")
        main(argv, config.value, topology.value, output.value)

    app.run(main_with_flags, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    run()
