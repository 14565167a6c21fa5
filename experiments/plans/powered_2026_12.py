"""The powered comparison (registered 2026-12-03, runs to 12-06): FFCL against every online
baseline on 30 fresh seeds, and JAX against PyTorch from the same start (protocol:
experiments/results/fashion_mnist_powered.md).

    nice -n 19 python experiments/study.py --plan=experiments/plans/powered_2026_12.py
    python experiments/study.py --plan=experiments/plans/powered_2026_12.py --report_only

No selection: FFCL and FFL as the first study selected them, the other methods at their
published defaults scaled to the 3-epoch schedule. `kd` trains from the frozen teacher of the
same seed's `independent` run; the PyTorch rows start from the JAX trainer's weights and
batches (`reference_from_jax=True`). The primary comparisons (FFCL's student minus each of the
nine, paired by seed, t-test, Holm over the nine) are tested once, on every seed; before, the
report is a progress report. Once every run is in, it adds the sensitivity analyses (added
after the runs, issue 62; `sensitivity` in the JSON): Wilcoxon's signed-rank test with Holm,
leave-one-seed-out, two outlier rules with the resumed runs named, DML against the branch
methods, each method's parameters and its logged ramp-up weights.
"""

from __future__ import annotations

from study_report import CodeLine, Commands, Comparisons, Progress, RowsTable
from study_runs import Phase, Plan, Run
from study_sensitivity import OneMachine, Secondary, Sensitivity

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
    Run(
        name,
        "jax",
        (f"method={name}", *overrides),
        description,
        needs="independent" if name == "kd" else None,
    )
    for name, overrides, description in _PAIR_METHODS + _ONLINE_METHODS
)
PYTORCH_RUNS = tuple(
    Run(
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
BRANCH_METHODS = ("one", "cl_ilr", "okddip", "pcl")  # one branched ResNet-8, no ResNet-20

COMPARISONS = Comparisons(reference="ffcl")
SENSITIVITY = Sensitivity(
    COMPARISONS,
    text="Sensitivity analyses (added 2026-12-07 after the runs, issue 62; not registered: they "
    "say how much the registered readings rest on the t-test, on single seeds and on "
    "outliers). Each reads the nine comparisons by the registered rule (Holm over the nine, "
    "p < 0.05, the mean difference's sign).",
    outlier_z=3.0,  # an outlier: a paired difference over 3 sds (all seeds') from the mean
    secondary=Secondary(
        reference="dml",
        against=BRANCH_METHODS,
        key="dml_minus_branch_methods",
        text="Secondary, added after the runs (not registered): DML's student (two networks, "
        "its peer a ResNet-20, untuned) minus each branch method's (one branched ResNet-8), "
        "Holm over the four:",
        label="DML's student minus",
        ahead_label="seeds DML ahead",
    ),
    parameters_text="Parameters of each method's networks (`num_params`; `kd`'s teacher is the "
    "frozen one it distils; a branch method's student is its trunk with branch 0, `peers` its "
    "other branches):",
    rampup_text="Ramp-up weight each method's loss logged (`rampup_weight` in `metrics.jsonl`, "
    "the distinct values over its runs, per epoch; `independent` has no term it scales, `kd` "
    "logs none):",
)


def get_plan() -> Plan:
    final = Phase(
        name="final",
        rows=tuple((run, None) for run in RUNS),
        seeds=SEEDS,
        root="powered_study",
        output="experiments/results/fashion_mnist_powered",
        study_file="experiments/results/fashion_mnist_powered.md",
        block="powered",
        record_fields=(
            "run",
            "method",
            "framework",
            "seed",
            "command",
            "commit",
            "machines",
            "resumed_at_steps",
            "num_params",
            "wall_seconds",
            "summary",
        ),
        json_fixed=(("protocol", "experiments/results/fashion_mnist_powered.md"),),
        json_keys=("protocol", "runs", "complete", "comparisons", "one_machine", "sensitivity"),
        sections=(
            Progress(),
            RowsTable(
                header=("method", "framework", "runs", *MODELS, "wall time, median"),
                models=MODELS,
                cells=("code_name", "framework", "runs"),
                missing="-",
                pending="-",
                wall_average="median",  # a run that shared the machine would pull a mean up
            ),
            COMPARISONS,
            SENSITIVITY,
            OneMachine(COMPARISONS),
            CodeLine(),
            Commands(header="Commands of the finished runs:", grouped=True, always=False),
        ),
    )
    return Plan(name="powered_2026_12", config="configs/fashion_mnist.py", final=final)
