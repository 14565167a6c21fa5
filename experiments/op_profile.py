"""Where a jitted call spends its time: the XLA ops of one profiled call, longest first.

`bench_step.py --modes=profile` uses it on the train step. It traces one call with
`jax.profiler`, reads the trace back with `jax.profiler.ProfileData` and sums each op's events
(fusions, convolutions, custom calls such as the oneDNN kernels, copies). The name of an XLA
fusion says what it holds (`transpose_copy_fusion`); to read its body, dump the optimised HLO
(`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`).
"""

from __future__ import annotations

import collections
import glob
import tempfile

import jax

# Events that enclose others (the executor, Python frames): counting them would count twice.
ENCLOSING = ("ThunkExecutor", "block_until_ready", "profiler.py", "contextlib.py", "$")


def top_ops(fn, *args, n: int | None = None) -> tuple[list[tuple[str, float, int]], float]:
    """`([(op, ms, calls), ...] longest first (the first `n`), wall ms of the profiled call)`;
    `fn` is called once untraced first, so compilation is not in the profile."""
    import time

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
