"""Training curves from the summary.csv rows: losses, accuracy and learning rate per epoch."""
from pathlib import Path
from typing import Dict, List, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gcvimoe.files import atomic_path


def plot_training_curves(history: Sequence[Dict[str, float]], path) -> Path:
    """Save a three-panel PNG: loss (train CE, eval, MoE aux), top-1/top-5 accuracy, learning rate.

    Args:
        history: One dict per epoch with the summary.csv columns.
        path: Where the PNG goes.
    """
    epochs = [row["epoch"] for row in history]

    def column(name: str) -> List[float]:
        return [row[name] for row in history]

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)

    ax_loss.plot(epochs, column("train_loss"), marker=".", label="train (cross-entropy)")
    ax_loss.plot(epochs, column("eval_loss"), marker=".", label="eval")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_aux = ax_loss.twinx()
    ax_aux.plot(epochs, column("train_aux_loss"), color="tab:green", linestyle="--", label="MoE aux (right)")
    ax_aux.set_ylabel("aux loss")
    lines = ax_loss.get_legend_handles_labels()
    aux_lines = ax_aux.get_legend_handles_labels()
    ax_loss.legend(lines[0] + aux_lines[0], lines[1] + aux_lines[1], fontsize="small")
    ax_loss.set_title("loss")

    ax_acc.plot(epochs, column("eval_top1"), marker=".", label="top-1")
    ax_acc.plot(epochs, column("eval_top5"), marker=".", label="top-5")
    if all("ema_eval_top1" in row for row in history):
        ax_acc.plot(epochs, column("ema_eval_top1"), marker=".", linestyle=":", label="EMA top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(f"validation accuracy (best top-1 {max(column('eval_top1')):.2f} %)")
    ax_acc.legend(fontsize="small")
    ax_acc.grid(alpha=0.3)

    ax_lr.plot(epochs, column("lr"), marker=".")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    return path
