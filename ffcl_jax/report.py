"""Where a run reports (console, metrics.jsonl, TensorBoard), its result table and curves.

"Best" is the best accuracy over the evaluated epochs, per model, with its epoch. Evaluated on
the test split (a run without a validation split) it is an optimistic number, so the table always
prints the last epoch beside it; a run with a validation split evaluates its epochs there and the
test split once, after training, which the table prints in a column of its own.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import jax
import numpy as np

from ffcl_jax import machine, process_env, storage
from ffcl_jax.errors import UserError

# What an eval row (and its metrics.jsonl line) holds besides one accuracy per evaluated model.
EVAL_ROW_KEYS = ("kind", "epoch", "step", "split")


def models_in(row: dict) -> list[str]:
    """The models `row` (an eval row or a summary) holds an accuracy of, in its order (the
    method's `evaluated_names`)."""
    return [k for k in row if k not in EVAL_ROW_KEYS]


def in_order(accuracy: dict[str, float], names: list[str]) -> dict[str, float]:
    """`accuracy` with the models in `names`' order (the method's), any others after them."""
    order = dict.fromkeys([*names, *sorted(accuracy)])
    return {name: accuracy[name] for name in order if name in accuracy}


def summarize(history: list[dict]) -> dict[str, dict]:
    """{model: {last, best, best_epoch}} from the eval rows (`epoch` plus one accuracy a model)."""
    summary = {}
    if not history:
        return summary
    for model in models_in(history[-1]):
        best_row = max(history, key=lambda row: row[model])
        summary[model] = {
            "last": history[-1][model],
            "last_epoch": history[-1]["epoch"],
            "best": best_row[model],
            "best_epoch": best_row["epoch"],
        }
    return summary


def format_table(
    summary: dict[str, dict], split: str = "test", final_test: dict | None = None
) -> str:
    """Last and best epoch top-1 on `split`, and `final_test`'s top-1 (the test split evaluated
    after training) when given."""
    models = models_in(summary)
    name_width = max(len(m) for m in models)
    header = (
        f"| {'model':<{name_width}} | last epoch {split} top-1 | best epoch {split} top-1 (epoch) |"
    )
    rule = f"|{'-' * (name_width + 2)}|{'-' * (len(split) + 18)}|{'-' * (len(split) + 26)}|"
    if final_test is not None:
        header += " final test top-1 |"
        rule += "------------------|"
    lines = [header, rule]
    last_width, best_width = len(split) + 16, len(split) + 24
    for model in models:
        name = f"{model:<{name_width}}"
        if model not in summary:
            line = f"| {name} | {'n/a':>{last_width}} | {'n/a':>{best_width}} |"
        else:
            s = summary[model]
            best = f"{100 * s['best']:.2f}% ({s['best_epoch']})"
            line = f"| {name} | {100 * s['last']:>{last_width - 1}.2f}% | {best:>{best_width}} |"
        if final_test is not None:
            value = final_test.get(model)
            line += f" {'n/a' if value is None else f'{100 * value:.2f}%':>16} |"
        lines.append(line)
    return "\n".join(lines)


def read_jsonl(path) -> list[dict]:
    text = storage.path(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def loss_curves(train_rows: list[dict], loss_terms=()) -> dict[str, tuple[list, list]]:
    """`{label: (steps, values)}` of the loss panel: the total loss and every term in
    `loss_terms` (the terms the method's objective computes) that the logged rows hold,
    unweighted."""
    steps = [r["step"] for r in train_rows]
    curves = {"total loss": (steps, [r["loss"] for r in train_rows])}
    for term in loss_terms:
        if train_rows and term in train_rows[0]:
            curves[term] = (steps, [r[term] for r in train_rows])
    return curves


def plot_curves(metrics_path: str, png_path: str, title: str = "", loss_terms=()) -> None:
    """Top-1 per model against epoch (on the split the epochs were evaluated on; the final test
    evaluation of a run with a validation split as stars), and the training loss and each of
    `loss_terms` against step, on a log scale: the terms differ by orders of magnitude (a
    KL term under its ramp-up, a regularizer near its floor), and each stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_jsonl(metrics_path)
    evals = [r for r in rows if r.get("kind") == "eval"]
    final_tests = []
    if any(r.get("split") == "validation" for r in evals):
        final_tests = [r for r in evals if r.get("split") == "test"]
        evals = [r for r in evals if r.get("split") == "validation"]
    split = evals[0].get("split", "test") if evals else "test"
    trains = [r for r in rows if r.get("kind") == "train"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for model in models_in(evals[0]) if evals else []:
        ax_acc.plot(
            [r["epoch"] for r in evals],
            [100 * r[model] for r in evals],
            marker="o",
            label=model,
        )
        for row in final_tests:
            ax_acc.plot(
                [row["epoch"]],
                [100 * row[model]],
                marker="*",
                markersize=12,
                color=ax_acc.lines[-1].get_color(),
                linestyle="none",
            )
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"{split} top-1 (%)" + (" (stars: final test)" if final_tests else ""))
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    for label, (steps, values) in loss_curves(trains, loss_terms).items():
        width = 2.0 if label == "total loss" else 1.0
        ax_loss.plot(steps, values, label=label, linewidth=width, alpha=0.85)
    if trains:
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss and its terms (unweighted, log scale)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    with storage.path(png_path).open("wb") as f:  # local or gs://
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summarize_interval(
    pending: list[dict], first_step: int, workdir: str, last_checkpoint: str | None
) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log; stops the run at a non-finite loss,
    naming the first such step and its loss terms."""
    fetched = jax.device_get(pending)
    for offset, metrics in enumerate(fetched):
        if not np.isfinite(metrics["loss"]):
            terms = ", ".join(
                f"{k}={float(v):.4g}"
                for k, v in metrics.items()
                if k != "learning_rate" and not k.startswith("train_acc")
            )
            kept = (
                f"the last good checkpoint ({last_checkpoint}) is kept and a rerun resumes from it"
                if last_checkpoint
                else "no checkpoint had been written yet"
            )
            raise UserError(
                f"non-finite loss at step {first_step + offset} ({terms}); training stopped, "
                f"{kept}, logs are in {workdir}; lower config.learning_rate or use "
                "compute_dtype=float32"
            )
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


class _NoWriter:
    def write_scalars(self, step, scalars) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """Where a run reports: the console, `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(
        self,
        workdir,
        enabled: bool,
        num_epochs: int,
        total_steps: int,
        tensorboard_dir: str | None = None,
    ):
        """`tensorboard_dir`: where the events go (default `workdir/tensorboard`)."""
        self.enabled = enabled
        self.num_epochs, self.total_steps = num_epochs, total_steps
        self.jsonl_path = storage.path(workdir) / "metrics.jsonl"
        # Cloud Storage cannot append: the rows so far are kept to rewrite the file whole.
        self._jsonl_text = ""
        if enabled and storage.is_remote(self.jsonl_path) and self.jsonl_path.exists():
            self._jsonl_text = self.jsonl_path.read_text()
        self.writer = None
        if enabled:
            try:
                from clu import metric_writers

                # TensorFlow's file system layer writes the events (gs:// included).
                events = os.fspath(tensorboard_dir or storage.path(workdir) / "tensorboard")
                self.writer = metric_writers.SummaryWriter(events)
            except ImportError:  # clu's TensorBoard writer needs tensorflow (e.g. GPU images)
                self.print(
                    "note: no TensorBoard events (tensorflow is not installed); "
                    "metrics.jsonl has every scalar"
                )
                self.writer = _NoWriter()

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def _jsonl(self, **row) -> None:
        line = json.dumps(row) + "\n"
        self._jsonl_text += line
        storage.append_text(self.jsonl_path, line, whole=self._jsonl_text)

    def train(
        self,
        step: int,
        epoch: int,
        summary: dict,
        img_per_sec: float | None,
        eta_seconds: float | None,
    ) -> None:
        """`img_per_sec` / `eta_seconds` are None when the interval timed no step (a log right
        after the compiling first step, e.g. when preempted at step 1)."""
        if not self.enabled:
            return
        accuracies = " ".join(
            f"{key[len('train_acc_')].upper()} {value:.3f}"
            for key, value in summary.items()
            if key.startswith("train_acc_")
        )
        self.print(
            f"epoch {epoch}/{self.num_epochs} step {step}/{self.total_steps} | "
            f"loss {summary['loss']:.4f} | "
            f"train acc {accuracies} | "
            + (
                f"{img_per_sec:.0f} img/s | ETA {format_duration(eta_seconds)}"
                if img_per_sec
                else "speed not measured yet"
            )
        )
        self._jsonl(kind="train", step=step, epoch=epoch, img_per_sec=img_per_sec, **summary)
        scalars = {f"train/{k}": v for k, v in summary.items()}
        if img_per_sec:
            scalars["train/img_per_sec"] = img_per_sec
        self.writer.write_scalars(step, scalars)

    def eval(self, row: dict, seconds: float) -> None:
        if not self.enabled:
            return
        accuracy = {k: row[k] for k in models_in(row)}
        split = row["split"]
        self.print(
            f"epoch {row['epoch']} {split} top-1: "
            + " ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items())
            + f" ({seconds:.1f}s)"
        )
        self._jsonl(kind="eval", **row)
        self.writer.write_scalars(row["step"], {f"{split}/acc_{k}": v for k, v in accuracy.items()})
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def parameter_counts(params) -> dict[str, int]:
    """Parameters per member of the cohort."""
    return {member: int(sum(x.size for x in jax.tree.leaves(params[member]))) for member in params}


def banner(
    config, setup, params, num_train: int, splits: dict, steps_per_epoch: int, num_devices: int
) -> str:
    """The run's first line: method, networks, data, batch, devices and the loss terms."""
    networks = setup.method.describe(config, parameter_counts(params))
    evaluated = " / ".join(f"{len(images)} {name}" for name, (images, _) in sorted(splits.items()))
    return (
        f"FFCL | method {config.method} | {networks} | {config.dataset} {num_train} train / "
        f"{evaluated} | batch {config.batch_size}, {config.compute_dtype} compute | "
        f"{config.num_epochs} epochs x {steps_per_epoch} steps | {num_devices} "
        f"{setup.platform} device(s){cpu_kind(setup)} in {jax.process_count()} process(es), "
        f"batch norm {config.batch_norm} | terms: {', '.join(setup.loss_terms)}"
    )


def cpu_kind(setup) -> str:
    """ " (AVX-512, oneDNN kernels)" on a CPU: what a CPU run's speed depends on; else ""."""
    if setup.platform != "cpu":
        return ""
    kernels = "oneDNN" if setup.onednn_kernels else "XLA"
    return f" ({machine.machine()['isa']}, {kernels} kernels)"


def weights_sha256(cohort) -> str:
    """A digest of a cohort's parameters and BatchNorm statistics (float64 bytes, by key path):
    a JAX run and a PyTorch reference run started from its weights (`reference_from_jax`)
    record the same one, which shows that they were paired."""
    import hashlib

    from flax import nnx

    digest = hashlib.sha256()
    for kind in (nnx.Param, nnx.BatchStat):
        leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(cohort, kind)))
        for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
            digest.update(jax.tree_util.keystr(path).encode())
            digest.update(np.ascontiguousarray(np.asarray(leaf, np.float64)).tobytes())
    return digest.hexdigest()


