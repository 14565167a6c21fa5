"""The method comparison and ablation table on Fashion-MNIST, JAX and PyTorch side by side.

    python experiments/run_table.py                     # every run still missing, then the table
    python experiments/run_table.py --seeds=0 --runs=ffcl,independent,kd
    python experiments/run_table.py --report_only       # only rewrite the table from finished runs
    python experiments/run_table.py --report_only --readme   # ... and docs' copy of it

Each run is one subprocess in its own workdir under `--root`, run by `study_runs.py`: a
finished run is skipped, an interrupted JAX run resumes from its checkpoint, and SIGTERM (or
Ctrl-C) stops the current run the way a preemption does and still writes the table of what
finished.

Writes `<output>.json` (every run: command, wall time, per-epoch and summary accuracies),
`<output>.md` (mean +- std over seeds, pending runs marked) and `<output>_student.png` (student
test top-1 per epoch, mean over seeds), and copies each finished run's `results.json` and
`metrics.jsonl` to `<output>_runs/<run>/`, so the table can be checked against the raw logs.
Runs are ordered: the method comparison (both frameworks) seed by seed, then the ablations seed
by seed, so that an interrupted grid has whole seeds of the most important rows. `ffcl-bf16`
(FFCL with bfloat16 compute) is not an ablation but runs and compares like one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import readme_block  # experiments/, beside this script
import study_runs
import study_stats
from study_runs import ROOT, Run

from ffcl_jax.methods import REGISTRY

MODELS = ("student", "teacher", "fused", "ensemble")
# Where --readme writes the summary table (this driver's table is the 2026-11-25 one).
TABLE_DOC = os.path.join(
    ROOT, "experiments", "results", "archive", "fashion_mnist_2026-11-25_reading.md"
)


RUNS = (
    Run("independent", "jax", ("method=independent",), "T and S trained separately (CE only)"),
    Run(
        "kd",
        "jax",
        ("method=kd",),
        "Hinton KD (a 0.9, tau 4) from the frozen teacher of `independent`, same seed",
        needs="independent",
    ),
    Run("dml", "jax", ("method=dml",), "Deep Mutual Learning"),
    Run("ffl", "jax", ("method=ffl",), "Feature Fusion Learning"),
    Run("ffcl", "jax", ("method=ffcl",), "FFCL, every term"),
    *(
        Run(f"ffcl-{part}", "jax", ("method=ffcl", override), f"FFCL without {what}", ablation=True)
        for part, override, what in (
            ("fusion", "loss.lam_fuse=0", "fused->peers KL"),
            ("ensemble", "loss.lam_ens=0", "ensemble->fused KL"),
            ("mutual", "loss.lam_mutual=0", "mutual KL"),
            ("feature", "loss.lam_feat=0", "feature (attention) terms"),
            ("regularizer", "loss.regularizer=none", "the regularizer"),
        )
    ),
    # Not an ablation, but compared with full ffcl the same way: does bfloat16 compute (the
    # GPU option; losses stay float32) keep accuracy?
    Run(
        "ffcl-bf16",
        "jax",
        ("method=ffcl", "compute_dtype=bfloat16"),
        "FFCL with bfloat16 compute (losses float32)",
        ablation=True,
    ),
    Run("independent", "pytorch", ("method=independent",), "PyTorch reference, independent"),
    Run("ffcl", "pytorch", ("method=ffcl",), "PyTorch reference, FFCL"),
)


def collect(args) -> list[dict]:
    """Every finished run as one record (and copies of its results and metrics log)."""
    records = []
    for seed in args.all_seeds:
        for run in table_runs(args):
            results = study_runs.finished(run, seed, args)
            if results is None:
                continue
            rid = study_runs.run_id(run, seed)
            study_runs.keep_copy(run, seed, args)
            records.append(
                {
                    "run": rid,
                    "method": run.name,
                    "framework": run.framework,
                    "seed": seed,
                    "command": study_runs.ran_command(run, seed, args),
                    "commit": study_runs.started_at(run, seed, args).get("commit"),
                    "wall_seconds": results.get("wall_seconds"),
                    "train_img_per_sec": results.get("train_img_per_sec"),
                    "history": results["history"],
                    "summary": results["summary"],
                }
            )
    return records


def runs_of(records: list[dict], method: str, framework: str) -> list[dict]:
    """The finished runs of one row (all its seeds)."""
    return [r for r in records if r["method"] == method and r["framework"] == framework]


def reference_of(run: Run) -> str | None:
    """What a row is compared with: ablations with full ffcl, methods with independent training
    (both in the same framework)."""
    if run.ablation:
        return "ffcl"
    return None if run.name == "independent" else "independent"


def claim_lines(records: list[dict]) -> list[str]:
    """The paper's claim, pair by pair: FFCL's student against each baseline (JAX, paired by
    seed), each ablation's teacher / fused / ensemble against full FFCL's (the student is in the
    table), and each model of the rows both frameworks ran, PyTorch against JAX."""

    def runs(method: str, framework: str = "jax") -> list[dict]:
        return runs_of(records, method, framework)

    lines = [
        "## FFCL against each baseline, the ablations' other models, PyTorch against JAX",
        "",
        "Last-epoch top-1 in points (the student where no model is named); 95% t-interval;",
        "**bold** when it excludes 0.",
        "",
        "| comparison | difference |",
        "|---|---|",
    ]
    for baseline in ("independent", "kd", "dml", "ffl"):
        diff = study_stats.paired_difference(runs("ffcl"), runs(baseline))
        lines.append(study_stats.difference_row(f"ffcl - {baseline} (jax, paired by seed)", diff))
    # The table's Δ column is the student's; an ablation can move the other models too.
    for run in (r for r in RUNS if r.ablation and r.framework == "jax"):
        reference = reference_of(run)  # the row's `student Δ` reference, as in the table
        for model in MODELS[1:]:
            diff = study_stats.paired_difference(runs(run.name), runs(reference), model)
            label = f"{run.name} {model}: minus {reference} (jax, paired by seed)"
            lines.append(study_stats.difference_row(label, diff))
    for method in ("independent", "ffcl"):
        for model in MODELS:
            values = {
                framework: [
                    r["summary"][model]["last"]
                    for r in runs(method, framework)
                    if model in r["summary"]
                ]
                for framework in ("pytorch", "jax")
            }
            if not (values["pytorch"] or values["jax"]):
                continue
            diff = study_stats.framework_difference(values["pytorch"], values["jax"])
            label = f"{method} {model}: pytorch - jax (unpaired, Welch)"
            lines.append(study_stats.difference_row(label, diff))
    return lines


def aggregate(records: list[dict], args) -> list[dict]:
    rows = []
    for run in table_runs(args):
        mine = runs_of(records, run.name, run.framework)
        row = {
            "method": run.name,
            "framework": run.framework,
            "description": run.description,
            "seeds_done": sorted(r["seed"] for r in mine),
            "seeds_pending": sorted(set(args.all_seeds) - {r["seed"] for r in mine}),
            "wall_seconds_mean": (
                statistics.fmean(r["wall_seconds"] for r in mine) if mine else None
            ),
        }
        for model in MODELS:
            for which in ("last", "best"):
                values = [r["summary"][model][which] for r in mine if model in r["summary"]]
                row[f"{model}_{which}"] = values
        row["reference"] = reference_of(run)
        if row["reference"] is not None:
            theirs = runs_of(records, row["reference"], run.framework)
            row["student_difference"] = study_stats.paired_difference(mine, theirs)
        rows.append(row)
    return rows


def write_markdown(rows: list[dict], records: list[dict], args, protocol: str) -> None:
    lines = [
        "# Fashion-MNIST, 2026-11-25: methods and FFCL ablations, JAX and PyTorch",
        "",
        "Superseded by the method study in `fashion_mnist.md`: here the 3-epoch protocol with",
        "every loss setting at its default (none chosen on data), and each epoch evaluated on",
        "the test split.",
        "",
        protocol,
        "",
        "Test top-1 (%) as mean ± sample std over seeds; `last` is the last epoch, `best` the",
        "best evaluated epoch (it reads the test set, so it is optimistic). `n/a`: the method has",
        "no such model. `pending`: no finished run yet. Regenerate with",
        "`python experiments/run_table.py --report_only`.",
        "",
        "Each model cell is `last epoch / best epoch`. The kd row's teacher is the frozen teacher",
        "of the `independent` run of the same seed (its ensemble: that teacher + the KD student).",
        "",
        "The `student Δ` column is the student's last-epoch top-1 minus that of the row it is",
        "compared with (methods: `independent`; ablations and `ffcl-bf16`: full `ffcl`; same",
        "framework), paired by seed, with a 95% t-interval over the seeds; **bold** when the",
        "interval excludes 0.",
        "",
        "| method | framework | seeds | student | teacher | fused | ensemble | student Δ "
        "| wall / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        done = row["seeds_done"]
        cells = [row["method"], row["framework"], f"{len(done)}/{len(args.all_seeds)}"]
        for model in MODELS:
            last, best = row[f"{model}_last"], row[f"{model}_best"]
            if done and not last:
                cells.append("n/a")
            elif not done:
                cells.append("pending")
            else:
                cells.append(f"{study_stats.mean_std(last)} / {study_stats.mean_std(best)}")
        cells.append(study_stats.format_difference(row.get("student_difference"), row["reference"]))
        wall = row["wall_seconds_mean"]
        cells.append(f"{wall / 60:.1f} min" if wall else "pending")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *claim_lines(records)]
    lines += ["", "Methods:", ""]
    lines += [f"- `{r.name}` ({r.framework}): {r.description}" for r in RUNS]
    lines += ["", "## Runs", "", "| run | student last | wall | command |", "|---|---|---|---|"]
    for r in records:
        student = r["summary"].get("student", {}).get("last")
        lines.append(
            f"| {r['run']} | {100 * student:.2f} | {r['wall_seconds'] / 60:.1f} min "
            f"| `{r['command']}` |"
        )
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.readme:  # the summary table (not the per-run list) goes into the README too
        table = lines[lines.index(next(x for x in lines if x.startswith("| method"))) :]
        table = table[: table.index("")]
        readme_block.replace_block("fashion-mnist-table", "\n".join(table), TABLE_DOC)


def plot_students(records: list[dict], path: str, runs: tuple[Run, ...] = RUNS) -> None:
    """Student top-1 per epoch (the runs' evaluated split), mean over seeds, one line a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for run in runs:
        mine = runs_of(records, run.name, run.framework)
        if not mine:
            continue
        epochs = [row["epoch"] for row in mine[0]["history"]]
        curves = [[row["student"] for row in r["history"]] for r in mine]
        curves = [c for c in curves if len(c) == len(epochs)]
        means = [100 * statistics.fmean(column) for column in zip(*curves, strict=True)]
        style = "-" if run.framework == "jax" else "--"
        ax.plot(
            epochs,
            means,
            style,
            marker="o",
            label=f"{run.name} ({run.framework}, {len(curves)} seeds)",
        )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("student test top-1 (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFAULT_PROTOCOL = """Protocol (`configs/fashion_mnist.py`, the README demo's): teacher
ResNet-20 (0.27M parameters, 3 blocks a stage) and student ResNet-8 (0.08M, 1 block a stage):
two depths of one family, small enough for a 2-core CPU, with a teacher clearly stronger than
the student (91.0% vs 89.3% in the demo), so every method has something to transfer.
3 epochs of the 60,000 training images, SGD Nesterov lr 0.1 x0.1 at epoch 2, batch 128,
wd 1e-4 (fusion 1e-5), ramp-up of the
distillation weights over epoch 1, zero-pad 2 + crop + flip; test top-1 on all 10,000 test
images after every epoch. A cohort run takes about 10 minutes on the 2-core CPU (the kd run,
which trains only the student, about 6), so the 33 JAX runs (with `ffcl-bf16`'s) take about
5.5 hours: long enough for the networks to reach 89-91%, and short enough to run here.
`ffcl-bf16` stores activations and casts weights in bfloat16; XLA:CPU computes each
convolution and matrix product of bfloat16 inputs in float32 and rounds the result to
bfloat16 (seen in the compiled HLO), which is what a GPU's tensor cores do too (bfloat16
products are exact in float32 accumulation), up to summation order. Seeds 0, 1, 2; the PyTorch
reference runs `independent` and `ffcl` with the same config and seeds (its own augmentation
and initialisation draws, so not the same batches). `wall` is each run's own training time;
other work (benchmarks, tests) shared the 2 cores during some runs and slowed them by up to
about 2x, so read it as an order of magnitude, not as a speed comparison."""


def report(args) -> list[dict]:
    records = collect(args)
    rows = aggregate(records, args)
    if args.config == "configs/fashion_mnist.py" and not args.extra:
        protocol = DEFAULT_PROTOCOL
    else:
        protocol = f"Protocol: `{args.config}`" + (
            f" with overrides {' '.join(args.extra)}" if args.extra else ""
        )
    protocol += f"\n\nSeeds in this table: {', '.join(map(str, args.all_seeds))}."
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump({"protocol": protocol, "table": rows, "runs": records}, f, indent=1)
    write_markdown(rows, records, args, protocol)
    if records:
        plot_students(records, args.output + "_student.png")
    print(f"table of {len(records)} finished runs in {args.output}.md / .json", flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds to run")
    parser.add_argument(
        "--runs",
        default="",
        help="comma-separated run names (framework:name or name for both); empty: all",
    )
    parser.add_argument("--root", default=os.path.join(ROOT, "workdirs", "table_fashion_mnist"))
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "experiments", "results", "fashion_mnist_2026-11-25")
    )
    parser.add_argument(
        "--extra", default="", help="extra config overrides for every run, e.g. num_epochs=1"
    )
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = parser.parse_args(argv)
    args.all_seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra = [o for o in args.extra.split(",") if o]
    wanted = [w for w in args.runs.split(",") if w]
    known = {r.name for r in RUNS} | {f"{r.framework}:{r.name}" for r in RUNS}
    unknown = [w for w in wanted if w not in known]
    presets = [preset_run(w) for w in unknown if preset_run(w) is not None]
    unknown = [w for w in unknown if preset_run(w) is None]
    if unknown:
        parser.error(
            f"unknown runs {unknown}; valid: {', '.join(sorted(known))}, or any preset "
            f"({', '.join(REGISTRY)}) as name or framework:name"
        )
    args.selected = [
        r for r in RUNS if not wanted or r.name in wanted or f"{r.framework}:{r.name}" in wanted
    ] + presets
    return args


def table_runs(args) -> list[Run]:
    """The table's rows: every run of `RUNS`, then the presets asked for by name (`--runs`)."""
    return [*RUNS, *(r for r in getattr(args, "selected", ()) if r not in RUNS)]


def preset_run(name: str) -> Run | None:
    """A run of a preset at its defaults (`one`, `pytorch:pcl`, ...), for the presets the table
    has no row of; None for a name that is not a preset."""
    framework, _, method = name.rpartition(":")
    if method not in REGISTRY or framework not in ("", "jax", "pytorch"):
        return None
    return Run(method, framework or "jax", (f"method={method}",), f"the {method} preset")


def main(argv=None) -> None:
    args = parse_args(argv)
    child = {"process": None}
    with study_runs.stopping_on_signals(child):
        if not args.report_only:
            order = [(a, seed) for a in (False, True) for seed in args.all_seeds]
            plan = [
                (run, seed)
                for ablations, seed in order
                for run in args.selected
                if run.ablation == ablations
            ]
            study_runs.run_missing(plan, args, child)
    report(args)


if __name__ == "__main__":
    main()
