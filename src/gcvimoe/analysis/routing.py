"""Routing maps: which expert each image region went to, per MoE layer, recorded from a model's own routing
introspection (:meth:`GlobalContextVit.routing_maps`, :meth:`GlobalContextVit.moe_report`) and drawn patch by patch."""
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn

from gcvimoe.analysis.style import expert_colors, layer_title
from gcvimoe.files import atomic_path


@dataclass
class RoutingRecord:
    """What a model's MoE layers did with a set of images, image by image and summed.

    Attributes:
        logits: Class logits ``[n, classes]``.
        maps: Layer name -> top-1 expert of every token ``[n, H, W]`` (the layer's token grid).
        unrouted: Layer name -> whether no expert computed the token ``[n, H, W]``.
        tokens_per_expert: Layer name -> assignments each expert was asked to take, before capacity ``[e]``.
        kept_tokens_per_expert: Layer name -> assignments each expert computed ``[e]``.
    """
    logits: torch.Tensor
    maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    unrouted: Dict[str, torch.Tensor] = field(default_factory=dict)
    tokens_per_expert: Dict[str, torch.Tensor] = field(default_factory=dict)
    kept_tokens_per_expert: Dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def record_routing(model: nn.Module, batches: Iterable[torch.Tensor]) -> RoutingRecord:
    """Run ``model`` (in eval mode) over image batches ``[b, c, h, w]`` and keep every MoE layer's routing."""
    model.eval()
    device = next(model.parameters()).device
    logits, maps, unrouted = [], defaultdict(list), defaultdict(list)
    requested, kept = {}, {}
    for images in batches:
        logits.append(model(images.to(device)).float().cpu())
        for name, expert_map in model.routing_maps().items():
            maps[name].append(expert_map.cpu())
        for name, unrouted_map in model.routing_maps(unrouted=True).items():
            unrouted[name].append(unrouted_map.cpu())
        for name, stats in model.moe_report().stats.items():
            requested[name] = requested.get(name, 0) + stats.tokens_per_expert.cpu()
            kept[name] = kept.get(name, 0) + stats.kept_tokens_per_expert.cpu()
    return RoutingRecord(
        logits=torch.cat(logits),
        maps={name: torch.cat(parts) for name, parts in maps.items()},
        unrouted={name: torch.cat(parts) for name, parts in unrouted.items()},
        tokens_per_expert=requested,
        kept_tokens_per_expert=kept,
    )