def batch_sha256(images, labels) -> str:
    """A digest of a training batch: uint8 NHWC images (views before H, W, C) and labels. The
    JAX trainer and a PyTorch reference run on its batches (`reference_from_jax`) record the
    same one for their first batch."""
    import hashlib

    images = np.ascontiguousarray(np.asarray(images, np.uint8))
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(images.tobytes())
    digest.update(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
    return digest.hexdigest()


def settings_line(method) -> str:
    """The run's second line: every setting of the method as it resolved (defaults included)."""
    values = ", ".join(f"{k}={v}" for k, v in method.settings_dict().items())
    return f"{method.name} settings (--config.loss.<name>=...): {values}"


class StepClock:
    """Training time between log steps, for the progress line's speed and ETA; the first step of
    a session (it compiles) is timed apart. Totals accumulate in the checkpointed `progress`."""

    def __init__(self, progress: dict, batch_size: int, total_steps: int):
        self.progress, self.batch_size, self.total_steps = progress, batch_size, total_steps
        self.since = time.time()  # wall time not yet added to progress
        self.first_step_done = False
        self.interval_start, self.interval_steps, self.interval_first = time.time(), 0, 1

    def add_wall_time(self) -> None:
        now = time.time()
        self.progress["wall_seconds"] += now - self.since
        self.since = now

    def start_interval(self, step: int) -> None:
        self.interval_start, self.interval_steps, self.interval_first = time.time(), 0, step + 1

    def count_step(self, metrics, log: RunLog) -> None:
        self.interval_steps += 1
        if self.first_step_done:
            return
        jax.block_until_ready(metrics)
        self.first_step_done = True
        seconds = time.time() - self.interval_start
        if self.progress["first_step_seconds"] is None:
            self.progress["first_step_seconds"] = seconds
        log.print(f"compiled and ran the first step in {seconds:.1f}s")
        self.interval_start, self.interval_steps = time.time(), 0

    def end_interval(self, step: int) -> tuple[float | None, float | None]:
        """`(img/s, ETA seconds)` of the interval ending at `step` (None without a timed step)."""
        elapsed = time.time() - self.interval_start
        img_per_sec = eta = None
        if self.interval_steps:
            self.progress["train_seconds"] += elapsed
            self.progress["measured_steps"] += self.interval_steps
            img_per_sec = self.interval_steps * self.batch_size / max(elapsed, 1e-9)
            eta = (self.total_steps - step) * self.batch_size / img_per_sec
        self.start_interval(step)
        return img_per_sec, eta


def update_best(progress: dict, row: dict | None, metric: str) -> bool:
    """Records `row` as the best evaluation so far if its `metric` beats the best; says so."""
    if row is None or not metric:
        return False
    best = progress["best"]
    if best is not None and row[metric] <= best["value"]:
        return False
    progress["best"] = {
        "metric": metric,
        "value": row[metric],
        "epoch": row["epoch"],
        "step": row["step"],
    }
    return True


def train_flops(setup, state, batch_size: int) -> float | None:
    """One train step's floating-point operations as XLA's cost analysis counts them (the step
    lowered, not compiled, for a batch of `batch_size`): what a run's accuracy cost, beside its
    wall time, comparable across methods and machines. None where XLA cannot count it."""
    views = (setup.method.num_views,) if setup.method.num_views > 1 else ()
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *views, *setup.info.image_shape), np.uint8),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32),
    }
    step = setup.counted_train_step or setup.train_step
    try:
        cost = jax.jit(step).lower(state, batch).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - a figure for the record: never lose a finished run to it
        return None


