"""The powered comparison: FFCL against every online baseline on 30 fresh seeds, and JAX against
PyTorch from the same start (protocol: experiments/results/fashion_mnist_powered.md).

    nice -n 19 python experiments/powered_study.py                # every missing run, then report
    python experiments/powered_study.py --report_only             # rewrite the report only
    python experiments/powered_study.py --seeds=1000,1001         # a subset of the seeds

Each run is a subprocess (`python -m ffcl_jax.main ...`, or the PyTorch reference with
`reference_from_jax=True`) in its own workdir under `--root`; a finished run is skipped, an
interrupted JAX run resumes from its checkpoint; `kd` trains from the frozen teacher of the same
seed's `independent` run. Seeds run in order, every method of a seed first. After each run the
report is rewritten: `<output>.json` (every run's summary, per-seed values, the comparisons),
each run's results copied to `<output>_runs/`, and the block between the `powered` markers of
the protocol file. The comparisons are computed from the seeds every compared run finished.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics

import readme_block  # experiments/, beside this script
import scipy.stats
import study_runs
import study_stats

ROOT = study_runs.ROOT
SEEDS = tuple(range(1000, 1030))
_PAIR_METHODS = (
    ("independent", (), "T and S trained separately"),
    ("kd", (), "Hinton KD from the same seed's independent teacher"),
    ("dml", (), "Deep Mutual Learning"),
    ("ffl", ("loss.tau=2.0",), "FFL as selected by the first study (tau 2)"),
    ("ffcl", ("loss.lam_feat=0.0", "loss.lam_reg=0.1"), "FFCL as selected by the first study"),
)
_ONLINE_METHODS = (
    ("one", (), "ONE"),
    ("cl_ilr", (), "CL-ILR"),
    ("okddip", (), "OKDDip"),
    ("kdcl", ("loss.rampup_epochs=0.0",), "KDCL (no ramp-up, as published)"),
    ("pcl", ("loss.temporal_mean_decay=0.92",), "PCL (temporal mean's window scaled)"),
)
JAX_RUNS = tuple(
    study_runs.Run(
        name,
        "jax",
        (f"method={name}", *overrides),
        description,
        needs="independent" if name == "kd" else None,
    )
    for name, overrides, description in _PAIR_METHODS + _ONLINE_METHODS
)
PYTORCH_RUNS = tuple(
    study_runs.Run(
        run.name,
        "pytorch",
        (*run.overrides, "reference_from_jax=True"),
        f"PyTorch reference from the JAX start: {run.description}",
    )
    for run in JAX_RUNS
    if run.name in ("independent", "ffcl")
)
RUNS = JAX_RUNS + PYTORCH_RUNS
MODELS = ("student", "teacher", "ensemble")


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error over all of `p_values`)."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def per_seed(records: list[dict], method: str, framework: str, model: str) -> dict[int, float]:
    """{seed: last-epoch test top-1 in points} of one method's runs."""
    return {
        r["seed"]: 100 * r["summary"][model]["last"]
        for r in records
        if r["method"] == method and r["framework"] == framework and model in r["summary"]
    }


def paired(mine: dict[int, float], theirs: dict[int, float], test: bool) -> dict:
    """Mine minus theirs over the seeds both have: the mean and, with `test`, the 95%
    t-interval, two-sided p, the differences' standard deviation (the power calculation's
    input) and how many seeds mine is ahead in."""
    seeds = sorted(set(mine) & set(theirs))
    diffs = [mine[s] - theirs[s] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, "n": len(diffs)}
    if diffs:
        out["mean"] = statistics.fmean(diffs)
    if test and len(diffs) >= 2:
        result = scipy.stats.ttest_1samp(diffs, 0.0)
        interval = result.confidence_interval(0.95)
        out.update(ci95=[interval.low, interval.high], p=float(result.pvalue))
        out.update(sd=statistics.stdev(diffs), ahead=sum(d > 0 for d in diffs))
    return out


def reading(c: dict) -> str:
    """The protocol's rule: FFCL beats a baseline where the Holm-adjusted p < 0.05 and the
    difference is positive, loses where it is negative, ties otherwise."""
    if c["p_holm"] >= 0.05:
        return "ties"
    return "beats" if c["mean"] > 0 else "loses"


