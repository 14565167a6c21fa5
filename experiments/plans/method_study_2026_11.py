"""The method study on Fashion-MNIST (2026-11-25 to 12-02, archived): FFCL's open choices and
FFL's knobs chosen on held-out data, then five methods on the test split.

    python experiments/study.py --plan=experiments/plans/method_study_2026_11.py --report_only

Selection: every configuration of `GRID` (8 of FFCL, 8 of FFL: the same budget for the
strongest baseline) trains on the training split less 5000 class-balanced held-out images
(`config.validation_size`, the same images for every run) on seeds 0 and 1, evaluated on them
after every epoch; each method's selected configuration is the best mean last-epoch validation
student over the seeds every configuration finished. Final comparison, on the full training
split and test top-1 at the last epoch: independent, KD, DML, FFL and FFCL (selected) for 5
seeds, the selected FFCL with each of its terms off for 3, and the PyTorch reference's
independent and selected FFCL for 5. Report: `archive/fashion_mnist_method_study.md` (its
`selection` and `final` blocks), `archive/fashion_mnist_selection.json`, `_final.json` and
`_final_student.png`; `--summary_file=FILE` writes the five methods' summary into FILE's
`fashion-mnist-study` block (the README showed it until the study was archived).
"""

from __future__ import annotations

from study_report import (
    Ablations,
    Commands,
    DifferenceTable,
    Paired,
    RowsTable,
    SelectionTable,
    StudentCurves,
    SummaryTable,
    Text,
    Welch,
)
from study_runs import Phase, Plan, Run

ARCHIVE = "experiments/results/archive/"
STUDY_FILE = ARCHIVE + "fashion_mnist_method_study.md"
COMMAND = (
    "python experiments/study.py --plan=experiments/plans/method_study_2026_11.py --report_only"
)
MODELS = ("student", "teacher", "fused", "ensemble")


def _grid_run(method: str, name: str, overrides: dict, description: str) -> Run:
    pairs = (f"method={method}",) + tuple(f"loss.{k}={v}" for k, v in overrides.items())
    return Run(f"{method}-{name}", "jax", pairs, description)


# FFCL: feature form x regularizer strength. Each feature form has its reference weight: ours
# for attention summed over positions, RepDistiller's beta = 1000 for attention averaged over
# positions (every stage weighted equally), 1 for the fused-map distance (bounded in [0, 4]).
# lam_reg 1 is the default; 0.1 is a tenth (Tf-KD weighs its KL by 10/K = 1 against 0.9 CE at
# K = 10, so both lie within the range its authors used). `stage_fusion` is not in the grid:
# its step costs 1.78x attention's on the demo pair (docs/performance_log.md), over the 1.3x
# the study allowed.
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


def alternating(pairs: list) -> list:
    """Seed by seed, each seed's configurations in `RUN_ORDER`."""
    seeds = list(dict.fromkeys(seed for _, seed in pairs))
    rank = {run.name: i for i, run in enumerate(RUN_ORDER)}
    return sorted(pairs, key=lambda pair: (seeds.index(pair[1]), rank[pair[0].name]))


FINAL_SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = (0, 1, 2)
# Each term of the selected FFCL, switched off (skipped where the selection has it off already).
ABLATIONS = (
    ("fusion", "loss.lam_fuse", "0.0", "fused->peers KL"),
    ("ensemble", "loss.lam_ens", "0.0", "ensemble->fused KL"),
    ("mutual", "loss.lam_mutual", "0.0", "mutual KL"),
    ("feature", "loss.lam_feat", "0.0", "the feature term"),
    ("regularizer", "loss.regularizer", "none", "the regularizer"),
)


def merged(overrides: tuple[str, ...], *more: str) -> tuple[str, ...]:
    """Overrides with later ones replacing earlier ones of the same key."""
    pairs = dict(o.split("=", 1) for o in (*overrides, *more))
    return tuple(f"{k}={v}" for k, v in pairs.items())


