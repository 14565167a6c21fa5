"""The scaling table of docs/performance.md ("Compiled for TPU slices") from the reports of
`python -m ffcl_jax.compile_for` in experiments/results/compile_for_*.json:

    python experiments/compile_for_table.py

Every time in it is a compiler-based lower bound (XLA's cost analysis against the chip's
published peak and HBM bandwidth), never a measurement.
"""

from __future__ import annotations

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
HEADER = (
    "| report | slice | chips (hosts) | batch per chip | memory per chip (of HBM) | "
    "GFLOP per chip | GB accessed per chip | all-reduces: ops, MiB | step bound | "
    "epoch bound | compile |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(name: str, report: dict) -> str:
    step = report["train_step"]
    memory = step["memory_bytes"]
    split = report["training_split_on_chip_bytes"]
    reduces = step["collectives"].get("all-reduce", {"count": 0, "bytes": 0})
    others = [op for op in step["collectives"] if op != "all-reduce"]
    bound = step["roofline"]
    limiter = "HBM" if bound["limited_by"].startswith("HBM") else "compute"
    fraction = report["train_step_and_split_fraction_of_hbm"]
    other_ops = " + " + ", ".join(others) if others else ""
    return (
        f"| `{name}` | {report['topology']} | {report['chips']} ({report['hosts']}) | "
        f"{step['per_chip_batch']['image'][0]} | "
        f"{(memory['total'] + split) / 2**30:.2f} GiB ({fraction:.1%}) | "
        f"{step['flops'] / 1e9:.1f} | {step['bytes_accessed'] / 1e9:.2f} | "
        f"{reduces['count']}, {reduces['bytes'] / 2**20:.1f}{other_ops} | "
        f"{bound['step_bound_seconds'] * 1e3:.2f} ms ({limiter}) | "
        f"{report['epoch_bound_seconds']['total']:.2f} s | "
        f"{step['compile_seconds'] + report['eval_step']['compile_seconds']:.0f} s |"
    )


def main() -> None:
    reports = []
    for path in glob.glob(os.path.join(RESULTS, "compile_for_*.json")):
        with open(path) as f:
            report = json.load(f)
        reports.append((os.path.basename(path)[len("compile_for_") : -len(".json")], report))
    # One chip generation after another, smaller slices first, the preset before its variants.
    reports.sort(key=lambda r: (r[1]["chip"]["name"], r[1]["chips"], len(r[0]), r[0]))
    print(HEADER)
    for name, report in reports:
        print(row(name, report))


if __name__ == "__main__":
    main()
