"""The study driver: runs a study's plan (`experiments/plans/*.py`, `study_runs.Plan`) and writes
its report.

    nice -n 19 python experiments/study.py --plan=experiments/plans/powered_2026_12.py
    python experiments/study.py --plan=PLAN --phase=select      # the selection grid only
    python experiments/study.py --plan=PLAN --phase=final       # the final comparison only
    python experiments/study.py --plan=PLAN --seeds=1000,1001   # a subset of the seeds
    python experiments/study.py --plan=PLAN --report_only       # rewrite the reports only

A plan has a final phase and, where it selects settings first, a selection phase (`--phase=all`,
the default, runs both in turn). A selection phase trains every configuration of its grid on a
validation split (`config.validation_size`; its runs never evaluate the test split) and each
method's selected configuration is the one with the best mean last-epoch validation top-1 of
the student over the seeds every configuration finished; the final phase's rows are the
plan's function of that selection.

Each run is one subprocess (`python -m ffcl_jax.main ...`, or the PyTorch reference) in its own
workdir under `--workdirs` (local or gs://), run through `study_runs`: a finished run is
skipped, an interrupted JAX run resumes from its checkpoint, a kd run's teacher is trained again
where its checkpoints are not on this machine. After each run the phase's report is rewritten:
`<output>.json`, each finished run's files copied to `<output>_runs/`, and the block of the
study file between the phase's markers, from the plan's report sections (`study_report`,
`study_sensitivity`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import bench_results  # experiments/, beside this script
import study_report
import study_runs

from ffcl_jax.errors import UserError

ROOT = study_runs.ROOT
TITLES = {"select": "selection", "final": "final comparison"}


def _joined(start: dict, key: str) -> str | None:
    # a run resumed with other code or on another machine shows both
    values = dict.fromkeys(s.get(key) for s in study_runs.segments_of(start) if s.get(key))
    return " + ".join(values) or None


# What a run's record can hold (a phase's `record_fields` picks them): key, value of
# (run, seed, results, start record, command).
RECORD_FIELDS = {
    "run": ("run", lambda run, seed, res, start, cmd: study_runs.run_id(run, seed)),
    "configuration": ("run", lambda run, seed, res, start, cmd: run.name),
    "method": ("method", lambda run, seed, res, start, cmd: run.name),
    "framework": ("framework", lambda run, seed, res, start, cmd: run.framework),
    "seed": ("seed", lambda run, seed, res, start, cmd: seed),
    "command": ("command", lambda run, seed, res, start, cmd: cmd),
    "commit": ("commit", lambda run, seed, res, start, cmd: _joined(start, "commit")),
    "machine": ("machine", lambda run, seed, res, start, cmd: start.get("machine")),
    "machines": ("machine", lambda run, seed, res, start, cmd: _joined(start, "machine")),
    "resumed_at_steps": (
        "resumed_at_steps",
        lambda run, seed, res, start, cmd: res.get("resumed_at_steps") or [],
    ),
    "num_params": ("num_params", lambda run, seed, res, start, cmd: res.get("num_params")),
    "wall_seconds": ("wall_seconds", lambda run, seed, res, start, cmd: res.get("wall_seconds")),
    "summary": ("summary", lambda run, seed, res, start, cmd: res["summary"]),
    "history": ("history", lambda run, seed, res, start, cmd: res["history"]),
    "results": ("results", lambda run, seed, res, start, cmd: res),
}


def merged(*overrides: str) -> list[str]:
    """Config overrides with later ones replacing earlier ones of the same key."""
    return [f"{k}={v}" for k, v in dict(o.split("=", 1) for o in overrides).items()]


def phase_args(plan, phase, args) -> argparse.Namespace:
    """Where a phase's runs and results live, in the form `study_runs` reads."""
    return argparse.Namespace(
        config=plan.config,
        root=os.path.join(args.workdirs, phase.root),
        output=os.path.join(args.repo, phase.output),
        study_file=os.path.join(args.repo, phase.study_file),
        extra=merged(*phase.extra, *args.extra),
    )


