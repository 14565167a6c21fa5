"""XLA:CPU tuning: per-jit compiler options, the process's XLA_FLAGS, BatchNorm's backward.

Everything here is about speed on the CPU backend (on GPU and TPU, `compiler_options` is None and
the closed-form BatchNorm backward is off unless asked for); the measurements behind each choice
are in docs/performance_log.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from ffcl_jax import machine, models
from ffcl_jax.errors import UserError
from ffcl_jax.models.layers import LayerKernels, with_xla_ops

# XLA:CPU's loop fusion pass copies the forward residual + ReLU chain of a ResNet stage into
# every backward consumer that needs a ReLU mask, so each block's backward recomputes every
# earlier block of its stage: O(depth^2) work (ResNet-110's fwd+bwd 2x slower than linear).
# Handing elementwise ops to YNNPACK fusions instead (library fusions, which the loop fusion pass
# leaves alone) keeps the step linear in depth: the cifar100 pair's step 3x faster. XLA's default
# list (individual dots and convolutions, reductions) also sends the 14x14x32 and 7x7x64
# convolutions to YNNPACK, whose kernels are 2x slower there than XLA's own (Eigen); keeping only
# the reductions (BatchNorm's statistics) in YNNPACK makes the demo pair's step 1.15x faster and,
# with the elementwise ops, the cifar100 pair's 1.05x (bench_step.py --modes=compare).
# Measurements: docs/performance_log.md. Only XLA:CPU reads these options; each replaces
# XLA's default list of YNNPACK fusion types.
CPU_YNN_FUSION = {
    "eltwise_reduce": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    "reduce": "LIBRARY_FUSION_TYPE_REDUCE",
    "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
    "dot": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
DEEP_BLOCKS_PER_STAGE = 5  # ResNet-20 (3 a stage) gains nothing, ResNet-56 (9) gains 1.3x


@functools.cache
def _cpu_option_accepted(value: str) -> bool:
    """Whether this jaxlib knows the option (it is experimental and may be renamed)."""
    options = {"xla_cpu_experimental_ynn_fusion_type": value}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # an unknown option or value: compile with XLA's defaults instead
        return False
    return True


def compiler_options(config, platform: str | None = None) -> dict[str, str] | None:
    """XLA options for the step functions: `config.cpu.ynn_fusion` on the CPU backend.

    `platform`: what the steps are compiled for ("cpu", "gpu", "tpu"); None: JAX's default
    backend (a step compiled here for a TPU slice must not carry XLA:CPU's options)."""
    platform = platform or jax.default_backend()
    choice = config.cpu.ynn_fusion
    if choice == "auto":
        deep = deepest_blocks_per_stage(config) >= DEEP_BLOCKS_PER_STAGE
        choice = "eltwise_reduce" if deep else "reduce"
    if choice == "xla_default" or platform != "cpu":
        return None
    value = CPU_YNN_FUSION[choice]
    if not _cpu_option_accepted(value):
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": value}


# An XLA:CPU option that cannot go per jit like the ones above: XLA reads
# `xla_backend_extra_options` only from XLA_FLAGS, once, when JAX starts its first backend. After
# the fusion pass it inlines called computations (FlattenCallGraph + CallInliner), after which
# XLA's simplifier removes some copies: 215 -> 188 in the demo pair's step, which runs 1.11x
# faster (1.03x for the cifar100 pair). Options named xla_* are not passed on to LLVM, so other
# backends ignore it.
FLATTEN_AFTER_FUSION_FLAG = "--xla_backend_extra_options=xla_cpu_flatten_after_fusion"


def process_xla_flags(config, current: str = "") -> str:
    """The XLA_FLAGS a process running `config` should start JAX with: `current` plus
    `FLATTEN_AFTER_FUSION_FLAG` if `config.cpu.flatten_after_fusion` (unless `current`
    already sets `xla_backend_extra_options`: the user's choice stays).

    Only the owner of a process may apply it, before anything starts a JAX backend (XLA reads
    XLA_FLAGS once): the CLI and the benchmark scripts do; library code never edits XLA_FLAGS.
    """
    if not config.cpu.flatten_after_fusion or "xla_backend_extra_options" in current:
        return current
    return f"{current} {FLATTEN_AFTER_FUSION_FLAG}".strip()


BATCH_NORM_BACKWARDS = ("auto", "closed_form", "autodiff")


def closed_form_batch_norm(config, platform: str | None = None) -> bool:
    """`config.batch_norm_backward`: "auto" takes the closed form (batch_norm.batch_norm_train)
    where it was measured to pay off, a deep network on the CPU backend (cifar100 pair's step 1.2x)
    or on a TPU (the cifar100 :tpu step's HBM bytes 4-5% fewer on v5e:2x2, docs/performance.md);
    for shallow pairs it changes nothing measurable and autodiff keeps earlier runs' numerics.
    `platform`: as in `compiler_options`."""
    choice = config.batch_norm_backward
    if choice == "auto":
        deep = deepest_blocks_per_stage(config) >= DEEP_BLOCKS_PER_STAGE
        return (platform or jax.default_backend()) in ("cpu", "tpu") and deep
    return choice == "closed_form"


def deepest_blocks_per_stage(config) -> int:
    return max(models.blocks_per_stage(config.teacher), models.blocks_per_stage(config.student))


CPU_KERNELS = ("auto", "onednn", "xla")

# The (vendor, ISA) kinds of CPU on which the oneDNN kernels were measured faster than XLA's
# (docs/performance.md): "auto" takes them there only. "onednn" takes them anywhere.
KERNELS_MEASURED_ON = (("AMD", "AVX-512"), ("AMD", "AVX2"))


def kernels_measured_here() -> bool:
    """Whether this CPU is of a kind in KERNELS_MEASURED_ON."""
    here = machine.machine()
    return (here["vendor"], here["isa"]) in KERNELS_MEASURED_ON


def _unmeasured_note() -> str:
    here = machine.machine()
    kinds = ", ".join(f"{vendor} {isa}" for vendor, isa in KERNELS_MEASURED_ON)
    return (
        f"cpu.kernels: XLA's kernels (auto takes the oneDNN kernels only on the CPUs where they "
        f"were measured faster: {kinds}; this is {here['vendor']} {here['isa']}: "
        "--config.cpu.kernels=onednn uses them)"
    )


def use_onednn_kernels(config, num_devices: int = 1, platform: str | None = None) -> bool:
    """`config.cpu.kernels`: whether the steps run float32 convolutions and training-mode
    BatchNorm as the kernels of `ffcl_jax.cpu_kernels`.

    "onednn" insists (an error where they cannot run); "xla" never uses them; "auto" takes them
    for float32 on the CPU backend with one device when they are built, on the kinds of CPU where
    they were measured faster (KERNELS_MEASURED_ON). On several devices XLA's
    partitioner gathers a custom call's sharded operands onto every device (correct, not
    data-parallel), and under per-device BatchNorm (`shard_map`) the kernels' gradients do not
    carry the mesh axes: an error. `platform`: as in `compiler_options` (a step compiled here for
    a TPU slice never takes them).
    """
    platform = platform or jax.default_backend()
    choice = config.cpu.kernels
    if choice == "xla":
        return False
    # BatchNorm over device groups runs under shard_map without its axis checks: XLA's ops only.
    grouped = config.batch_norm.startswith("groups:")
    if choice == "auto" and (num_devices > 1 or config.compute_dtype != "float32" or grouped):
        return False
    if platform != "cpu":
        if choice == "onednn":
            raise UserError(
                f"config.cpu.kernels='onednn' runs on the CPU only, this is {platform}: use "
                "'auto' or 'xla'"
            )
        return False
    if (num_devices > 1 and config.batch_norm == "per_device") or grouped:
        raise UserError(
            f"config.cpu.kernels='onednn' does not run under batch_norm={config.batch_norm!r} "
            "(on several devices): use cpu.kernels='xla' or batch_norm='global'"
        )
    from ffcl_jax import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    if reason and choice == "onednn":
        raise UserError(f"config.cpu.kernels='onednn': {reason}; or use 'auto' or 'xla'")
    return reason is None and (choice == "onednn" or kernels_measured_here())


def layer_kernels(config, num_devices: int = 1, platform: str | None = None) -> LayerKernels:
    """What the layers compute with for `config` on `platform` (the seam the trainer hands to
    the models): the closed-form BatchNorm backward and the oneDNN kernels where chosen, and
    the blocks of a stage as one loop with `config.scan_blocks` and the blocks' remat policy
    `config.remat` (any platform)."""
    kernels = LayerKernels(
        closed_form_batch_norm=closed_form_batch_norm(config, platform),
        scan_blocks=bool(config.get("scan_blocks", False)),
        remat=config.get("remat", "auto"),
    )
    if not use_onednn_kernels(config, num_devices, platform):
        return kernels
    from ffcl_jax import cpu_kernels

    return dataclasses.replace(
        kernels,
        conv2d=cpu_kernels.conv2d,
        conv2d_transpose=cpu_kernels.conv2d_transpose,
        batch_norm_train=cpu_kernels.batch_norm_train,
        batch_norm_add_relu=cpu_kernels.batch_norm_add_relu,
    )


def onednn_fallback_note(config, num_devices: int = 1) -> str | None:
    """One line for the CLI when "auto" leaves the oneDNN kernels out on this CPU (not built
    here, or not measured on this kind of CPU), else None."""
    if config.cpu.kernels != "auto":
        return None
    if jax.default_backend() != "cpu" or num_devices > 1:
        return None
    if config.compute_dtype != "float32":
        return None
    from ffcl_jax import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    if reason:
        return f"cpu.kernels: XLA's kernels ({reason})"
    return None if kernels_measured_here() else _unmeasured_note()


def countable(kernels: LayerKernels) -> LayerKernels:
    """`kernels` with XLA's own ops for the oneDNN kernels: XLA's cost analysis counts a custom
    call as no work, so a step's FLOPs are counted on this form of it."""
    return with_xla_ops(kernels)
