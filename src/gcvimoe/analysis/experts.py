"""Expert usage: the share of routed tokens each expert of each MoE layer received (the training run's heatmap), the
tokens per expert before and after capacity, and which classes each expert serves."""
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from gcvimoe.analysis.style import expert_colors, layer_title
from gcvimoe.files import atomic_path


def _save(fig: Figure, path, dpi: int = 100) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format='png')
    return path


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_expert_usage(experts: Dict[str, Dict], path, title: Optional[str] = None,
                      show_dropped: bool = False) -> Optional[Path]:
    """Save a layer x expert heatmap of token shares; returns None (and writes nothing) for a dense model.

    Args:
        experts: Layer name to ``{"tokens_per_expert": [share per expert], "dropped_fraction": share}``, as
            :meth:`gcvimoe.train.evaluate.ExpertUsage.summary` returns.
        path: Where the PNG goes.
        title: Figure title.
        show_dropped: Name each layer's dropped share (when capacity applies; a dropless evaluation drops nothing).
    """
    if not experts:
        return None
    names = list(experts)
    num_experts = max(len(experts[name]["tokens_per_expert"]) for name in names)
    shares = np.full((len(names), num_experts), np.nan)
    for i, name in enumerate(names):
        row = experts[name]["tokens_per_expert"]
        shares[i, :len(row)] = row

    fig = _figure(2.6 + 0.55 * num_experts + 1.2, 1.3 + 0.4 * len(names))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(names)))
    labels = [layer_title(name) for name in names]
    if show_dropped:
        labels = [f"{label}  (dropped {experts[name]['dropped_fraction']:.1%})"
                  for label, name in zip(labels, names, strict=True)]
    ax.set_yticklabels(labels, fontsize="small")
    if num_experts * len(names) <= 400:  # beyond that the numbers no longer fit their cells
        for i in range(len(names)):
            for j in range(num_experts):
                if not np.isnan(shares[i, j]):
                    ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] < np.nanmax(shares) * 0.6 else "black")
    fig.colorbar(image, ax=ax,
                 label=f"share of the layer's tokens\n(uniform = 1/{num_experts} = {1 / num_experts:.3g})")
    ax.set_title(title or "expert usage", fontsize="medium")
    return _save(fig, path, dpi=110)


def plot_expert_load(layers: Dict[str, Dict], path, title: str, unit: str = "tokens") -> Path:
    """Save one bar chart per MoE layer: what each expert was asked to take and, where capacity applies, what it kept.

    Args:
        layers: Layer name to ``{"tokens_per_expert": [count], "kept_tokens_per_expert": [count],
            "capacity_applies": bool}``.
        path: Where the PNG goes.
        title: Figure title.
        unit: What a count counts ("tokens", or "token-expert assignments" for top-k > 1).
    """
    names = list(layers)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(0.9 + 3.3 * cols, 0.8 + 2.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):  # the grid may have spare panels
        _load_bars(ax, layers[name], layer_title(name), unit)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if not any(layers[name]["capacity_applies"] for name in names):
        title += " (dropless evaluation: every token kept)"
    else:
        fig.legend(handles=[Patch(facecolor="0.5", label="kept (computed)"),
                            Patch(facecolor="none", edgecolor="0.3", hatch="////", label="dropped by capacity")],
                   loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


def _load_bars(ax, layer: Dict, title: str, unit: str) -> None:
    requested = np.asarray(layer["tokens_per_expert"], dtype=float)
    kept = np.asarray(layer["kept_tokens_per_expert"], dtype=float)
    experts = np.arange(len(requested))
    colors = expert_colors(len(requested))
    ax.bar(experts, kept, color=colors, width=0.8)
    if layer["capacity_applies"]:
        ax.bar(experts, requested - kept, bottom=kept, color="none", edgecolor=colors, hatch="////", width=0.8,
               linewidth=0.8)
        dropped = 1.0 - kept.sum() / requested.sum() if requested.sum() else 0.0
        title = f"{title}: dropped {dropped:.1%}"
    ax.axhline(requested.sum() / len(requested), color="0.4", linestyle="--", linewidth=0.8)
    ax.text(1.0, requested.sum() / len(requested), " even", transform=ax.get_yaxis_transform(), va="center",
            fontsize="x-small", color="0.4")
    ax.set_title(title, fontsize="small")
    ax.set_xticks(experts if len(experts) <= 16 else experts[::max(1, len(experts) // 8)])
    ax.set_xlabel("expert")
    ax.set_ylabel(unit)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)


def plot_class_expert(counts: Dict[str, np.ndarray], class_names: Sequence[str], path, title: str) -> Path:
    """Save one class x expert heatmap per MoE layer: the share of each expert's tokens that came from each class.

    Args:
        counts: Layer name to ``[classes, experts]`` token counts by the tokens' top-1 expert.
        class_names: One name per row.
        path: Where the PNG goes.
        title: Figure title.
    """
    names = list(counts)
    num_classes, num_experts = next(iter(counts.values())).shape
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    panel_w, panel_h = 0.9 + 0.3 * num_experts, 0.8 + 0.24 * num_classes
    fig = _figure(1.2 + panel_w * cols, 0.6 + panel_h * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    annotate = num_classes * num_experts <= 160
    for ax, name in zip(axes, names, strict=False):  # the grid may have spare panels
        layer = np.asarray(counts[name], dtype=float)
        share = layer / np.maximum(layer.sum(axis=0, keepdims=True), 1.0)
        image = ax.imshow(share, cmap="magma_r", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        if annotate:
            for (i, j), count in np.ndenumerate(layer):
                if count:
                    ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_title(layer_title(name), fontsize="small")
        ax.set_xticks(range(num_experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(num_classes))
        ax.set_yticklabels(class_names, fontsize="x-small")
    axes[0].set_ylabel("class")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[:len(names)].tolist(), label="share of the expert's tokens", shrink=0.8)
    fig.suptitle(title + ("; numbers: tokens" if annotate else ""), fontsize="medium")
    return _save(fig, path)