def is_named(plan, phase, args) -> bool:
    """Whether --seeds and --rows apply to `phase`: the one --phase names (all: the first)."""
    return phase.name == (plan.phases()[0].name if args.phase == "all" else args.phase)


def phase_seeds(plan, phase, args) -> tuple[int, ...]:
    """--seeds replaces the seeds of the phase it names (--phase=all: the first phase)."""
    return tuple(args.seeds) if args.seeds and is_named(plan, phase, args) else phase.seeds


def rows_of(phase, seeds, selection: dict | None = None) -> list:
    """The phase's [(Run, seeds)], a row without seeds of its own taking the phase's."""
    rows = phase.rows(selection) if callable(phase.rows) else phase.rows
    return [(run, tuple(own) if own is not None else seeds) for run, own in rows]


def pairs_of(rows, order: str) -> list:
    """Every (run, seed) of `rows`: seed by seed (each seed's rows in order) or row by row."""
    if order == "row":
        return [(run, seed) for run, seeds in rows for seed in seeds]
    every = dict.fromkeys(seed for _, seeds in rows for seed in seeds)
    return [(run, seed) for seed in every for run, seeds in rows if seed in seeds]


def collect(phase, pargs, rows) -> list[dict]:
    """The finished runs' records (each copied to `<output>_runs/` on the way)."""
    unknown = [f for f in phase.record_fields if f not in RECORD_FIELDS and "." not in f]
    if unknown:
        raise UserError(f"record_fields {unknown}: each is one of {sorted(RECORD_FIELDS)}")
    records = []
    for run, seed in pairs_of(rows, phase.record_order):
        results = study_runs.finished(run, seed, pargs)
        if results is None:
            continue
        study_runs.keep_copy(run, seed, pargs)
        start = study_runs.started_at(run, seed, pargs)
        command = start.get("command") or study_runs.shown_command(run, seed, pargs)
        record = {}
        for field in phase.record_fields:
            if field.startswith("results."):  # any key of the run's results.json
                record[field] = results.get(field.removeprefix("results."))
            else:
                key, value = RECORD_FIELDS[field]
                record[key] = value(run, seed, results, start, command)
        records.append(record)
    return records


def report(phase, pargs, rows, seeds, selection=None, summary_file=None) -> dict:
    """Writes the phase's report (JSON, the study file's block, the summary) and returns it."""
    records = collect(phase, pargs, rows)
    ctx = study_report.Context(rows, records, list(seeds), pargs.extra, pargs.output, selection)
    ctx.result.update(phase.json_fixed)
    omit = set(phase.json_omit)
    ctx.result["runs"] = [{k: v for k, v in r.items() if k not in omit} for r in records]
    ctx.result["complete"] = ctx.complete
    if selection is not None:
        ctx.result["selection"] = selection
    lines = study_report.render(phase.sections, ctx)
    result = {key: ctx.result[key] for key in phase.json_keys if key in ctx.result}
    with open(f"{pargs.output}.json", "w") as f:
        json.dump(result, f, indent=1)
    bench_results.replace_block(phase.block, "\n".join(lines), path=pargs.study_file)
    if summary_file and phase.summary is not None:
        text = "\n".join(phase.summary.lines(ctx))
        bench_results.replace_block(phase.summary_block, text, path=summary_file)
    print(f"{TITLES[phase.name]} report of {len(records)} finished runs in {pargs.output}.json")
    return result


def progress_line(title: str, plan: list, args) -> str:
    """How far a phase is: `plan` is its (run, seed) pairs, `args` where their results live."""
    walls = [
        (results or {}).get("wall_seconds")
        for results in (study_runs.finished(run, seed, args) for run, seed in plan)
    ]
    done = [w for w in walls if w is not None]
    line = f"== {title}: {len(done)} of {len(plan)} runs finished"
    timed = [w for w in done if w]
    if timed and len(done) < len(plan):
        left = (len(plan) - len(done)) * statistics.fmean(timed) / 3600
        line += f", about {left:.1f} h left at the finished runs' mean"
    return line


