"""bench_step's `primitives` mode: every oneDNN primitive a train step runs, as oneDNN's own
verbose mode times it (`ONEDNN_VERBOSE=profile_exec`), for JAX (its oneDNN kernels) and PyTorch
(whose CPU convolutions are oneDNN's too): which implementation each convolution pass gets, its
ms a step and GFLOP/s, and their sum beside the step's wall time.

    python experiments/bench_step.py --config=configs/fashion_mnist.py --modes=primitives \
        --repeats=10 --output=experiments/results/primitives_<pair>_<device>_<isa>_<date>.json
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import bench_results  # experiments/, beside this script
from step_probes import step_on_random_batch

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
