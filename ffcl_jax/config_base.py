"""Defaults shared by every config in `configs/`: the FFL/ONE CIFAR protocol (docs/method.md).

Loss settings default to `None` (typed placeholders, so `--config.loss.lam_feat=0` parses):
`None` means "the value of the method named by `config.method`" (see `ffcl_jax.methods`); the
run's header line and `results.json` show the values it resolved to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from ffcl_jax import datasets, methods, models, process_env, xla_cpu
from ffcl_jax.errors import UserError
from ffcl_jax.models.layers import REMAT_POLICIES

# float64 is for exact comparisons (a float64 reference, such as the PyTorch one in the parity
# tests), not for speed: it needs 64-bit JAX (`jax_enable_x64`), which the CLI turns on for it.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
BATCH_NORM_MODES = ("global", "per_device", "groups:N")


def batch_norm_groups(mode: str, num_devices: int) -> list[list[int]] | None:
    """The device groups whose rows share BatchNorm statistics under `batch_norm="groups:N"`:
    N consecutive devices of the mesh each; None for the other modes. Raises `UserError` for
    a mode that is none of `BATCH_NORM_MODES`, or an N that does not divide the devices."""
    if mode in ("global", "per_device"):
        return None
    size = mode.removeprefix("groups:")
    if not mode.startswith("groups:") or not size.isdigit() or int(size) < 1:
        raise UserError(
            f"unknown config.batch_norm {mode!r}; valid: global, per_device, or groups:N "
            "(statistics over groups of N devices, for example groups:4)"
        )
    size = int(size)
    if num_devices % size:
        raise UserError(
            f"config.batch_norm={mode!r}: groups of {size} devices do not divide the "
            f"{num_devices} devices; use a divisor of {num_devices}"
        )
    return [list(range(start, start + size)) for start in range(0, num_devices, size)]


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "cifar100"
    c.data_source = "tfds"  # "tfds", or "idx" for the Fashion-MNIST IDX files
    c.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default
    c.download = True  # let TFDS download a data set that is not prepared yet
    c.idx_dir = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
    c.train_examples = config_dict.placeholder(int)  # use only the first N (smoke runs)
    c.test_examples = config_dict.placeholder(int)
    # Hold out this many training images (class-balanced, the same ones for every run: chosen
    # with `validation_seed`, not `seed`) as a validation split: the run trains on the rest and
    # evaluates on them after every epoch. 0: no validation split (every epoch is evaluated on
    # the test split).
    c.validation_size = 0
    c.validation_seed = 0
    # With a validation split, also evaluate the test split once, after training. Off by
    # default, so that a run choosing settings on validation never sees the test split; the
    # final runs of a study set it.
    c.final_test = False
    # PyTorch reference only: start from the JAX trainer's initial weights for `seed` and train
    # on its batches (the same order and augmentation draws), so that a JAX run and a reference
    # run of one seed are paired. The JAX trainer ignores it.
    c.reference_from_jax = False
    c.augment = "pad_crop_flip"  # "pad_crop_flip", "pad_crop" or "none"
    # Hold the training split on the devices and batch/augment it with jit (accelerators; needs
    # no tensorflow); False: tf.data on the host. The two give different, equally valid batches.
    c.data_on_device = False
    c.pad = 4
    c.pad_mode = "reflect"  # "reflect" or "constant"
    # Class-balanced training batches: m > 0 makes every global batch batch_size / m classes
    # with m images each (ffcl_jax/class_balance.py); 0: shuffled batches; None: the method's
    # choice (shuffled for every method but MCL, see Method.images_per_class).
    c.images_per_class = config_dict.placeholder(int)

    # Networks and method.
    c.teacher = "resnet110"
    c.student = "resnet32"
    c.method = "ffcl"  # a name of ffcl_jax.methods.REGISTRY (independent, kd, dml, ffl, ...)
    # kd only: a finished run's workdir (its latest checkpoint) or an exported .npz holding the
    # teacher, which is then frozen.
    c.teacher_checkpoint = config_dict.placeholder(str)
    c.fusion_channels = config_dict.placeholder(int)  # C_fused; None: the student's channels
    # "float32", "bfloat16" (losses stay float32) or "float64" (for exact comparisons with a
    # float64 reference; the CLI turns on 64-bit JAX for it).
    c.compute_dtype = "float32"
    # Run the identical residual blocks of each stage (all but its first) as one loop over their
    # stacked weights, so that the compiler builds one block per stage instead of every block:
    # the :tpu step compiles in a fraction of the time with far less generated code
    # (docs/performance.md). Same results to rounding, same checkpoints (the weights stay one
    # set per block). On by the :gpu and :tpu variants; off by default, where XLA:CPU compiles
    # the unrolled step faster.
    c.scan_blocks = False
    # What each residual block's backward pass keeps from its forward pass (models/layers.py,
    # REMAT_POLICIES): "none" (what autodiff saves), "conv_outputs" (only the convolutions'
    # outputs; BatchNorm's apply, the ReLUs and the adds recomputed), "dots" (every
    # convolution's and matrix product's output), each for every block, unrolled or a
    # scan_blocks loop's body; or "auto": "dots" in a loop's body, which needs a policy ("none"
    # stacks every residual over the loop: 3.4x the v5e:2x2 step's temporaries), "none" for
    # unrolled blocks, where "conv_outputs" made the TPU step move more bytes, not fewer
    # (docs/performance.md). The same gradients to rounding; the CPU step's default (unrolled)
    # is unchanged.
    c.remat = "auto"
    # BatchNorm's training backward on XLA's kernels: "closed_form" (two per-channel sums; faster
    # for deep networks on XLA:CPU, fewer HBM bytes on a TPU), "autodiff" (JAX differentiates the
    # forward), or "auto" (closed_form on the CPU or a TPU when a network has >= 5 blocks a
    # stage). See xla_cpu.closed_form_batch_norm. Float32 layers on the oneDNN kernels use their
    # own backward.
    c.batch_norm_backward = "auto"

    # CPU only: the kernels and XLA:CPU settings a CPU run takes; none of them changes what is
    # computed beyond rounding, and a resumed run may change any of them.
    c.cpu = ml_collections.ConfigDict()
    # Convolutions and training-mode BatchNorm: "onednn" (ffcl_jax.cpu_kernels: oneDNN's
    # convolutions and a double-sum BatchNorm with its ReLU fused, through jax.ffi, float32
    # layers, one device; 2.5x faster than XLA:CPU's on the demo pair's convolutions), "xla"
    # (XLA's own), or "auto" (onednn for float32 on one CPU device where the kernels are built,
    # on the kinds of CPU where they were measured faster; else xla). See
    # xla_cpu.use_onednn_kernels and docs/performance.md.
    c.cpu.kernels = "auto"
    # What XLA:CPU's YNNPACK fusions take: "eltwise_reduce" (elementwise ops, which keeps a deep
    # ResNet's backward pass linear in depth, and reductions), "reduce" (BatchNorm's reductions
    # only), "eltwise", "dot", "xla_default", or "auto" (eltwise_reduce when a network has >= 5
    # blocks a stage, else reduce). See xla_cpu.compiler_options.
    c.cpu.ynn_fusion = "auto"
    # XLA:CPU inlines called computations after its fusion pass, which lets its simplifier drop
    # some copies (demo pair's step 1.11x faster, cifar100 pair's 1.03x). XLA reads this only
    # from XLA_FLAGS when JAX starts its backend: the command line and the benchmarks set it
    # first; a process whose backend already runs, or whose XLA_FLAGS already set
    # xla_backend_extra_options, keeps what it has. See xla_cpu.process_xla_flags.
    c.cpu.flatten_after_fusion = True
    # How glibc's malloc serves the process (ffcl_jax.process_env): "retain" keeps each step's
    # freed temporaries for the next step instead of faulting them in again, "hugepages" puts
    # them on transparent huge pages, "system" leaves glibc as it comes. The command line
    # restarts itself once with the choice's tunables where they take effect; code that calls
    # the trainer from Python starts its process as it likes.
    c.cpu.malloc = "retain"

    # A protocol's ramp-up for the methods that have one (a compressed schedule scales it), None:
    # each method's own; methods without a ramp-up (independent, kd, dml, kdcl) keep none, and
    # loss.rampup_epochs overrides it for the method a run trains.
    c.protocol_rampup_epochs = config_dict.placeholder(float)
    # The methods' settings (ffcl_jax/methods/: each method's dataclass says what they mean and
    # holds its defaults), every one settable from the command line; None = the method's value.
    c.loss = ml_collections.ConfigDict()
    for name, kind in methods.setting_types().items():
        c.loss[name] = config_dict.placeholder(kind)

    # Optimisation (FFL/ONE protocol).
    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 500
    c.num_epochs = 300
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4  # teacher and student
    c.fusion_weight_decay = 1e-5
    c.lr_decay_epochs = (150, 225)
    c.lr_decay_factor = 0.1
    # Linear warm-up of the rate over this many epochs (0: none, the FFL protocol); for large
    # global batches with a linearly scaled learning_rate (the :tpu variant).
    c.warmup_epochs = 0.0

    # Devices. The batch is split over the `data` axis of a `jax.make_mesh` mesh; -1 = every
    # device of every process. BatchNorm statistics: "global" (SyncBN: statistics over the whole
    # global batch, what jit over a sharded batch computes), "per_device" (each device's rows
    # normalised with their own statistics, as PyTorch DDP without SyncBatchNorm) or "groups:N"
    # (statistics over the rows of each group of N consecutive devices; docs/method.md).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.batch_norm = "global"

    # Checkpoints (orbax, in WORKDIR/checkpoints). A run started in a workdir that holds a
    # checkpoint resumes from the latest one; `--fresh` starts over (the old run is moved to
    # WORKDIR/previous_runs/, never deleted).
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2  # the last k, plus the best below
    c.best_metric = "student"  # keep the checkpoint with the best test top-1 of this model
    # ("student", "teacher", "fused", "ensemble"; "" keeps only the last k)

    # Bookkeeping. TensorBoard events go to WORKDIR/tensorboard unless this names another place
    # (a local folder or gs://, e.g. one bucket for the events of many runs).
    c.tensorboard_dir = config_dict.placeholder(str)
    # JAX's persistent compilation cache (ffcl_jax.compilation_cache), which the command lines
    # turn on so that a resumed or restarted run loads its compiled steps instead of compiling
    # them again: None keeps them in WORKDIR/compilation_cache (or JAX_COMPILATION_CACHE_DIR when
    # set), a folder or gs:// URI there, "none" nowhere.
    c.compilation_cache_dir = config_dict.placeholder(str)
    c.seed = 0
    c.log_every_steps = 100
    c.eval_every_epochs = 1
    return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """The argument after the colon in `--config=FILE:ARG`: smoke, gpu or tpu."""
    variants = {"smoke": apply_smoke, "gpu": apply_gpu, "tpu": apply_tpu}
    if arg in variants:
        return variants[arg](c)
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: {', '.join(variants)}")
    return c


def apply_gpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """One GPU node (1 to 8 GPUs): the protocol unchanged (global batch 128, its learning rate),
    bfloat16 compute with float32 losses, the training split held on the GPUs and batched
    there (small CIFAR networks would otherwise wait for the host's input pipeline), and each
    stage's identical blocks compiled once (`scan_blocks`)."""
    c.compute_dtype = "bfloat16"
    c.data_on_device = True
    c.scan_blocks = True
    c.eval_batch_size = 1000
    return c


def apply_tpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A TPU pod slice: global batch 1024 over every chip of every host (128 per chip on a
    v4-16 or v5e-8; batches of 128 would leave a few images per chip), the learning rate
    scaled linearly with the batch (x8) after 5 epochs of linear warm-up (Goyal et al., 2017),
    bfloat16 compute with float32 losses, and the training split on the chips. A larger batch
    changes the protocol: compare its accuracy with runs of the same batch."""
    c = apply_gpu(c)
    scale = 1024 / c.batch_size
    c.batch_size = 1024
    c.learning_rate = c.learning_rate * scale
    c.warmup_epochs = 5.0
    c.eval_batch_size = 2048
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long CPU run: the smallest pair, a few hundred examples, two short epochs."""
    c.teacher = "resnet14"
    c.student = "resnet8"
    c.train_examples = 512
    c.test_examples = 500
    c.batch_size = 64
    c.eval_batch_size = 250
    c.num_epochs = 2
    c.lr_decay_epochs = (1,)
    c.protocol_rampup_epochs = 1.0
    c.log_every_steps = 4
    return c


def eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """`config.eval_batch_size` rounded up to a multiple of the devices, so that every config
    runs on any device count: evaluation batches are padded and the padding is masked."""
    return -(-config.eval_batch_size // num_devices) * num_devices


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> methods.Method:
    """Validates what can be checked before any data is read; returns the method, its settings
    resolved from `config.loss`."""
    datasets.dataset_info(config.dataset)
    models.check_model_name(config.teacher)
    models.check_model_name(config.student)
    method = methods.create(config.method, dict(config.loss), config.protocol_rampup_epochs)
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise UserError(
            f"unknown compute_dtype {config.compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}"
        )
    if config.compute_dtype == "float64" and not jax.config.jax_enable_x64:
        raise UserError(
            "compute_dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (the CLI, "
            "python -m ffcl_jax.main, does it for such a config)"
        )
    if config.batch_size <= 0 or config.batch_size % num_devices:
        raise UserError(
            f"config.batch_size={config.batch_size} must be a positive multiple of the "
            f"{num_devices} devices it is split over"
        )
    if config.get("remat", "auto") not in REMAT_POLICIES:
        raise UserError(
            f"unknown remat policy {config.remat!r}; valid: {', '.join(REMAT_POLICIES)}"
        )
    if config.batch_norm_backward not in xla_cpu.BATCH_NORM_BACKWARDS:
        raise UserError(
            f"unknown config.batch_norm_backward {config.batch_norm_backward!r}; valid: "
            f"{', '.join(xla_cpu.BATCH_NORM_BACKWARDS)}"
        )
    if config.eval_batch_size <= 0:  # rounded up to the devices (padded rows are masked)
        raise UserError(f"config.eval_batch_size must be > 0, got {config.eval_batch_size}")
    if config.validation_size < 0:
        raise UserError(
            f"config.validation_size must be >= 0 (0: no validation split), got "
            f"{config.validation_size}"
        )
    if config.num_epochs <= 0:
        raise UserError(f"config.num_epochs must be > 0, got {config.num_epochs}")
    if config.learning_rate <= 0:
        raise UserError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    decay_epochs = list(config.lr_decay_epochs)
    if any(b <= a for a, b in zip(decay_epochs, decay_epochs[1:], strict=False)):
        raise UserError(
            f"config.lr_decay_epochs must be strictly increasing, got {config.lr_decay_epochs}"
        )
    for key in ("log_every_steps", "eval_every_epochs", "checkpoint_every_epochs"):
        if config[key] <= 0:
            raise UserError(f"config.{key} must be > 0, got {config[key]}")
    if config.keep_checkpoints < 1:
        raise UserError(f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    valid_best = method.evaluated_names()
    if config.best_metric and config.best_metric not in valid_best:
        raise UserError(
            f"config.best_metric={config.best_metric!r} is not a model this run evaluates; "
            f"valid: {', '.join(valid_best)}, or '' to keep only the last checkpoints"
        )
    for key, valid in (
        ("ynn_fusion", ("auto", "xla_default", *xla_cpu.CPU_YNN_FUSION)),
        ("kernels", xla_cpu.CPU_KERNELS),
        ("malloc", process_env.MALLOC_CHOICES),
    ):
        if config.cpu[key] not in valid:
            raise UserError(
                f"unknown config.cpu.{key} {config.cpu[key]!r}; valid: {', '.join(valid)}"
            )
    batch_norm_groups(config.batch_norm, num_devices)
    images_per_class = config.get("images_per_class")
    if images_per_class is not None and images_per_class < 0:
        raise UserError(
            f"config.images_per_class must be >= 0 (0: shuffled batches), got {images_per_class}"
        )
    if images_per_class and config.batch_size % images_per_class:
        raise UserError(
            f"config.batch_size={config.batch_size} is not a multiple of "
            f"config.images_per_class={images_per_class}: class-balanced batches hold whole "
            "classes"
        )
    method.check_config(config)
    return method