def final_selection(plan, args) -> tuple[dict | None, list[int]]:
    """The selection a final phase reads: over the seeds every grid configuration finished
    (None while no seed is complete)."""
    phase = plan.select
    rows = rows_of(phase, phase_seeds(plan, phase, args))
    records = collect(phase, phase_args(plan, phase, args), rows)
    grid = [run for run, _ in rows]
    seeds = study_report.complete_seeds(records, grid)
    return (study_report.select(records, grid, seeds) if seeds else None), seeds


def run_phase(plan, phase, args, child, selection=None) -> dict:
    """Runs the phase's missing runs (none with --report_only), rewriting its report after each
    and once at the end (also when stopped)."""
    pargs, seeds = phase_args(plan, phase, args), phase_seeds(plan, phase, args)
    rows = rows_of(phase, seeds, selection)
    wanted = set(args.rows) if is_named(plan, phase, args) else set()
    known = {run.name for run, _ in rows}
    if wanted - known:
        raise UserError(f"--rows: unknown {sorted(wanted - known)}; valid: {sorted(known)}")
    order = pairs_of(rows, "seed")
    order = phase.run_order(order) if phase.run_order else order
    order = [(run, seed) for run, seed in order if not wanted or run.name in wanted]

    def write():
        return report(phase, pargs, rows, seeds, selection, args.summary_file)

    try:
        for run, seed in [] if args.report_only else order:
            if study_runs.finished(run, seed, pargs):
                continue
            print(progress_line(TITLES[phase.name], order, pargs), flush=True)
            study_runs.ensure_teacher(run, seed, pargs, child)
            study_runs.execute(run, seed, pargs, child)
            write()  # each finished run's summary at once
    finally:
        result = write()
    return result


def run_study(plan, args) -> None:
    child = {"process": None}
    with study_runs.stopping_on_signals(child):
        if plan.select is not None and args.phase in ("select", "all"):
            run_phase(plan, plan.select, args, child)
        if args.phase in ("final", "all"):
            selection = None
            if plan.select is not None:
                selected, seeds = final_selection(plan, args)
                if selected is None:
                    print("== final comparison: waits for a seed every configuration finished")
                    return
                chosen = ", ".join(s["run"] for s in selected.values())
                print(f"== final comparison with the selection over seeds {seeds}: {chosen}")
                selection = {"seeds": seeds, **selected}
            run_phase(plan, plan.final, args, child, selection)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="", help="a study's plan: experiments/plans/*.py")
    parser.add_argument(
        "--phase",
        default="all",
        choices=("select", "final", "all"),
        help="select: the selection grid; final: the final comparison (after a selection, "
        "once a seed of the grid is complete); all: each phase of the plan in turn",
    )
    parser.add_argument(
        "--seeds", default="", help="the seeds of the phase run (all: the first phase's)"
    )
    parser.add_argument(
        "--rows", default="", help="the rows to run (comma-separated names) of the phase run"
    )
    parser.add_argument("--extra", default="", help="config overrides for every run")
    parser.add_argument(
        "--workdirs",
        default=os.path.join(ROOT, "workdirs"),
        help="where the runs' workdirs go (local or gs://), the plan's folders under it",
    )
    parser.add_argument(
        "--repo",
        default=ROOT,
        help="the checkout whose results the report writes (a study run from a pinned "
        "worktree points it at the main checkout)",
    )
    parser.add_argument("--summary_file", default=None, help="a file for the plan's summary")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.rows = [r for r in args.rows.split(",") if r]
    args.extra = [o for o in args.extra.split(",") if o]
    return args


def main(argv=None, plan=None) -> None:
    """`plan`: a `study_runs.Plan` in place of the one --plan names (tests)."""
    args = parse_args(argv)
    if plan is None and not args.plan:
        raise UserError("name the study's plan: --plan=experiments/plans/<study>.py")
    plan = plan or study_runs.load(args.plan)
    if args.phase == "select" and plan.select is None:
        raise UserError(f"{args.plan}: this plan has no selection phase; use --phase=final")
    run_study(plan, args)


if __name__ == "__main__":
    main()
