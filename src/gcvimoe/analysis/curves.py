"""Training curves: the losses, the MoE aux loss, accuracy and the learning rate, per step where the steps were seen
and per epoch from the summary.csv rows."""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gcvimoe.files import atomic_path


def plot_training_curves(
        history: Sequence[Dict[str, float]],
        path,
        steps: Optional[Dict[str, Sequence[float]]] = None,
        train_loss_label: str = "train loss",
) -> Path:
    """Save a four-panel PNG: loss (train and eval), MoE aux loss, accuracy, learning rate.

    The x axis is in epochs: epoch ``n`` spans ``(n-1, n]``; its evaluation sits at ``n``, its training means at
    ``n - 0.5``, a step at its fraction of the epoch.

    Args:
        history: One dict per epoch with the summary.csv columns.
        path: Where the PNG goes.
        steps: Per-step records as columns ``epoch`` (fractional), ``loss``, ``aux_loss``, ``lr``; they may cover only
            the latest epochs (a resumed run), the epoch rows draw the rest.
        train_loss_label: What the training loss is (label-smoothed, soft-target), so that it is not read as the
            evaluation's plain cross-entropy.
    """
    steps = steps if steps and steps.get("epoch") else None
    fig = Figure(figsize=(12, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_aux), (ax_acc, ax_lr) = fig.subplots(2, 2, sharex=True)
    _plot_losses(ax_loss, ax_aux, history, steps, train_loss_label)
    _plot_accuracy(ax_acc, history)
    _plot_learning_rate(ax_lr, history, steps)
    ax_loss.set_xlim(0, max(row["epoch"] for row in history))
    for ax in (ax_loss, ax_aux, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    return path


def _column(history: Sequence[Dict[str, float]], name: str) -> List[float]:
    return [row[name] for row in history]


def _plot_losses(ax_loss, ax_aux, history, steps, train_loss_label: str) -> None:
    epochs = _column(history, "epoch")
    middles = [epoch - 0.5 for epoch in epochs]  # a training mean covers its whole epoch; the evaluation ends it
    if steps:
        ax_loss.plot(steps["epoch"], steps["loss"], color="tab:blue", alpha=0.25, linewidth=0.8)
        ax_aux.plot(steps["epoch"], steps["aux_loss"], color="tab:green", alpha=0.25, linewidth=0.8)
    ax_loss.plot(middles, _column(history, "train_loss"), color="tab:blue", marker=".", label=train_loss_label)
    ax_loss.plot(epochs, _column(history, "eval_loss"), color="tab:orange", marker=".", label="eval loss (CE)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss: epoch means" + (", steps faint" if steps else ""), fontsize="medium")
    ax_loss.legend(fontsize="small")
    ax_aux.plot(middles, _column(history, "train_aux_loss"), color="tab:green", marker=".")
    ax_aux.set_ylabel("weighted aux loss")
    ax_aux.set_title("MoE aux loss (train): epoch means" + (", steps faint" if steps else ""), fontsize="medium")


def _plot_accuracy(ax, history) -> None:
    epochs = _column(history, "epoch")
    top1 = _column(history, "eval_top1")
    ax.plot(epochs, top1, marker=".", label="top-1")
    ax.plot(epochs, _column(history, "eval_top5"), marker=".", label="top-5")
    if all("ema_eval_top1" in row for row in history):
        ax.plot(epochs, _column(history, "ema_eval_top1"), marker=".", linestyle=":", label="EMA top-1")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"eval accuracy (best top-1 {max(top1):.2f} %)", fontsize="medium")
    ax.legend(fontsize="small")


def _plot_learning_rate(ax, history, steps) -> None:
    seen = {math.ceil(epoch) for epoch in steps["epoch"]} if steps else set()  # a step of epoch n lies in (n-1, n]
    if steps:
        ax.plot(steps["epoch"], steps["lr"], color="tab:purple", label="per step")
    earlier = [row for row in history if row["epoch"] not in seen]
    if earlier:  # epochs trained before a resume: only their end-of-epoch value is known
        ax.plot(_column(earlier, "epoch"), _column(earlier, "lr"), color="tab:purple", marker="o", linestyle="none",
                markersize=3, label="end of epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate", fontsize="medium")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if steps and earlier:
        ax.legend(fontsize="small")
