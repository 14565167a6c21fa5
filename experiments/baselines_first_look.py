"""A first look at the online-distillation baselines on the study's protocol: one seed of each.

    python experiments/baselines_first_look.py                 # the missing runs, then the report
    python experiments/baselines_first_look.py --report_only   # rewrite the report only

ONE, CL-ILR, OKDDip, KDCL and PCL at their published defaults (docs/method.md), on the method
study's 3-epoch Fashion-MNIST protocol (`configs/fashion_mnist.py`) with its validation split
(`--validation_size`, as the study's selection), one seed: to show that each trains and where it
lands, not to compare them (that is the powered study's job). The protocol's ramp-up of 1 epoch
stands for the branch methods' 80 of 300 epochs, as it did for FFL and FFCL; KDCL has none.

Each run is a `python -m ffcl_jax.main` subprocess in its own workdir under `--root` (resumed if
interrupted, skipped if finished), its results copied to `<output>_runs/` at once; the report is
the block between the `baselines-first-look` markers of `--study_file`, with every command.
"""

from __future__ import annotations

import argparse
import os

import readme_block  # experiments/, beside this script
import study_runs

ROOT = study_runs.ROOT
BASELINES = (
    study_runs.Run("one", "jax", ("method=one",), "ONE: 3 branches, gate"),
    study_runs.Run("cl_ilr", "jax", ("method=cl_ilr",), "CL-ILR: 4 branches, rescaled trunk"),
    study_runs.Run("okddip", "jax", ("method=okddip",), "OKDDip: leader + 3 peers, attention"),
    study_runs.Run(
        "kdcl", "jax", ("method=kdcl", "loss.rampup_epochs=0.0"), "KDCL: the pair, 2 views"
    ),
    study_runs.Run("pcl", "jax", ("method=pcl",), "PCL: 3 branches, 3 views, temporal mean"),
)
# What each row reports: the deployable student, and the ensemble the method trains with.
COLUMNS = ("student", "ensemble")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--validation_size", type=int, default=5000)
    parser.add_argument("--root", default=os.path.join(ROOT, "workdirs", "baselines_first_look"))
    parser.add_argument(
        "--output",
        default=os.path.join(ROOT, "experiments", "results", "fashion_mnist_baselines"),
    )
    parser.add_argument(
        "--study_file",
        default=os.path.join(ROOT, "experiments", "results", "fashion_mnist.md"),
    )
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    args.all_seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra = [f"validation_size={args.validation_size}"]
    return args


def report(args) -> list[str]:
    """The report's lines (written into the study file): one row per finished run."""
    lines = [
        "| method | seed | validation student | validation ensemble | wall time |",
        "|---|---|---|---|---|",
    ]
    commands = []
    for seed in args.all_seeds:
        for run in BASELINES:
            results = study_runs.finished(run, seed, args)
            if results is None:
                lines.append(f"| `{run.name}` | {seed} | pending | | |")
                continue
            study_runs.keep_copy(run, seed, args)
            last = results["history"][-1]  # the test split's accuracy is not reported here
            assert last["split"] == "validation", "a first-look run evaluates on validation"
            cells = [f"{100 * last[m]:.2f}%" for m in COLUMNS]
            machine = study_runs.started_at(run, seed, args).get("machine")
            wall = study_runs.wall_cell([results["wall_seconds"]], [machine])
            lines.append(f"| `{run.name}` | {seed} | " + " | ".join(cells) + f" | {wall} |")
            commands.append(f"- `{study_runs.ran_command(run, seed, args)}`")
    descriptions = [f"- `{r.name}`: {r.description}" for r in BASELINES]
    return lines + ["", *descriptions, "", "Commands:", "", *commands]


def write_report(args) -> None:
    readme_block.replace_block("baselines-first-look", "\n".join(report(args)), args.study_file)


def main(argv=None) -> None:
    args = parse_args(argv)
    child = {"process": None}
    with study_runs.stopping_on_signals(child):
        if not args.report_only:
            plan = [(run, seed) for seed in args.all_seeds for run in BASELINES]
            study_runs.run_missing(plan, args, child, lambda: write_report(args))
    write_report(args)


if __name__ == "__main__":
    main()