def class_expert_counts(maps: Dict[str, torch.Tensor], labels: Sequence[int], num_classes: int,
                        num_experts: int) -> Dict[str, np.ndarray]:
    """Per layer, ``[classes, experts]`` counts of the tokens of each class's images by their top-1 expert."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = {}
    for name, expert_map in maps.items():
        flat = expert_map.flatten(1)  # [n, H*W]
        cells = labels[:, None] * num_experts + flat
        counts[name] = torch.bincount(cells.flatten(), minlength=num_classes * num_experts).view(
            num_classes, num_experts).numpy()
    return counts


def sample_across_classes(targets: Sequence[int], per_class: int, max_images: int, seed: int = 0) -> List[int]:
    """Dataset indices of up to ``per_class`` images of every class, picked at random (reproducibly for a seed);
    when the classes would exceed ``max_images``, classes evenly spaced over the class list."""
    by_class = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[int(target)].append(index)
    classes = sorted(by_class)
    num_classes = max(1, max_images // per_class)
    if len(classes) > num_classes:
        classes = [classes[i * len(classes) // num_classes] for i in range(num_classes)]
    rng = np.random.default_rng(seed)
    chosen = []
    for target in classes:
        indices = by_class[target]
        picks = rng.choice(len(indices), size=min(per_class, len(indices)), replace=False)
        chosen.extend(indices[i] for i in sorted(picks))
    return chosen


def plot_routing_map(
        image: torch.Tensor,
        maps: Dict[str, torch.Tensor],
        unrouted: Dict[str, torch.Tensor],
        num_experts: int,
        path,
        title: str,
) -> Path:
    """Save one image and, beside it, every MoE layer's token grid with each token in its top-1 expert's colour.

    The colours are opaque, so they are exactly the legend's; the image's outline is drawn over each grid to show
    where the patches lie, and a token that no expert computed (dropped for capacity) is crossed out.

    Args:
        image: ``[c, h, w]`` in display range (0-1), as the model saw it.
        maps: Layer name -> ``[H, W]`` top-1 expert per token.
        unrouted: Layer name -> ``[H, W]`` whether no expert computed the token.
        num_experts: Experts per layer (sets the colours).
        path: Where the PNG goes.
        title: Figure title (the image and its prediction).
    """
    layers = list(maps)
    colors = np.array(expert_colors(num_experts) + [(1.0, 1.0, 1.0)])  # index -1 (no token) is white
    shown = image.detach().float().cpu().clamp(0, 1)
    grey = shown.mean(0).numpy()
    pixels = grey if shown.shape[0] == 1 else shown.permute(1, 2, 0).numpy()
    height, width = grey.shape
    extent = (0, width, height, 0)
    cols = min(1 + len(layers), 6)
    rows = -(-(1 + len(layers)) // cols)
    fig = Figure(figsize=(2.1 * cols + 1.3, 2.3 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    axes[0].imshow(pixels, cmap="gray" if shown.shape[0] == 1 else None, vmin=0, vmax=1, extent=extent)
    axes[0].set_title(f"input ({height}x{width} px)", fontsize="small")
    any_unrouted = False
    for ax, name in zip(axes[1:], layers, strict=False):  # the grid may have spare panels
        grid = maps[name].cpu().numpy()
        ax.imshow(colors[grid], extent=extent, interpolation="nearest")
        _draw_token_grid(ax, grid.shape, height, width)
        _draw_outline(ax, grey)
        crossed = unrouted[name].cpu().numpy()
        if crossed.any():
            any_unrouted = True
            ys, xs = np.nonzero(crossed)
            cell = 2.1 * 72 / max(grid.shape)  # a token's width in points
            ax.plot((xs + 0.5) * width / grid.shape[1], (ys + 0.5) * height / grid.shape[0], linestyle="none",
                    marker="x", markersize=min(0.5 * cell, 12), markeredgewidth=max(0.8, min(cell / 10, 2.5)),
                    color="black")
        size = "1 token" if grid.size == 1 else f"{grid.shape[0]}x{grid.shape[1]} tokens"
        ax.set_title(f"{layer_title(name)}\n{size}", fontsize="small")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1 + len(layers):]:
        ax.set_visible(False)
    used = sorted({int(e) for name in layers for e in maps[name].unique() if e >= 0})
    handles = [Patch(facecolor=colors[e], label=f"expert {e}") for e in used]
    if any_unrouted:
        handles.append(Line2D([], [], marker="x", color="black", linestyle="none", markeredgewidth=2,
                              label="dropped (no expert)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="top-1 expert",
               title_fontsize="small", frameon=False)
    fig.suptitle(title, fontsize="medium")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    return path


def _draw_token_grid(ax, grid_shape, height: int, width: int) -> None:
    """Thin white lines between tokens, where there are few enough of them to tell apart."""
    rows, cols = grid_shape
    if max(rows, cols) > 16:
        return
    for r in range(1, rows):
        ax.axhline(r * height / rows, color="white", linewidth=0.6)
    for c in range(1, cols):
        ax.axvline(c * width / cols, color="white", linewidth=0.6)


def _draw_outline(ax, grey: np.ndarray, max_side: int = 48) -> None:
    """The image's bright/dark boundary as a thin black line, so that the grid reads against the picture; traced on
    the image averaged down to ``max_side`` pixels, so that a photo gives a few shapes rather than its texture."""
    height, width = grey.shape
    scale = max(1, -(-max(height, width) // max_side))
    small = torch.nn.functional.avg_pool2d(torch.from_numpy(grey)[None, None], scale, ceil_mode=True)[0, 0].numpy()
    low, high = np.percentile(small, (5, 95))
    if high - low < 1e-3:  # a flat image has no outline
        return
    xs = (np.arange(small.shape[1]) + 0.5) * scale
    ys = (np.arange(small.shape[0]) + 0.5) * scale
    ax.contour(xs, ys, small, levels=[(low + high) / 2], colors="black", linewidths=0.9)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
