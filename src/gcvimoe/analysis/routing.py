"""Routing maps: which expert each image region went to, per MoE layer, drawn over the image."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from gcvimoe.files import atomic_path


def plot_routing_maps(
        images: torch.Tensor,
        maps: Dict[str, torch.Tensor],
        num_experts: int,
        path,
        titles: Optional[Sequence[str]] = None,
) -> Path:
    """A grid: one row per image, the image then each MoE layer's top-1 expert map laid over it.

    Args:
        images: ``[b, c, h, w]`` images in display range (0-1).
        maps: Layer name -> ``[b, H, W]`` top-1 expert per token (-1 for none), e.g. from ``model.routing_maps()``.
        num_experts: Experts per layer (sets the colours).
        path: Where the PNG goes.
        titles: One caption per image (e.g. "7 (pred 7)").
    """
    layers: List[str] = list(maps)
    rows, cols = images.shape[0], 1 + len(layers)
    fig = Figure(figsize=(1.9 * cols, 1.9 * rows + 0.6), layout='constrained')
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    cmap = ListedColormap(colormaps['tab20'].colors[:num_experts] if num_experts <= 20
                          else colormaps['turbo'](np.linspace(0, 1, num_experts)))
    norm = BoundaryNorm(np.arange(-0.5, num_experts + 0.5), cmap.N)
    for row in range(rows):
        image = images[row].detach().float().cpu().clamp(0, 1)
        shown = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        extent = (0, image.shape[-1], image.shape[-2], 0)
        axes[row, 0].imshow(shown, cmap='gray' if image.shape[0] == 1 else None, extent=extent)
        axes[row, 0].set_title(titles[row] if titles else 'image', fontsize='small')
        for col, layer in enumerate(layers, start=1):
            expert_map = np.ma.masked_less(maps[layer][row].cpu().numpy(), 0)
            axes[row, col].imshow(shown, cmap='gray' if image.shape[0] == 1 else None, extent=extent)
            last = axes[row, col].imshow(expert_map, cmap=cmap, norm=norm, alpha=0.6, extent=extent,
                                         interpolation='nearest')
            if row == 0:
                axes[row, col].set_title(layer.removesuffix('.mlp').replace('stages.', 's').replace('.blocks.', ' b'),
                                         fontsize='small')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if layers:
        fig.colorbar(last, ax=axes[:, 1:].ravel().tolist(), ticks=range(num_experts), label='top-1 expert',
                     shrink=0.8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    return path
