"""The JAX-only modes of `bench_step.py`, `compare` and `profile` (its docstring has the
commands), and the fixed-batch step they and its `step` mode time.

`profile`: where a jitted call spends its time, the XLA ops of one profiled call, longest first.
It traces one call with `jax.profiler`, reads the trace back with `jax.profiler.ProfileData` and
sums each op's events (fusions, convolutions, custom calls such as the oneDNN kernels, copies).
The name of an XLA fusion says what it holds (`transpose_copy_fusion`); to read its body, dump
the optimised HLO (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`).
"""

from __future__ import annotations

import collections
import functools
import glob
import os
import statistics
import tempfile
import time

import bench_results  # experiments/, beside this script
import jax


def step_on_random_batch(config, mesh):
    """`(jitted train step, fresh replicated state, one random batch of the config's shape)`: what
    step timings run (the state as if a long epoch had just begun, so the schedule is flat)."""
    import jax
    import numpy as np

    from ffcl_jax import datasets, train

    settings = train.check_config(config, jax.device_count())
    info = datasets.dataset_info(config.dataset)
    setup, state = train.build(config, settings, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    views = (settings.num_views,) if settings.num_views > 1 else ()  # KDCL, PCL
    batch = mesh.global_batch(
        {
            "image": rng.integers(0, 256, (config.batch_size, *views, *info.image_shape), np.uint8),
            "label": rng.integers(0, info.num_classes, (config.batch_size,), np.int32),
        }
    )
    step, _ = train.jit_steps(setup, config)
    return step, jax.device_put(state, mesh.replicated), batch


def train_flops_per_step(config) -> float:
    """One train step's FLOPs as the trainer records them (`report.train_flops`)."""
    from ffcl_jax import report, train

    settings = train.check_config(config, jax.device_count())
    setup, state = train.build(config, settings, steps_per_epoch=1000)
    return report.train_flops(setup, state, config.batch_size)


def gemm_gflops(matmul, make, n: int = 4096, repeats: int = 5) -> float:
    """The best GFLOP/s of `matmul` on two n x n float32 matrices from `make(n)` (after one
    untimed call): the machine's float32 peak as a framework's matrix product reaches it, the
    denominator of a step's fraction of peak."""
    a, b = make(n), make(n)
    matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return round(2 * n**3 / best / 1e9, 1)


# The OpenMP settings a timing depends on, printed with it.
OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _config_value(text: str):
    if text.lower() in ("true", "false"):  # a boolean key (scan_blocks)
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def compare_settings(
    config, key: str, settings: list[str], *, warmup: int, rounds: int, steps_per_round: int
) -> dict:
    """bench_step's `compare` mode: the train step under each of `settings` for the config key
    `key`, timed in turns; returns its record (`_timing_table`)."""
    import jax

    from ffcl_jax import parallel, xla_cpu

    if key.startswith("cpu.") and jax.default_backend() != "cpu":
        raise SystemExit("these are XLA:CPU settings; run this on the CPU backend")
    mesh = parallel.DataParallel()
    if key == KERNEL_THREAD:
        return _compare_kernel_threads(config, settings, mesh, rounds, steps_per_round, warmup)
    if key == RESIDUAL_END:
        return _compare_residual_ends(config, settings, mesh, rounds, steps_per_round, warmup)
    runs = {}
    for setting in settings:
        varied = config.copy_and_resolve_references()
        *parents, leaf = key.split(".")
        target = varied
        for parent in parents:
            target = target[parent]
        target[leaf] = _config_value(setting)
        step, state, batch = step_on_random_batch(varied, mesh)
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        runs[setting] = {"step": step, "state": [state], "batch": batch, "times": []}
        print(f"{setting}: {xla_cpu.compiler_options(varied)}", flush=True)
    _time_in_turns(runs, rounds, steps_per_round)
    return _timing_table(config, key, rounds, steps_per_round, runs)


# compare's key for how glibc's malloc serves the process (ffcl_jax.process_env): glibc reads it
# at start-up only, so each setting runs in a worker process of its own, the settings in turns.
MALLOC = "cpu.malloc"


def compare_mallocs(config, settings: list[str], rounds: int, run_worker) -> dict:
    """bench_step's `compare` mode for `cpu.malloc`: `rounds` turns over `settings`, each a JAX
    step worker (`run_worker("jax", env, "--modes=step")`, `--repeats` timed steps) whose own
    start-up (bench_step's `__main__`) applies that setting's tunables, named in `FFCL_MALLOC`;
    the timing table plus each setting's page faults and system seconds a step."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FFCL_MALLOC")}
    runs = {setting: {"times": [], "faults": [], "system": []} for setting in settings}
    for _ in range(rounds):
        for setting, run in runs.items():
            worker = run_worker("jax", {**base, "FFCL_MALLOC": setting}, "--modes=step")
            step = worker["step"]
            run["times"] += step["times_ms"]
            run["faults"].append(step["page_faults_per_step"])
            run["system"].append(step["system_seconds_per_step"])
            run["tunables"] = worker["glibc_tunables"]  # as the worker itself started
    repeats = len(runs[settings[0]]["times"]) // max(rounds, 1)
    record = _timing_table(config, MALLOC, rounds, repeats, runs)
    lines = ["", f"| {MALLOC} | page faults a step | system s a step | GLIBC_TUNABLES |"]
    lines.append("|---|---|---|---|")
    for setting, run in runs.items():
        faults, system = statistics.median(run["faults"]), statistics.median(run["system"])
        record["settings"][setting].update(
            page_faults_per_step=run["faults"],
            system_seconds_per_step=run["system"],
            glibc_tunables=run["tunables"],
        )
        lines.append(f"| {setting} | {faults:.0f} | {system:.3f} | {run['tunables'] or '-'} |")
    record["table"] += "\n".join(lines)
    return record


def _time_in_turns(runs: dict, rounds: int, steps_per_round: int) -> None:
    """Times `steps_per_round` steps of each run in turn, `rounds` times, into its "times". A
    run holds its step, its batch, its state in a one-element list (runs may share one: the step
    donates it) and optionally `before()`, called before each of its turns."""
    import jax

    for _ in range(rounds):
        for run in runs.values():
            if "before" in run:
                run["before"]()
            state = run["state"]
            for _ in range(steps_per_round):
                start = time.perf_counter()
                state[0], metrics = run["step"](state[0], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append((time.perf_counter() - start) * 1e3)


# compare's key for where the oneDNN kernels run: "kernel_thread" (their own thread) or
# "caller" (the XLA thread that calls each), switched between steps of one compiled step.
KERNEL_THREAD = "cpu_kernels.thread"


def _compare_kernel_threads(config, settings, mesh, rounds, steps_per_round, warmup) -> dict:
    import jax

    from ffcl_jax import cpu_kernels

    if set(settings) - {"kernel_thread", "caller"}:
        raise SystemExit(f"--key={KERNEL_THREAD} takes the settings kernel_thread and caller")
    step, state, batch = step_on_random_batch(config, mesh)
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    shared = [state]  # one compiled step and its state, the switch flipped between turns
    runs = {
        setting: {
            "step": step,
            "state": shared,
            "batch": batch,
            "times": [],
            "before": functools.partial(cpu_kernels.set_kernel_thread, setting == "kernel_thread"),
        }
        for setting in settings
    }
    try:
        _time_in_turns(runs, rounds, steps_per_round)
    finally:
        cpu_kernels.set_kernel_thread(True)
    return _timing_table(config, KERNEL_THREAD, rounds, steps_per_round, runs)


# compare's key for a residual block's end on the oneDNN kernels: "fused" (the BatchNorm kernel
# adds the residual and applies the ReLU, `cpu_kernels.batch_norm_add_relu`) or "separate"
# (the BatchNorm kernel, then XLA's add and ReLU).
RESIDUAL_END = "cpu_kernels.residual_end"


def _compare_residual_ends(config, settings, mesh, rounds, steps_per_round, warmup) -> dict:
    import dataclasses
    from unittest import mock

    from ffcl_jax import xla_cpu

    if set(settings) - {"fused", "separate"}:
        raise SystemExit(f"--key={RESIDUAL_END} takes the settings fused and separate")
    if not xla_cpu.use_onednn_kernels(config):
        raise SystemExit(f"--key={RESIDUAL_END} times the oneDNN kernels, which do not run here")
    chosen = xla_cpu.layer_kernels
    runs = {}
    for setting in settings:
        kernels = chosen(config)
        if setting == "separate":
            kernels = dataclasses.replace(kernels, batch_norm_add_relu=None)
        # The trainer asks xla_cpu which kernels to trace with; this step gets `kernels`.
        with mock.patch.object(xla_cpu, "layer_kernels", lambda *a, k=kernels, **kw: k):
            step, state, batch = step_on_random_batch(config, mesh)
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        runs[setting] = {"step": step, "state": [state], "batch": batch, "times": []}
    _time_in_turns(runs, rounds, steps_per_round)
    return _timing_table(config, RESIDUAL_END, rounds, steps_per_round, runs)


def _timing_table(config, key, rounds, steps_per_round, runs) -> dict:
    """compare's record: the Markdown table it prints ("table") and every timed step of each
    setting in ms ("settings"), for a committed JSON."""
    cpu = bench_results.machine()
    env = " ".join(f"{k}={os.environ[k]}" for k in OPENMP_ENV if k in os.environ)
    lines = [
        f"{config.teacher} + {config.student}, batch {config.batch_size}, {rounds} x "
        f"{steps_per_round} steps each, interleaved; XLA_FLAGS for all: "
        f"{os.environ.get('XLA_FLAGS') or '(none)'}; OpenMP: {env or '(defaults)'}; "
        f"{cpu['cpu']} ({cpu['isa']})",
        f"| {key} | min ms | median ms | max ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    base = statistics.median(next(iter(runs.values()))["times"])
    settings = {}
    for setting, run in runs.items():
        times = run["times"]
        median = statistics.median(times)
        settings[setting] = {
            "min_ms": round(min(times), 1),
            "median_ms": round(median, 1),
            "max_ms": round(max(times), 1),
            "speed_up": round(base / median, 3),
            "times_ms": [round(t, 1) for t in times],
        }
        lines.append(
            f"| {setting} | {min(times):.0f} | {median:.0f} | {max(times):.0f} "
            f"| {base / median:.2f}x |"
        )
    return {
        "mode": "compare",
        "pair": f"{config.teacher}+{config.student}",
        "batch_size": config.batch_size,
        "key": key,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "openmp_env": env,
        "machine": cpu,
        "settings": settings,
        "table": "\n".join(lines),
    }


def profile_step(config, top: int) -> dict:
    """bench_step's `profile` mode: the `top` ops one train step spends its time in
    (top_ops), by kind and one by one: the Markdown it prints ("table") and the rows."""
    import jax

    from ffcl_jax import parallel

    mesh = parallel.DataParallel()
    step, state, batch = step_on_random_batch(config, mesh)
    latest = [state]  # the step donates its state: each call takes the one before's output

    def one_step():
        latest[0], metrics = step(latest[0], batch)
        return metrics

    rows, wall_ms = top_ops(one_step)
    jax.block_until_ready(latest)
    cpu = bench_results.machine()
    kinds = by_kind(rows)[:top]
    return {
        "mode": "profile",
        "pair": f"{config.teacher}+{config.student}",
        "batch_size": config.batch_size,
        "cpu_kernels": config.cpu.kernels,
        "machine": cpu,
        "wall_ms": round(wall_ms, 1),
        "by_kind": [{"op": n, "ms": round(ms, 2), "calls": c} for n, ms, c in kinds],
        "longest": [{"op": n, "ms": round(ms, 2), "calls": c} for n, ms, c in rows[:top]],
        "table": "\n\n".join(
            [
                f"{config.teacher} + {config.student}, batch {config.batch_size}, cpu.kernels="
                f"{config.cpu.kernels}; {cpu['cpu']} ({cpu['isa']})",
                "By kind:\n" + table(kinds, wall_ms),
                "Longest ops:\n" + table(rows[:top], wall_ms),
            ]
        ),
    }


# Events that enclose others (the executor, Python frames): counting them would count twice.
ENCLOSING = ("ThunkExecutor", "block_until_ready", "profiler.py", "contextlib.py", "$")


def top_ops(fn, *args, n: int | None = None) -> tuple[list[tuple[str, float, int]], float]:
    """`([(op, ms, calls), ...] longest first (the first `n`), wall ms of the profiled call)`;
    `fn` is called once untraced first, so compilation is not in the profile."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory(prefix="op_profile-") as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall_ms = (time.perf_counter() - start) * 1e3
        path = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        total, count = collections.Counter(), collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if any(part in event.name for part in ENCLOSING):
                        continue
                    total[event.name] += event.duration_ns
                    count[event.name] += 1
    rows = [(name, ns / 1e6, count[name]) for name, ns in total.most_common(n)]
    return rows, wall_ms


def kind(op: str) -> str:
    """An op's name without XLA's instance number: `ffi_call.376` -> `ffi_call`."""
    head, _, tail = op.rpartition(".")
    return head if head and tail.isdigit() else op


def by_kind(rows) -> list[tuple[str, float, int]]:
    total, count = collections.Counter(), collections.Counter()
    for name, ms, calls in rows:
        total[kind(name)] += ms
        count[kind(name)] += calls
    return [(name, ms, count[name]) for name, ms in total.most_common()]


def table(rows, wall_ms: float) -> str:
    lines = [
        f"one call: {wall_ms:.0f} ms wall (ops on two threads can sum to more)",
        "| ms | calls | op |",
        "|---|---|---|",
    ]
    lines += [f"| {ms:.1f} | {calls} | `{name[:90]}` |" for name, ms, calls in rows]
    return "\n".join(lines)