def comparisons(records: list[dict], test: bool) -> dict:
    """The primary comparisons (FFCL's student minus each other JAX method's, Holm-adjusted)
    and the framework comparison (PyTorch minus JAX, paired by seed). The protocol tests once,
    on every seed: before that (`test` False) only the mean differences."""
    ffcl = per_seed(records, "ffcl", "jax", "student")
    primary = {
        run.name: paired(ffcl, per_seed(records, run.name, "jax", "student"), test)
        for run in JAX_RUNS
        if run.name != "ffcl"
    }
    tested = {name: c["p"] for name, c in primary.items() if "p" in c}
    for name, adjusted in holm(tested).items():
        primary[name]["p_holm"] = adjusted
        primary[name]["reading"] = reading(primary[name])
    frameworks = {
        run.name: paired(
            per_seed(records, run.name, "pytorch", "student"),
            per_seed(records, run.name, "jax", "student"),
            test,
        )
        for run in PYTORCH_RUNS
    }
    return {"primary": primary, "pytorch_minus_jax": frameworks}


def one_machine_seeds(records: list[dict]) -> tuple[str | None, list[int]]:
    """The protocol's sensitivity analysis keeps the seeds whose runs all ran on one machine
    kind (this project's kind changes between sessions, and XLA:CPU's rounding with it): the
    most common such kind and its seeds."""
    kinds: dict[int, set] = {}
    for r in records:
        kinds.setdefault(r["seed"], set()).add(r["machine"])
    single = sorted(next(iter(k)) for k in kinds.values() if len(k) == 1 and None not in k)
    if not single:
        return None, []
    kind = max(single, key=single.count)
    return kind, sorted(seed for seed, k in kinds.items() if k == {kind})


def collect(args) -> list[dict]:
    records = []
    for seed in args.all_seeds:
        for run in RUNS:
            results = study_runs.finished(run, seed, args)
            if results is None:
                continue
            study_runs.keep_copy(run, seed, args)
            started = study_runs.started_at(run, seed, args)
            records.append(
                {
                    "run": study_runs.run_id(run, seed),
                    "method": run.name,
                    "framework": run.framework,
                    "seed": seed,
                    "command": study_runs.ran_command(run, seed, args),
                    "commit": started.get("commit"),
                    "machine": started.get("machine"),
                    "wall_seconds": results.get("wall_seconds"),
                    "summary": results["summary"],
                }
            )
    return records


def _cell(c: dict) -> str:
    if "mean" not in c:
        return f"pending (n={c['n']})"
    if "p" not in c:
        return f"{c['mean']:+.2f} (n={c['n']}; interim mean, no interval or test)"
    low, high = c["ci95"]
    adjusted = f", Holm p = {c['p_holm']:.3g}" if "p_holm" in c else ""
    return f"{c['mean']:+.2f} [{low:+.2f}, {high:+.2f}] (n={c['n']}, p = {c['p']:.3g}{adjusted})"


_SPREAD = ("sd of the differences", lambda c: f"{c['sd']:.2f}")
_PRIMARY_EXTRA = (
    _SPREAD,
    ("seeds FFCL ahead", lambda c: f"{c['ahead']} of {c['n']}"),
    ("reading", lambda c: f"**{c['reading']}**"),
)


def _comparison_lines(compared: dict, first_column: str, second_column: str, extra) -> list[str]:
    """A table of comparisons, one row each; the `extra` (header, cell) columns only once every
    comparison is tested (progress reports carry no test)."""
    if not all("sd" in c for c in compared.values()):
        extra = ()
    headers = [first_column, second_column, *(header for header, _ in extra)]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for name, c in compared.items():
        lines.append("| " + " | ".join([f"`{name}`", _cell(c), *(f(c) for _, f in extra)]) + " |")
    return lines


def _primary_lines(primary: dict, first_column: str) -> list[str]:
    return _comparison_lines(
        primary, first_column, "paired difference, points [95% CI]", _PRIMARY_EXTRA
    )


def _framework_lines(frameworks: dict, first_column: str) -> list[str]:
    return _comparison_lines(frameworks, first_column, "points [95% CI]", (_SPREAD,))


def _one_machine_lines(one_machine: dict, seeds: int, finished_seeds: int) -> list[str]:
    kind, kept = one_machine["machine"], one_machine["seeds"]
    if kind is None:
        return ["Sensitivity to the machine kind: no seed has all its runs on one machine yet."]
    if len(kept) == finished_seeds:
        return [
            f"Sensitivity to the machine kind: every seed's runs ran on one kind, {kind}; "
            "the analysis above is the one-kind analysis."
        ]
    lines = [
        f"Sensitivity to the machine kind: the {len(kept)} of {seeds} seeds whose runs all ran "
        f"on one kind, {kind} (seeds {', '.join(map(str, kept))}):",
        "",
        *_primary_lines(one_machine["comparisons"]["primary"], "FFCL's student minus, one kind"),
        "",
        *_framework_lines(
            one_machine["comparisons"]["pytorch_minus_jax"], "PyTorch minus JAX, one kind"
        ),
    ]
    return lines


