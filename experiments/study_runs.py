"""Running a study's runs: each one subprocess (`python -m ffcl_jax.main ...` or the PyTorch
reference) in its own workdir under `--root` (local or gs://), resumable, with what a study
commits (`<output>_runs/<run>/`: results, metrics log, start record). The study driver,
`study.py`, runs every plan's runs through it.

A run whose workdir (or committed copy) holds `results.json` is finished and skipped; an
interrupted JAX run resumes from its checkpoint when started again (a PyTorch reference run
starts over). SIGTERM (or Ctrl-C) stops the current run the way a preemption does (it saves a
checkpoint), and the driver still writes its report of what finished.

A study's plan: what `study.py` runs and reports, one small module per study under
`experiments/plans/` whose `get_plan()` returns a `Plan`.

A plan has a final phase and, where the study selects settings first, a selection phase. Each
phase names its rows (a `study_runs.Run` with its seeds, or the phase's seeds), where their
workdirs, results and report go, and the report's sections (`study_report`,
`study_sensitivity`): tables of mean ± std, paired differences, the primary comparisons with
Holm, sensitivity analyses, the commands. Everything a study has that another lacks is a field
of its plan or a section it lists, not code in the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import bench_results  # experiments/, beside this script

from ffcl_jax import storage  # --root may be local or gs://
from ffcl_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of a study: a method (with its overrides) in one framework."""

    name: str
    framework: str  # "jax" or "pytorch"
    overrides: tuple[str, ...]
    description: str
    needs: str | None = None  # kd: the preset whose teacher (same seed) it distils
    ablation: bool = False  # ablations run after every seed of the method comparison


def run_id(run: Run, seed: int) -> str:
    return f"{run.framework}_{run.name}_seed{seed}"


def command(run: Run, seed: int, args) -> list[str]:
    module = "ffcl_jax.main" if run.framework == "jax" else "ffcl_jax.torch_reference.train"
    argv = [
        sys.executable,
        "-m",
        module,
        f"--config={args.config}",
        f"--workdir={run_workdir(run, seed, args)}",
        f"--config.seed={seed}",
    ]
    argv += [f"--config.{o}" for o in run.overrides]
    if run.needs:
        argv.append(f"--config.teacher_checkpoint={teacher_workdir(run, seed, args)}")
    return argv + [f"--config.{o}" for o in args.extra]


def teacher_run(run: Run) -> Run:
    """kd: the run whose teacher it distils, the preset `run.needs` at its defaults."""
    return Run(run.needs, run.framework, (f"method={run.needs}",), f"the {run.needs} preset")


def run_workdir(run: Run, seed: int, args):
    """The run's workdir under `--root` (an `epath.Path`: local or gs://)."""
    return storage.path(args.root) / run_id(run, seed)


def teacher_workdir(run: Run, seed: int, args) -> str:
    """kd: the workdir of the run (same seed) whose teacher it distils: that run's own under
    `--root` or, where its checkpoints are not on this machine (a new machine has only the
    committed summary), the copy `ensure_teacher` trains under `<root>_teachers`."""
    teacher = teacher_run(run)
    own = run_workdir(teacher, seed, args)
    if (own / "checkpoints").is_dir():
        return os.fspath(own)
    return os.fspath(run_workdir(teacher, seed, teacher_copy_args(args)))


def teacher_copy_args(args):
    return argparse.Namespace(**{**vars(args), "root": f"{args.root}_teachers"})


def ensure_teacher(run: Run, seed: int, args, child: dict) -> None:
    """kd: trains its teacher run again, same command and seed, under `<root>_teachers` when
    neither that run's workdir nor an earlier copy has a finished checkpoint; the committed
    summary of the teacher run is left as it was (the kd run's command names the copy)."""
    if not run.needs or (storage.path(teacher_workdir(run, seed, args)) / "results.json").exists():
        return
    teacher = teacher_run(run)
    copy_args = teacher_copy_args(args)
    print(
        f"== {run_id(run, seed)} needs the teacher of {run_id(teacher, seed)}, whose checkpoints "
        f"are not on this machine: training that run again under {copy_args.root}",
        flush=True,
    )
    execute(teacher, seed, copy_args, child)


def shown_command(run: Run, seed: int, args) -> str:
    """The command as a user types it in the repository root (paths under it made relative)."""
    words = ["python", *command(run, seed, args)[1:]]
    return " ".join(w.replace(ROOT + os.sep, "") for w in words)


def read_run_file(run: Run, seed: int, args, name: str) -> dict | None:
    """A JSON file of the run: from its workdir, or else from the committed copy (fresh clone)."""
    for folder in (args.root, f"{args.output}_runs"):
        path = storage.path(folder) / run_id(run, seed) / name
        if path.exists():
            return json.loads(path.read_text())
    return None


