"""The method study on Fashion-MNIST: FFCL's open choices and FFL's knobs chosen on held-out data.

    python experiments/method_study.py                  # the grid, then the final comparison
    python experiments/method_study.py --phase=select   # the selection grid only
    python experiments/method_study.py --phase=final    # the final comparison only
    python experiments/method_study.py --report_only    # rewrite the reports only

Selection (`--phase=select`): every configuration of `GRID` (8 of FFCL, 8 of FFL: the same
budget for the strongest baseline) trains on the training split less `VALIDATION_SIZE`
class-balanced held-out images (`config.validation_size`, the same images for every run) and is
evaluated on them after every epoch. Each method's selected configuration is the one with the
best mean last-epoch validation top-1 of the student over the seeds: `select` reads only the
validation rows of each run's history, never its final test evaluation.

Final comparison (`--phase=final`, or after the grid with the default `--phase=all`): with each
method's selection over the seeds every grid configuration finished, the full training split,
test top-1 at the last epoch: independent, KD, DML, FFL and FFCL (selected) for 5 seeds, the
selected FFCL with each of its terms off for 3, and the PyTorch reference's independent and
selected FFCL for 5 (`final_runs`); its table goes between the `final` markers of the study file
and `<final_output>.json`, its student curves to `<final_output>_student.png`, and with
`--readme=FILE` its summary (the five methods and FFCL's paired differences) between FILE's
`fashion-mnist-study` markers (the README showed it until the study was archived).

Each run is one `python -m ffcl_jax.main` subprocess in its own workdir under `--root`; a run
whose results exist (there, or as the committed copy under `<output>_runs/`) is skipped, and an
interrupted one resumes from its checkpoint. Seeds run in order (every configuration's seed 0
first), so an interrupted grid has whole seeds. The report (`<output>.json`, and the selection
section of `experiments/results/archive/fashion_mnist_method_study.md` between its `selection`
markers) lists every configuration, its validation accuracies per seed, and the selection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import readme_block  # experiments/, beside this script
import study_runs
import study_stats

ROOT = study_runs.ROOT
VALIDATION_SIZE = 5000
MODELS = ("student", "teacher", "fused", "ensemble")


def _grid_run(method: str, name: str, overrides: dict, description: str) -> study_runs.Run:
    pairs = (f"method={method}",) + tuple(f"loss.{k}={v}" for k, v in overrides.items())
    return study_runs.Run(f"{method}-{name}", "jax", pairs, description)


# FFCL: feature form x regularizer strength. Each feature form has its reference weight: ours
# for attention summed over positions, RepDistiller's beta = 1000 for attention averaged over
# positions (every stage weighted equally), 1 for the fused-map distance (bounded in [0, 4]).
# lam_reg 1 is today's default; 0.1 is a tenth (Tf-KD weighs its KL by 10/K = 1 against 0.9 CE
# at K = 10, so both lie within the range its authors used). `stage_fusion` is not in the grid:
# its step costs 1.78x attention's on the demo pair (docs/performance_log.md), over the 1.3x the
# study allowed.
FEATURE_FORMS = {
    "att": ({"feat_form": "attention"}, "attention transfer, summed over positions, lam_feat 1"),
    "none": ({"lam_feat": 0.0}, "no feature term"),
    "attmean": (
        {"feat_form": "attention", "attention_reduction": "mean", "lam_feat": 1000.0},
        "attention transfer, averaged over positions (RepDistiller), lam_feat 1000",
    ),
    "fused": ({"feat_form": "fused_map"}, "fused map teaches both last stages, lam_feat 1"),
}
FFCL_GRID = tuple(
    _grid_run(
        "ffcl",
        f"{form}-reg{lam_reg:g}",
        {**overrides, "lam_reg": lam_reg},
        f"{description}; virtual teacher lam_reg {lam_reg:g}, T_reg 20",
    )
    for lam_reg in (1.0, 0.1)
    for form, (overrides, description) in FEATURE_FORMS.items()
)
# FFL: its temperature and each of its two KL weights, one at a time around its defaults.
FFL_GRID = tuple(
    _grid_run("ffl", name, overrides, description)
    for name, overrides, description in (
        ("default", {}, "tau 3, lam_fuse 1, lam_ens 1 (FFL's published setting)"),
        ("tau1", {"tau": 1.0}, "tau 1"),
        ("tau2", {"tau": 2.0}, "tau 2"),
        ("tau4", {"tau": 4.0}, "tau 4"),
        ("fuse0.5", {"lam_fuse": 0.5}, "lam_fuse 0.5"),
        ("fuse2", {"lam_fuse": 2.0}, "lam_fuse 2"),
        ("ens0.5", {"lam_ens": 0.5}, "lam_ens 0.5"),
        ("ens2", {"lam_ens": 2.0}, "lam_ens 2"),
    )
)
GRID = FFCL_GRID + FFL_GRID
# Runs alternate between the two methods, so that a grid cut short has configurations of both.
RUN_ORDER = tuple(run for pair in zip(FFCL_GRID, FFL_GRID, strict=True) for run in pair)


def validation_accuracy(results: dict, model: str = "student") -> float:
    """Last-epoch validation top-1 of `model`: the only number selection reads. A run whose
    epochs were evaluated on the test split is refused, so test accuracy cannot leak in."""
    history = results["history"]
    if results.get("eval_split") != "validation" or any(
        row.get("split") != "validation" for row in history
    ):
        raise ValueError("a selection run must evaluate its epochs on the validation split")
    return history[-1][model]


def complete_seeds(records: list[dict]) -> list[int]:
    """The seeds every configuration of the grid has finished: what the final selection uses,
    so that no configuration is judged on a seed another lacks."""
    seeds = {r["seed"] for r in records}
    return sorted(
        s
        for s in seeds
        if all(any(r["run"] == run.name and r["seed"] == s for r in records) for run in GRID)
    )


def select(records: list[dict], seeds: list[int] | None = None) -> dict[str, dict]:
    """Per method, the configuration with the best mean validation top-1 of the student over
    `seeds` (None: each configuration's finished seeds; ties: the earlier one in `GRID`)."""
    best: dict[str, dict] = {}
    for run in GRID:
        mine = [
            r for r in records if r["run"] == run.name and (seeds is None or r["seed"] in seeds)
        ]
        if not mine:
            continue
        score = statistics.fmean(validation_accuracy(r["results"]) for r in mine)
        method = run.overrides[0].removeprefix("method=")
        if method not in best or score > best[method]["validation_student"]:
            best[method] = {
                "run": run.name,
                "overrides": list(run.overrides),
                "validation_student": score,
                "seeds": sorted(r["seed"] for r in mine),
            }
    return best


def collect(args) -> list[dict]:
    records = []
    for seed in args.all_seeds:
        for run in GRID:
            results = study_runs.finished(run, seed, args)
            if results is None:
                continue
            study_runs.keep_copy(run, seed, args)
            records.append(
                {
                    "run": run.name,
                    "seed": seed,
                    "command": study_runs.ran_command(run, seed, args),
                    "wall_seconds": results.get("wall_seconds"),
                    "machine": study_runs.started_at(run, seed, args).get("machine"),
                    "results": results,
                }
            )
    return records


def report(args) -> dict:
    records = collect(args)
    selected = select(records)
    lines = [
        f"Validation top-1 (%) at the last epoch, on the {args.validation_size} held-out training",
        "images, mean over the finished seeds (each seed's value in brackets); the selected",
        "configuration of each method in **bold**. `wall / run`: each run's own training time",
        "(other work sometimes shared the 2 cores) and the CPU's ISA where recorded.",
        "Regenerate with `python experiments/method_study.py --report_only`.",
        "",
        "| configuration | what | seeds | student | teacher | fused | ensemble | wall / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in GRID:
        mine = [r for r in records if r["run"] == run.name]
        cells = [run.name, run.description, f"{len(mine)}/{len(args.all_seeds)}"]
        for model in MODELS:
            values = [validation_accuracy(r["results"], model) for r in mine]
            if not values:
                cells.append("pending")
                continue
            each = ", ".join(f"{100 * v:.2f}" for v in values)
            cells.append(f"{100 * statistics.fmean(values):.2f} ({each})")
        walls = [r["wall_seconds"] for r in mine if r["wall_seconds"]]
        cells.append(study_runs.wall_cell(walls, [r["machine"] for r in mine]))
        if any(s["run"] == run.name for s in selected.values()):
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in records]
    summary = {
        "validation_size": args.validation_size,
        "grid": [{"run": r.name, "overrides": list(r.overrides)} for r in GRID],
        "selected": selected,
        "runs": [{k: v for k, v in r.items() if k != "results"} for r in records],
    }
    with open(args.output + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.exists(args.study_file):
        readme_block.replace_block("selection", "\n".join(lines), path=args.study_file)
    print(f"selection report of {len(records)} finished runs in {args.output}.json", flush=True)
    return summary


# --------------------------------------------------------------------------- final comparison

FINAL_SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = (0, 1, 2)
PYTORCH_SEEDS = FINAL_SEEDS  # 3 in the protocol; 5 to pair FFCL's gain within PyTorch as in JAX
# Each term of the selected FFCL, switched off (skipped where the selection has it off already).
ABLATIONS = (
    ("fusion", "loss.lam_fuse", "0.0", "fused->peers KL"),
    ("ensemble", "loss.lam_ens", "0.0", "ensemble->fused KL"),
    ("mutual", "loss.lam_mutual", "0.0", "mutual KL"),
    ("feature", "loss.lam_feat", "0.0", "the feature term"),
    ("regularizer", "loss.regularizer", "none", "the regularizer"),
)


def _merged(overrides: tuple[str, ...], *more: str) -> tuple[str, ...]:
    """Overrides with later ones replacing earlier ones of the same key."""
    merged = dict(o.split("=", 1) for o in (*overrides, *more))
    return tuple(f"{k}={v}" for k, v in merged.items())


def final_runs(selected: dict[str, dict]) -> list[tuple[study_runs.Run, tuple[int, ...]]]:
    """The final comparison's rows and their seeds, from the selected configurations."""
    ffl, ffcl = tuple(selected["ffl"]["overrides"]), tuple(selected["ffcl"]["overrides"])
    Run = study_runs.Run
    rows = [
        (Run("independent", "jax", ("method=independent",), "T and S trained apart"), FINAL_SEEDS),
        (
            Run("kd", "jax", ("method=kd",), "Hinton KD from independent's teacher", "independent"),
            FINAL_SEEDS,
        ),
        (Run("dml", "jax", ("method=dml",), "Deep Mutual Learning"), FINAL_SEEDS),
        (Run("ffl", "jax", ffl, f"FFL, selected: {selected['ffl']['run']}"), FINAL_SEEDS),
        (Run("ffcl", "jax", ffcl, f"FFCL, selected: {selected['ffcl']['run']}"), FINAL_SEEDS),
    ]
    for part, key, off, what in ABLATIONS:
        if f"{key}={off}" in ffcl:
            continue
        run = Run(
            f"ffcl-{part}",
            "jax",
            _merged(ffcl, f"{key}={off}"),
            f"selected FFCL without {what}",
            ablation=True,
        )
        rows.append((run, ABLATION_SEEDS))
    rows.append(
        (Run("independent", "pytorch", ("method=independent",), "PyTorch reference"), PYTORCH_SEEDS)
    )
    rows.append((Run("ffcl", "pytorch", ffcl, "PyTorch reference, selected FFCL"), PYTORCH_SEEDS))
    return rows


def final_report(
    rows, final_args, study_file: str, selection: dict | None = None, readme: str | None = None
) -> dict:
    """Last-epoch test top-1 per row, the paired differences the protocol reads, the student
    curves (`<output>_student.png`) and, with `readme`, the summary the README shows."""
    records = []
    for run, seeds in rows:
        for seed in seeds:
            results = study_runs.finished(run, seed, final_args)
            if results is not None:
                study_runs.keep_copy(run, seed, final_args)
                records.append(
                    {
                        "run": study_runs.run_id(run, seed),
                        "method": run.name,
                        "framework": run.framework,
                        "seed": seed,
                        "command": study_runs.ran_command(run, seed, final_args),
                        "wall_seconds": results.get("wall_seconds"),
                        "machine": study_runs.started_at(run, seed, final_args).get("machine"),
                        "summary": results["summary"],
                        "history": results["history"],
                    }
                )

    def of(name, framework="jax"):
        return study_runs.runs_of(records, name, framework)

    def students(name, framework="jax"):
        return [r["summary"]["student"]["last"] for r in of(name, framework)]

    lines = [
        "Test top-1 (%) at the last epoch, mean ± std over seeds, full training split. Paired",
        "differences of the student in points with 95% t-intervals; **bold**: the interval",
        "excludes 0. `wall / run`: each run's own training time (other work sometimes shared",
        "the 2 cores) and the CPU's ISA. Regenerate with",
        "`python experiments/method_study.py --report_only`.",
        "",
        "| row | what | framework | seeds | student | teacher | fused | ensemble | wall / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, seeds in rows:
        mine = of(run.name, run.framework)
        cells = [run.name, run.description, run.framework, f"{len(mine)}/{len(seeds)}"]
        for model in MODELS:
            values = [r["summary"][model]["last"] for r in mine if model in r["summary"]]
            cells.append(study_stats.mean_std(values) if values or not mine else "n/a")
        walls = [r["wall_seconds"] for r in mine if r["wall_seconds"]]
        cells.append(study_runs.wall_cell(walls, [r["machine"] for r in mine]))
        lines.append("| " + " | ".join(cells) + " |")
    comparisons = {}
    for baseline in ("independent", "kd", "dml", "ffl"):
        diff = study_stats.paired_difference(of("ffcl"), of(baseline))
        comparisons[baseline] = study_stats.format_difference(diff, None)
    lines += ["", "| comparison | student difference |", "|---|---|"]
    lines += [f"| ffcl - {b} (paired by seed) | {text} |" for b, text in comparisons.items()]
    for run, _ in rows:
        if run.ablation:
            diff = study_stats.paired_difference(of(run.name), of("ffcl"))
            lines.append(study_stats.difference_row(f"{run.name} - ffcl (paired by seed)", diff))
    # Within each framework on the seeds both ran, so the frameworks' gains compare like for like.
    pytorch_seeds = {r["seed"] for r in of("ffcl", "pytorch")}
    for framework, label in (("pytorch", "pytorch"), ("jax", "jax on pytorch's seeds")):
        mine, alone = (
            [r for r in of(name, framework) if r["seed"] in pytorch_seeds]
            for name in ("ffcl", "independent")
        )
        diff = study_stats.paired_difference(mine, alone)
        lines.append(
            study_stats.difference_row(f"ffcl - independent, {label} (paired by seed)", diff)
        )
    for name in ("independent", "ffcl"):  # different draws for a seed: not paired
        diff = study_stats.framework_difference(students(name, "pytorch"), students(name))
        lines.append(study_stats.difference_row(f"{name}: pytorch - jax (unpaired, Welch)", diff))
    curves = os.path.basename(final_args.output) + "_student.png"
    if records:
        study_runs.plot_students(
            records, final_args.output + "_student.png", tuple(run for run, _ in rows)
        )
        lines += ["", f"Student test top-1 per epoch, mean over seeds: `{curves}`."]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in records]
    with open(final_args.output + ".json", "w") as f:
        json.dump({"selection": selection, "runs": records}, f, indent=1)
    if os.path.exists(study_file):
        readme_block.replace_block("final", "\n".join(lines), path=study_file)
    if readme is not None:
        readme_block.replace_block(
            "fashion-mnist-study", "\n".join(readme_summary(rows, of, comparisons)), path=readme
        )
    return {"runs": records}


def readme_summary(rows, of, comparisons: dict[str, str]) -> list[str]:
    """The README's part of the final table: the five methods' students and FFCL's paired
    differences, the same cells as the study file's (made by the same code from the same runs)."""
    lines = [
        "| method | student test top-1 (%) | FFCL minus it, 95% interval |",
        "|---|---|---|",
    ]
    for run, seeds in rows:
        if run.ablation or run.framework != "jax":
            continue
        values = [r["summary"]["student"]["last"] for r in of(run.name)]
        cell = f"{study_stats.mean_std(values)} ({len(values)}/{len(seeds)} seeds)"
        what = f"{run.name} ({run.description})"
        lines.append(f"| {what} | {cell} | {comparisons.get(run.name, '-')} |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--phase",
        default="all",
        choices=("select", "final", "all"),
        help="select: the grid; final: the test-split comparison (needs a finished grid seed); "
        "all: the grid, then the final comparison",
    )
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--root", default=os.path.join(ROOT, "workdirs", "method_study"))
    parser.add_argument(
        "--output",
        default=os.path.join(ROOT, "experiments", "results", "archive", "fashion_mnist_selection"),
    )
    parser.add_argument(
        "--study_file",
        default=os.path.join(
            ROOT, "experiments", "results", "archive", "fashion_mnist_method_study.md"
        ),
    )
    parser.add_argument("--validation_size", type=int, default=VALIDATION_SIZE)
    parser.add_argument(
        "--runs", default="", help="comma-separated configuration names; empty: the whole grid"
    )
    parser.add_argument(
        "--extra",
        dest="extra_overrides",
        default="",
        help="extra config overrides for every run, e.g. num_epochs=1",
    )
    parser.add_argument(
        "--final_root", default=os.path.join(ROOT, "workdirs", "method_study_final")
    )
    parser.add_argument(
        "--final_output",
        default=os.path.join(ROOT, "experiments", "results", "archive", "fashion_mnist_final"),
    )
    parser.add_argument(
        "--readme",
        default=None,
        help="a file whose fashion-mnist-study block gets the final table's summary",
    )
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    args.all_seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra = [f"validation_size={args.validation_size}"]
    args.extra += [o for o in args.extra_overrides.split(",") if o]
    known = {run.name for run in GRID}
    wanted = {w for w in args.runs.split(",") if w}
    if wanted - known:
        parser.error(f"unknown configurations {sorted(wanted - known)}; valid: {sorted(known)}")
    args.selected = [run for run in RUN_ORDER if not wanted or run.name in wanted]
    return args


def progress_line(phase: str, plan: list, args) -> str:
    """How far a phase is: `plan` is its (run, seed) pairs, `args` where their results live."""
    walls = [
        (results or {}).get("wall_seconds")
        for results in (study_runs.finished(run, seed, args) for run, seed in plan)
    ]
    done = [w for w in walls if w is not None]
    line = f"== {phase}: {len(done)} of {len(plan)} runs finished"
    timed = [w for w in done if w]
    if timed and len(done) < len(plan):
        left = (len(plan) - len(done)) * statistics.fmean(timed) / 3600
        line += f", about {left:.1f} h left at the finished runs' mean"
    return line


def final_selection(args) -> tuple[dict | None, list[int]]:
    """The selection the final comparison uses: over the seeds every grid configuration has
    finished (None while no seed is complete)."""
    records = collect(args)
    seeds = complete_seeds(records)
    return (select(records, seeds) if seeds else None), seeds


def run_final(args, child: dict | None, rows, selection: dict) -> None:
    """Runs (child None: only reports) the final comparison's rows, seed by seed."""
    final_args = argparse.Namespace(
        config=args.config,
        root=args.final_root,
        output=args.final_output,
        extra=[o for o in args.extra if not o.startswith("validation_size=")],
    )
    order = [
        (run, seed)
        for run, seeds in rows
        if not run.ablation and run.framework == "jax"
        for seed in seeds
    ]
    order.sort(key=lambda pair: pair[1])  # seed by seed: whole seeds of the comparison first
    order += sorted(((r, s) for r, seeds in rows if r.ablation for s in seeds), key=lambda p: p[1])
    order += [(r, s) for r, seeds in rows if r.framework == "pytorch" for s in seeds]
    try:
        for run, seed in order:
            if child is not None and not study_runs.finished(run, seed, final_args):
                print(progress_line("final comparison", order, final_args), flush=True)
                study_runs.ensure_teacher(run, seed, final_args, child)
                study_runs.execute(run, seed, final_args, child)
                final_report(rows, final_args, args.study_file, selection, args.readme)
    finally:
        final_report(rows, final_args, args.study_file, selection, args.readme)


def main(argv=None) -> None:
    args = parse_args(argv)
    child = {"process": None}
    with study_runs.stopping_on_signals(child):
        if not args.report_only and args.phase in ("select", "all"):
            plan = [(run, seed) for seed in args.all_seeds for run in args.selected]
            for run, seed in plan:
                if not study_runs.finished(run, seed, args):
                    print(progress_line("selection", plan, args), flush=True)
                    study_runs.execute(run, seed, args, child)
                    report(args)  # each finished run's summary at once
        if args.phase in ("final", "all"):
            selected, seeds = final_selection(args)
            if selected is None:
                print(
                    "== final comparison: waits for a seed that every grid configuration finished"
                )
            else:
                print(
                    f"== final comparison with the selection over seeds {seeds}: "
                    f"{selected['ffcl']['run']}, {selected['ffl']['run']}",
                    flush=True,
                )
                selection = {"seeds": seeds, **selected}
                child_or_none = None if args.report_only else child
                run_final(args, child_or_none, final_runs(selected), selection)
    report(args)


if __name__ == "__main__":
    main()
