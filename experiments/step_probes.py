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
import json
import os
import re
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


# A convolution's shape as oneDNN's verbose mode prints it: mb128_ic16oc16_ih28oh28kh3..._iw28...
_SHAPE_FIELD = re.compile(r"(g|mb|ic|oc|oh|ow|kh|kw)(\d+)")


def convolution_gflop(shape: str) -> float:
    """The GFLOP of one convolution pass with oneDNN's shape descriptor (the same for forward,
    backward-data and backward-weights: one multiply-add per weight per output position)."""
    d = {"g": 1, "kh": 1, "kw": 1}
    d.update((name, int(value)) for name, value in _SHAPE_FIELD.findall(shape))
    multiply_adds = d["mb"] * d["oh"] * d["ow"] * d["oc"] * (d["ic"] // d["g"]) * d["kh"] * d["kw"]
    return 2 * multiply_adds / 1e9


def parse_primitive_line(line: str) -> tuple[str, str, str, str, float] | None:
    """`(kind, implementation, pass, shape, ms)` of one `onednn_verbose,...,exec,...` line
    (`ONEDNN_VERBOSE=profile_exec`; a timestamp field, where oneDNN adds one, is skipped)."""
    fields = line.strip().split(",")
    if not fields or fields[0] != "onednn_verbose" or "exec" not in fields[1:5]:
        return None
    at = fields.index("exec")
    try:
        return fields[at + 2], fields[at + 3], fields[at + 4], fields[-2], float(fields[-1])
    except (IndexError, ValueError):
        return None


STEP_MARKER = "ffcl-step-start"  # printed before each timed step of a primitives run


def primitive_times(config, frameworks, steps: int, warmup: int, argv: list[str]) -> dict:
    """bench_step's `primitives` mode: every oneDNN primitive one train step runs, as oneDNN's
    verbose mode times it (`ONEDNN_VERBOSE=profile_exec`), by kind, implementation, pass and
    shape: calls a step, ms a step (the fastest of `steps` steps), GFLOP/s; beside the step's
    wall time, so what lies outside oneDNN (for JAX the BatchNorm kernel, XLA's fusions and
    dispatch) is the difference. JAX runs here, with its oneDNN kernels on (oneDNN reads the
    variable once, at its first primitive: this process must not have run one yet); PyTorch in
    a worker process (`argv`: bench_step's own arguments). Its printing slows the steps a
    little."""
    if os.environ.get("ONEDNN_VERBOSE") not in (None, "profile_exec"):
        raise SystemExit("primitives: unset ONEDNN_VERBOSE; this mode sets it itself")
    record = {
        "mode": "primitives",
        "pair": f"{config.teacher}+{config.student}",
        "batch_size": config.batch_size,
        "machine": bench_results.machine(),
    }
    tables = []
    if "jax" in frameworks:
        record["jax"] = _jax_primitives(config, steps, warmup)
        tables.append(_primitives_table("JAX", config, record["jax"]))
    if "pytorch" in frameworks:
        record["pytorch"] = _torch_primitives(argv)
        tables.append(_primitives_table("PyTorch", config, record["pytorch"]))
    record["table"] = "\n\n".join(tables)
    return record


def _jax_primitives(config, steps: int, warmup: int) -> dict:
    import jax

    from ffcl_jax import parallel

    if config.cpu.kernels == "xla":
        raise SystemExit("primitives: JAX runs no oneDNN primitive with cpu.kernels=xla")
    os.environ["ONEDNN_VERBOSE"] = "profile_exec"
    step, state, batch = step_on_random_batch(config, parallel.DataParallel())
    walls = []
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)  # oneDNN prints to the process's stdout
        try:
            for _ in range(warmup):  # its lines precede the first marker: not counted
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            for _ in range(steps):
                print(STEP_MARKER, flush=True)
                start = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                walls.append((time.perf_counter() - start) * 1e3)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return _primitive_rows(log, walls)


def _torch_primitives(argv: list[str]) -> dict:
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_step.py")
    kept = [a for a in argv if not a.startswith(("--modes", "--frameworks", "--output"))]
    done = subprocess.run(
        [sys.executable, script, "--worker=pytorch", "--modes=step", *kept],
        capture_output=True,
        text=True,
        env={**os.environ, "ONEDNN_VERBOSE": "profile_exec"},
    )
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not results:
        raise SystemExit(f"primitives: the PyTorch worker failed: {done.stderr[-2000:]}")
    walls = [round(t, 2) for t in json.loads(results[-1])["step"]["times_ms"]]
    return _primitive_rows(done.stdout.splitlines(), walls)


def _primitive_rows(lines, walls: list[float]) -> dict:
    """Per step (the lines after each STEP_MARKER), the ms of each (kind, implementation, pass,
    shape); the fastest step's sum and every primitive's fastest ms a step."""
    per_step = []
    for line in lines:
        if line.startswith(STEP_MARKER):
            per_step.append(collections.defaultdict(lambda: [0, 0.0]))
        elif per_step and (parsed := parse_primitive_line(line)):
            row = per_step[-1][parsed[:4]]
            row[0] += 1
            row[1] += parsed[4]
    if not per_step or not per_step[0]:
        raise SystemExit("primitives: oneDNN printed nothing")
    fastest = {key: min(s[key][1] for s in per_step if key in s) for key in per_step[0]}
    rows = []
    for key in sorted(fastest, key=lambda k: -fastest[k]):
        kind_, impl, pass_, shape = key
        row = {
            "kind": kind_,
            "implementation": impl,
            "pass": pass_,
            "shape": shape,
            "calls": per_step[0][key][0],
            "ms": round(fastest[key], 3),
        }
        if kind_ == "convolution":
            row["gflop_per_s"] = round(
                convolution_gflop(shape) * row["calls"] / (fastest[key] / 1e3), 1
            )
        rows.append(row)
    onednn_ms = [round(sum(r[1] for r in s.values()), 2) for s in per_step]
    return {
        "step_wall_ms": [round(w, 2) for w in walls],
        "onednn_ms": onednn_ms,
        "primitives": rows,
    }


def _primitives_table(side: str, config, result: dict) -> str:
    walls, onednn = result["step_wall_ms"], result["onednn_ms"]
    best = min(range(len(walls)), key=lambda i: walls[i])
    by_kind = collections.Counter()
    for row in result["primitives"]:
        by_kind[row["kind"]] += row["ms"]
    lines = [
        f"{side}: {config.teacher} + {config.student}, batch {config.batch_size}; fastest of "
        f"{len(walls)} steps: {walls[best]:.1f} ms wall, {onednn[best]:.1f} ms in oneDNN ("
        + ", ".join(f"{kind} {ms:.1f}" for kind, ms in by_kind.most_common())
        + ", each primitive's fastest)",
        "| ms a step | calls | GFLOP/s | pass | implementation | shape |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ms']:.2f} | {r['calls']} | {r.get('gflop_per_s', '-')} | {r['pass']} | "
        f"{r['implementation']} | {r['shape']} |"
        for r in result["primitives"]
    ]
    return "\n".join(lines)