def machine_line() -> str:
    """The machine a run's wall time belongs to (this project's CPUs differ 2x by ISA)."""
    m = bench_results.machine()
    return f"{m['cores']}-core {m['cpu']} ({m['isa']})"


def wall_cell(walls: list[float], machines: list[str | None], average=statistics.fmean) -> str:
    """The average (mean by default) wall time per run and, where the runs recorded it, the
    ISA(s) they ran on."""
    if not walls:
        return "pending"
    isas = sorted({m.rsplit("(", 1)[-1].rstrip(")") for m in machines if m})
    return f"{average(walls) / 60:.1f} min" + (f" ({', '.join(isas)})" if isas else "")


def started_at(run: Run, seed: int, args) -> dict:
    """What the driver wrote when it (last) started the run: command, commit, time."""
    return read_run_file(run, seed, args, "table_run.json") or {}


def ran_command(run: Run, seed: int, args) -> str:
    """The command the run was started with, as recorded: recomputing it would name what this
    machine has now (a kd teacher's copy under `<root>_teachers`), not what the run used."""
    return started_at(run, seed, args).get("command") or shown_command(run, seed, args)


def finished(run: Run, seed: int, args) -> dict | None:
    """The run's results, if it finished."""
    return read_run_file(run, seed, args, "results.json")


class Stop(Exception):
    """SIGTERM or Ctrl-C reached the driver."""


def _own_outputs(args) -> tuple[str, ...]:
    """The repository paths (relative to ROOT) a driver writes itself: `<output>*` and the
    study file. A run's commit does not count them as uncommitted changes: the driver writes
    them while the study runs."""
    paths = [getattr(args, "output", None), getattr(args, "study_file", None)]
    return tuple(os.path.relpath(p, ROOT) for p in paths if p)


def _git(*words: str) -> str:
    return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout


def uncommitted(args=None) -> list[str]:
    """The paths `git status --porcelain` lists (tracked changes and untracked files) outside
    the driver's own outputs: code a run may use that HEAD does not hold."""
    own = _own_outputs(args) if args is not None else ()
    changed = [
        line[3:].split(" -> ")[-1].strip('"')
        for line in _git("status", "--porcelain", "--untracked-files=all").splitlines()
        if line.strip()
    ]
    return [path for path in changed if not path.startswith(own)]


def recorded_commit(args=None) -> str:
    """The code a run starts from: `git rev-parse --short HEAD`, plus "-dirty" where the tree
    has `uncommitted` paths (HEAD alone cannot see them)."""
    commit = _git("rev-parse", "--short", "HEAD").strip()
    return commit + "-dirty" if uncommitted(args) else commit


def start_record(run: Run, seed: int, args, workdir) -> dict:
    """What `table_run.json` records when the driver starts the run: its command, and for each
    start (`segments`, oldest first: a JAX run started again in its workdir resumes from its
    checkpoint) the time, commit (with a dirty tree's paths) and machine. The top-level
    `started`, `commit` and `machine` are the first segment's. A record written before segments
    existed (it kept only the latest start) becomes the first segment."""
    segment = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": recorded_commit(args),
        "machine": machine_line(),
    }
    if segment["commit"].endswith("-dirty"):  # which paths, so a reader can judge (first 20)
        segment["uncommitted"] = uncommitted(args)[:20]
    path = workdir / "table_run.json"
    if run.framework == "jax" and path.exists():
        earlier = json.loads(path.read_text())
        segments = earlier.get("segments") or [
            {key: earlier.get(key) for key in ("started", "commit", "machine")}
        ]
        return {**earlier, "segments": [*segments, segment]}
    return {"command": shown_command(run, seed, args), **segment, "segments": [segment]}


def segments_of(record: dict) -> list[dict]:
    """Every start of a run its `table_run.json` records (one where it predates segments)."""
    return record.get("segments") or [record]


def execute(run: Run, seed: int, args, child: dict) -> None:
    argv = command(run, seed, args)
    workdir = run_workdir(run, seed, args)
    if run.framework == "pytorch" and workdir.exists():
        workdir.rmtree()  # the reference has no checkpoints: an unfinished run restarts
    storage.prepare_workdir(workdir)
    record = start_record(run, seed, args, workdir)
    storage.write_text(workdir / "table_run.json", json.dumps(record))
    print(f"== {run_id(run, seed)}: {shown_command(run, seed, args)}", flush=True)
    started = time.time()
    child["process"] = subprocess.Popen(argv, cwd=ROOT)
    code = child["process"].wait()
    child["process"] = None
    if code in (143, -signal.SIGTERM, -signal.SIGINT, 130):
        raise Stop()
    if code != 0:
        raise SystemExit(f"{run_id(run, seed)} failed with exit code {code}; see its output above")
    print(f"== {run_id(run, seed)} done in {time.time() - started:.0f} s", flush=True)


