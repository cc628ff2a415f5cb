"""Expert usage: the share of routed tokens each expert of each MoE layer received, and the dropped share."""
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gcvimoe.files import atomic_path


def plot_expert_usage(experts: Dict[str, Dict], path, title: Optional[str] = None) -> Optional[Path]:
    """Save a layer x expert heatmap of token shares; returns None (and writes nothing) for a dense model.

    Args:
        experts: Layer name to ``{"tokens_per_expert": [share per expert], "dropped_fraction": share}``, as
            :meth:`gcvimoe.train.evaluate.ExpertUsage.summary` returns.
        path: Where the PNG goes.
        title: Figure title.
    """
    if not experts:
        return None
    names = list(experts)
    num_experts = max(len(experts[name]["tokens_per_expert"]) for name in names)
    shares = np.full((len(names), num_experts), np.nan)
    for i, name in enumerate(names):
        row = experts[name]["tokens_per_expert"]
        shares[i, :len(row)] = row

    fig = Figure(figsize=(1.2 + 0.55 * num_experts + 3.0, 1.2 + 0.45 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{name}  (dropped {experts[name]['dropped_fraction']:.1%})" for name in names],
                       fontsize="small")
    for i in range(len(names)):
        for j in range(num_experts):
            if not np.isnan(shares[i, j]):
                ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] < np.nanmax(shares) * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="share of routed tokens (uniform = 1/E)")
    ax.set_title(title or f"expert usage (uniform share {1 / num_experts:.2f})")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    return path