def results(config, setup, params, progress: dict, eval_split: str) -> dict[str, Any]:
    """`results.json`'s content (less what only the trainer knows: final test, command)."""
    measured = progress["measured_steps"]
    speed = measured * config.batch_size / max(progress["train_seconds"], 1e-9)
    return {
        "config": json.loads(config.to_json_best_effort()),
        "method_settings": setup.method.settings_dict(),
        "networks": setup.method.networks(config),
        "num_params": parameter_counts(params),
        "loss_terms": list(setup.loss_terms),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # cpu.malloc: the CLI
        "malloc": process_env.malloc_in_effect(os.environ.get("GLIBC_TUNABLES", "")),
        "wall_seconds": progress["wall_seconds"],
        # The process's resident high-water mark (Linux reports KiB): what cpu.malloc trades.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "first_step_seconds": progress["first_step_seconds"],
        "train_img_per_sec": speed if measured else None,
        "eval_split": eval_split,
        "history": progress["history"],
        "summary": summarize(progress["history"]),
        "best_checkpoint": progress["best"],
        "resumed_at_steps": progress["resumed_at_steps"],
    }


def write_outputs(workdir, config, results: dict, log: RunLog) -> None:
    """`results.json` and `curves.png`, then the result table and the wall time on the console."""
    workdir = storage.path(workdir)
    storage.write_text(workdir / "results.json", json.dumps(results, indent=2))
    plot_curves(
        workdir / "metrics.jsonl",
        workdir / "curves.png",
        title=f"{config.method}: {' + '.join(results['networks'].values())} on {config.dataset}",
        loss_terms=results["loss_terms"],
    )
    log.print(format_table(results["summary"], results["eval_split"], results["final_test"]))
    speed = results["train_img_per_sec"]
    log.print(
        f"wall time {format_duration(results['wall_seconds'])}"
        + (f"; train step {speed:.0f} img/s" if speed else "")
        + f"; outputs in {workdir} (results.json, metrics.jsonl, curves.png, tensorboard/, "
        "checkpoints/)"
    )