def keep_copy(run: Run, seed: int, args) -> None:
    """Copies a finished run's results, metrics log and start record from its workdir to
    `<output>_runs/<run>/`, the copy that is committed (a workdir may not outlive the machine)."""
    rid = run_id(run, seed)
    copy_dir = f"{args.output}_runs/{rid}"
    os.makedirs(copy_dir, exist_ok=True)
    for name in ("results.json", "metrics.jsonl", "table_run.json"):
        src = storage.path(args.root) / rid / name
        if src.exists():  # absent when the committed copy is all there is
            (storage.path(copy_dir) / name).write_bytes(src.read_bytes())


@contextlib.contextmanager
def stopping_on_signals(child: dict):
    """While running runs: SIGTERM or Ctrl-C stops the current run the way a preemption does
    (it checkpoints and exits with 143; rerunning resumes it) and ends the loop quietly, so the
    report of what finished is still written."""

    def on_signal(signum, frame):
        if child["process"] is not None:
            child["process"].send_signal(signal.SIGTERM)
        else:
            raise Stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Stop:
        print("== stopped; the interrupted JAX run resumes when the driver is run again")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_missing(plan, args, child: dict, after_each=None) -> None:
    """Runs every (run, seed) of `plan` that has not finished, in order (a kd run's teacher
    first), calling `after_each()` after each: where a driver writes its report at once."""
    for run, seed in plan:
        if finished(run, seed, args):
            continue
        ensure_teacher(run, seed, args, child)
        execute(run, seed, args, child)
        if after_each is not None:
            after_each()


def runs_of(records: list[dict], method: str, framework: str) -> list[dict]:
    """The finished runs of one row (all its seeds)."""
    return [r for r in records if r["method"] == method and r["framework"] == framework]


def plot_students(records: list[dict], path: str, runs: tuple[Run, ...]) -> None:
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


# A study's plan (plans/*.py): what study.py runs and reports.


Rows = tuple  # ((Run, seeds or None), ...): None takes the phase's seeds


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a study: its runs and the report written from them."""

    name: str  # "select" or "final", what --phase picks
    # ((Run, seeds or None), ...), or for a final phase after a selection, a function of the
    # selection ({"seeds": [...], method: {"run", "overrides", ...}}) that returns them
    rows: Rows | Callable[[dict], Rows]
    seeds: tuple[int, ...]  # a row's seeds where it names none; --seeds replaces them
    root: str  # the runs' workdirs: under --workdirs (or absolute; local or gs://)
    output: str  # under --repo (or absolute): <output>.json and the committed <output>_runs/
    study_file: str  # under --repo (or absolute): the Markdown file with the report's block
    block: str  # the report goes between `<!-- block:start -->` and `<!-- block:end -->`
    sections: tuple = ()  # the report's sections, in order (each `lines(ctx)`, blank-separated)
    # the fields of each run's record, in the JSON's order: `study.RECORD_FIELDS`, or
    # "results.KEY" for any key of the run's results.json
    record_fields: tuple[str, ...] = ("run", "method", "framework", "seed", "command")
    record_order: str = "seed"  # "seed": every row of a seed first; "row": every seed of a row
    json_omit: tuple[str, ...] = ()  # record fields the report reads but the JSON leaves out
    json_fixed: tuple[tuple[str, object], ...] = ()  # constant entries of the JSON
    json_keys: tuple[str, ...] = ("runs",)  # the JSON's top-level keys, in order (if present)
    extra: tuple[str, ...] = ()  # config overrides of every run of the phase (--extra adds)
    # (run, seed) pairs -> the order they run in; None: seed by seed, each seed's rows in order
    run_order: Callable[[list], list] | None = None
    summary_block: str | None = None  # with --summary_file: that file's block gets...
    summary: object | None = None  # ...this section's lines


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    config: str  # the runs' --config
    final: Phase
    select: Phase | None = None  # the selection phase, if the study selects settings first

    def phases(self) -> tuple[Phase, ...]:
        return tuple(p for p in (self.select, self.final) if p is not None)


def load(path: str) -> Plan:
    """The plan that the module at `path` returns from `get_plan()`."""
    if not os.path.isfile(path):
        raise UserError(f"no plan file {path}: name one of experiments/plans/*.py")
    name = "study_plan_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_plan"):
        raise UserError(f"{path} has no get_plan(): a plan module returns its Plan from it")
    plan = module.get_plan()
    if not isinstance(plan, Plan):
        raise UserError(f"{path}: get_plan() must return a study_runs.Plan, not {type(plan)}")
    return plan