def _seed_ranges(seeds: list[int]) -> str:
    """[1000, 1001, 1002, 1005] -> '1000-1002, 1005'."""
    spans: list[list[int]] = []
    for seed in sorted(seeds):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _command_lines(records: list[dict]) -> list[str]:
    """Each run's recorded command with `{seed}` for its seed, once per distinct command, with
    the seeds that ran it: 360 commands would bury the table, and a run whose command differs in
    anything but the seed still gets a line of its own."""
    seeds_of: dict[str, list[int]] = {}
    for r in records:
        pattern = re.sub(rf"(seed=?){r['seed']}\b", r"\1{seed}", r["command"])
        seeds_of.setdefault(pattern, []).append(r["seed"])
    return [f"- seeds {_seed_ranges(seeds)}: `{c}`" for c, seeds in seeds_of.items()]


def _code_line(records: list[dict]) -> str:
    """Which commit's code the finished runs ran (each run's `table_run.json`)."""
    counts = collections.Counter(r["commit"] or "unrecorded" for r in records)
    if len(counts) == 1:
        return f"Code: every finished run ran commit `{next(iter(counts))}`."
    runs = ", ".join(f"`{c}` ({n} run{'s' * (n > 1)})" for c, n in counts.items())
    return f"Code: the finished runs ran more than one commit: {runs}."


def report(args) -> dict:
    records = collect(args)
    result = {"protocol": "experiments/results/fashion_mnist_powered.md", "runs": records}
    complete = len(records) == len(RUNS) * len(args.all_seeds)
    result["complete"] = complete
    result["comparisons"] = comparisons(records, test=complete)
    kind, seeds = one_machine_seeds(records)
    result["one_machine"] = {
        "machine": kind,
        "seeds": seeds,
        "comparisons": comparisons([r for r in records if r["seed"] in seeds], test=complete),
    }
    with open(f"{args.output}.json", "w") as f:
        json.dump(result, f, indent=1)
    progress = (
        f"All {len(records)} runs ({len(args.all_seeds)} seeds) are in: the protocol's analysis."
        if complete
        else f"Progress: {len(records)} of {len(RUNS) * len(args.all_seeds)} runs "
        f"({len(args.all_seeds)} seeds). Until every seed is in, this is a progress report: "
        "mean differences only, no interval and no test (the protocol tests once, on every seed)."
    )
    hours = sum(r["wall_seconds"] or 0.0 for r in records) / 3600
    lines = [
        f"{progress} Wall time of the finished runs: {hours:.1f} h.",
        "",
        "| method | framework | runs | student | teacher | ensemble | wall time, median |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in RUNS:
        mine = [r for r in records if r["method"] == run.name and r["framework"] == run.framework]
        cells = []
        for model in MODELS:
            values = [r["summary"][model]["last"] for r in mine if model in r["summary"]]
            cells.append(study_stats.mean_std(values) if values else "-")
        wall = study_runs.wall_cell(
            [r["wall_seconds"] for r in mine if r["wall_seconds"]],
            [r["machine"] for r in mine],
            average=statistics.median,  # a run that shared the machine would pull a mean up
        )
        row = [f"`{run.name}`", run.framework, str(len(mine)), *cells, wall]
        lines.append("| " + " | ".join(row) + " |")
    compared = result["comparisons"]
    lines += ["", *_primary_lines(compared["primary"], "FFCL's student minus")]
    lines += [
        "",
        *_framework_lines(
            compared["pytorch_minus_jax"], "PyTorch minus JAX, student, from the same start"
        ),
    ]
    finished_seeds = len({r["seed"] for r in records})
    lines += ["", *_one_machine_lines(result["one_machine"], len(args.all_seeds), finished_seeds)]
    if records:
        lines += ["", _code_line(records), "", "Commands of the finished runs:"]
        lines += ["", *_command_lines(records)]
    readme_block.replace_block("powered", "\n".join(lines), args.study_file)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--root", default=os.path.join(ROOT, "workdirs", "powered_study"))
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "experiments", "results", "fashion_mnist_powered")
    )
    parser.add_argument(
        "--study_file",
        default=os.path.join(ROOT, "experiments", "results", "fashion_mnist_powered.md"),
    )
    parser.add_argument("--extra", default="", help="extra config overrides for every run")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    args.all_seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra = [o for o in args.extra.split(",") if o]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    child = {"process": None}
    with study_runs.stopping_on_signals(child):
        if not args.report_only:
            plan = [(run, seed) for seed in args.all_seeds for run in RUNS]
            study_runs.run_missing(plan, args, child, lambda: report(args))
    report(args)


if __name__ == "__main__":
    main()
