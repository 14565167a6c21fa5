"""Result table and learning curves of a run.

"Best" is the best accuracy over the evaluated epochs, per model, with its epoch. Evaluated on
the test split (a run without a validation split) it is an optimistic number, so the table always
prints the last epoch beside it; a run with a validation split evaluates its epochs there and the
test split once, after training, which the table prints in a column of its own.
"""

from __future__ import annotations

import json

MODEL_ORDER = ("student", "teacher", "fused", "ensemble")


def summarize(history: list[dict]) -> dict[str, dict]:
    """{model: {last, best, best_epoch}} from the eval rows (`epoch` plus one accuracy a model)."""
    summary = {}
    if not history:
        return summary
    for model in MODEL_ORDER:
        if model not in history[-1]:
            continue
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
    header = f"| model    | last epoch {split} top-1 | best epoch {split} top-1 (epoch) |"
    rule = f"|----------|{'-' * (len(split) + 18)}|{'-' * (len(split) + 26)}|"
    if final_test is not None:
        header += " final test top-1 |"
        rule += "------------------|"
    lines = [header, rule]
    last_width, best_width = len(split) + 16, len(split) + 24
    for model in MODEL_ORDER:
        if model not in summary:
            line = f"| {model:<8} | {'n/a':>{last_width}} | {'n/a':>{best_width}} |"
        else:
            s = summary[model]
            best = f"{100 * s['best']:.2f}% ({s['best_epoch']})"
            line = (
                f"| {model:<8} | {100 * s['last']:>{last_width - 1}.2f}% | {best:>{best_width}} |"
            )
        if final_test is not None:
            value = final_test.get(model)
            line += f" {'n/a' if value is None else f'{100 * value:.2f}%':>16} |"
        lines.append(line)
    return "\n".join(lines)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, png_path: str, title: str = "") -> None:
    """Top-1 per model against epoch (on the split the epochs were evaluated on; the final test
    evaluation of a run with a validation split as stars), and the training loss against step."""
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
    for model in MODEL_ORDER:
        if evals and model in evals[0]:
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
    if trains:
        ax_loss.plot([r["step"] for r in trains], [r["loss"] for r in trains], label="total loss")
        for term in ("ce_teacher", "ce_student", "ce_fused"):
            if term in trains[0]:
                ax_loss.plot(
                    [r["step"] for r in trains], [r[term] for r in trains], label=term, alpha=0.7
                )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
