"""Result table and learning curves of a run.

"Best" is the best test accuracy over the evaluated epochs, per model, with its epoch. It reads
the test set, so it is an optimistic number; the table always prints the last epoch beside it
(FFCL_METHOD.md section 6).
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


def format_table(summary: dict[str, dict]) -> str:
    lines = [
        "| model    | last epoch top-1 | best epoch top-1 (epoch) |",
        "|----------|------------------|--------------------------|",
    ]
    for model in MODEL_ORDER:
        if model not in summary:
            lines.append(f"| {model:<8} | {'n/a':>16} | {'n/a':>24} |")
            continue
        s = summary[model]
        best = f"{100 * s['best']:.2f}% ({s['best_epoch']})"
        lines.append(f"| {model:<8} | {100 * s['last']:>15.2f}% | {best:>24} |")
    return "\n".join(lines)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, png_path: str, title: str = "") -> None:
    """Test top-1 per model against epoch, and the training loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_jsonl(metrics_path)
    evals = [r for r in rows if r.get("kind") == "eval"]
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
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
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