def final_runs(selected: dict) -> tuple:
    """The final comparison's rows, from the selected configurations: (Run, seeds), None for
    the phase's seeds (`FINAL_SEEDS`; the PyTorch rows too: 3 in the protocol, 5 to pair
    FFCL's gain within PyTorch as in JAX)."""
    ffl, ffcl = tuple(selected["ffl"]["overrides"]), tuple(selected["ffcl"]["overrides"])
    rows = [
        (Run("independent", "jax", ("method=independent",), "T and S trained apart"), None),
        (
            Run("kd", "jax", ("method=kd",), "Hinton KD from independent's teacher", "independent"),
            None,
        ),
        (Run("dml", "jax", ("method=dml",), "Deep Mutual Learning"), None),
        (Run("ffl", "jax", ffl, f"FFL, selected: {selected['ffl']['run']}"), None),
        (Run("ffcl", "jax", ffcl, f"FFCL, selected: {selected['ffcl']['run']}"), None),
    ]
    for part, key, off, what in ABLATIONS:
        if f"{key}={off}" in ffcl:
            continue
        overrides = merged(ffcl, f"{key}={off}")
        run = Run(f"ffcl-{part}", "jax", overrides, f"selected FFCL without {what}", ablation=True)
        rows.append((run, ABLATION_SEEDS))
    rows.append((Run("independent", "pytorch", ("method=independent",), "PyTorch reference"), None))
    rows.append((Run("ffcl", "pytorch", ffcl, "PyTorch reference, selected FFCL"), None))
    return tuple(rows)


def final_order(pairs: list) -> list:
    """Seed by seed the JAX methods (whole seeds of the comparison first), then the
    ablations seed by seed, then the PyTorch rows."""
    methods = sorted(
        (p for p in pairs if not p[0].ablation and p[0].framework == "jax"), key=lambda p: p[1]
    )
    ablations = sorted((p for p in pairs if p[0].ablation), key=lambda p: p[1])
    pytorch = [p for p in pairs if p[0].framework == "pytorch"]
    return methods + ablations + sorted(pytorch, key=lambda p: (p[0].name != "independent", p[1]))


def get_plan() -> Plan:
    select = Phase(
        name="select",
        rows=tuple((run, None) for run in GRID),
        seeds=(0, 1),
        root="method_study",
        output=ARCHIVE + "fashion_mnist_selection",
        study_file=STUDY_FILE,
        block="selection",
        extra=("validation_size=5000",),
        run_order=alternating,
        record_fields=("configuration", "seed", "command", "wall_seconds", "machine", "results"),
        json_omit=("results",),
        json_keys=("validation_size", "grid", "selected", "runs"),
        sections=(
            Text(
                (
                    "Validation top-1 (%) at the last epoch, on the {validation_size} held-out "
                    "training",
                    "images, mean over the finished seeds (each seed's value in brackets); the "
                    "selected",
                    "configuration of each method in **bold**. `wall / run`: each run's own "
                    "training time",
                    "(other work sometimes shared the 2 cores) and the CPU's ISA where recorded.",
                    f"Regenerate with `{COMMAND}`.",
                )
            ),
            SelectionTable(MODELS),
            Commands(),
        ),
    )
    final = Phase(
        name="final",
        rows=final_runs,
        seeds=FINAL_SEEDS,
        root="method_study_final",
        output=ARCHIVE + "fashion_mnist_final",
        study_file=STUDY_FILE,
        block="final",
        run_order=final_order,
        record_fields=(
            "run",
            "method",
            "framework",
            "seed",
            "command",
            "wall_seconds",
            "machine",
            "summary",
            "history",
        ),
        record_order="row",
        json_keys=("selection", "runs"),
        sections=(
            Text(
                (
                    "Test top-1 (%) at the last epoch, mean ± std over seeds, full training "
                    "split. Paired",
                    "differences of the student in points with 95% t-intervals; **bold**: the "
                    "interval",
                    "excludes 0. `wall / run`: each run's own training time (other work "
                    "sometimes shared",
                    "the 2 cores) and the CPU's ISA. Regenerate with",
                    f"`{COMMAND}`.",
                )
            ),
            RowsTable(
                header=("row", "what", "framework", "seeds", *MODELS, "wall / run"),
                models=MODELS,
            ),
            DifferenceTable(
                (
                    *(Paired("ffcl", b) for b in ("independent", "kd", "dml", "ffl")),
                    Ablations("ffcl"),
                    # within each framework on the seeds both ran: the gains compare like for like
                    Paired(
                        "ffcl",
                        "independent",
                        "pytorch",
                        ("ffcl", "pytorch"),
                        "ffcl - independent, pytorch (paired by seed)",
                    ),
                    Paired(
                        "ffcl",
                        "independent",
                        "jax",
                        ("ffcl", "pytorch"),
                        "ffcl - independent, jax on pytorch's seeds (paired by seed)",
                    ),
                    Welch("independent"),  # different draws for a seed: not paired
                    Welch("ffcl"),
                )
            ),
            StudentCurves(),
            Commands(),
        ),
        summary_block="fashion-mnist-study",
        summary=SummaryTable("ffcl", ("independent", "kd", "dml", "ffl")),
    )
    return Plan(
        name="method_study_2026_11", config="configs/fashion_mnist.py", final=final, select=select
    )
