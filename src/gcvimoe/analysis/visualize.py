"""Every routing figure of a model on a set of images, and ``stats.json`` with the numbers behind them:

- ``routing_maps/NN_<image>.png``: per image, each MoE layer's tokens in their top-1 expert's colour;
- ``expert_load.png``: per layer, the tokens each expert was asked to take and, where capacity applies, kept;
- ``class_expert.png``: per layer, which classes each expert serves (when the images have labels).
"""
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from gcvimoe.analysis.experts import plot_class_expert, plot_expert_load
from gcvimoe.analysis.routing import RoutingRecord, class_expert_counts, plot_routing_map, record_routing
from gcvimoe.analysis.style import capacity_applies, layer_title
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import write_text
from gcvimoe.moe import moe_layers


def visualize_routing(
        model: nn.Module,
        images: torch.Tensor,
        display: torch.Tensor,
        names: Sequence[str],
        class_names: Sequence[str],
        output,
        labels: Optional[Sequence[int]] = None,
        batch_size: int = 32,
) -> Dict[str, Any]:
    """Draw the routing figures of ``model`` on ``images`` into ``output`` and write ``stats.json``; returns it.

    Args:
        model: A model with MoE layers and ``routing_maps()`` (a GCViMoE).
        images: ``[n, c, h, w]`` model inputs, preprocessed as in training.
        display: The same images in display range (0-1).
        names: One name per image (its file, or its place in a dataset).
        class_names: The model's classes.
        output: The folder the figures go to.
        labels: The images' true classes, when known (the class x expert figure needs them).
        batch_size: Images per forward pass; where capacity applies, it decides which tokens are dropped.
    """
    layers = dict(moe_layers(model))
    if not layers:
        raise GcvimoeError("the model has no MoE layers: there is nothing to map")
    record = record_routing(model, images.split(batch_size))
    output = Path(output)
    num_experts = next(iter(layers.values())).num_experts
    top_k = next(iter(layers.values())).top_k
    stats: Dict[str, Any] = {"num_images": len(names), "batch_size": batch_size, "class_names": list(class_names),
                             "figures": {}}
    stats["images"] = _routing_map_figures(record, display, names, class_names, labels, num_experts, output)
    stats["layers"] = _layer_stats(record, layers)
    unit = "tokens" if top_k == 1 else f"token-expert assignments (top-{top_k})"
    plot_expert_load(stats["layers"], output / "expert_load.png", unit=unit,
                     title=f"expert load on {len(names)} images: {unit} per expert")
    stats["figures"]["expert_load"] = "expert_load.png"
    if labels is not None:
        counts = class_expert_counts(record.maps, labels, len(class_names), num_experts)
        present = sorted(set(int(label) for label in labels))
        for name, layer_counts in counts.items():
            stats["layers"][name]["class_tokens_per_expert"] = {
                class_names[c]: [int(n) for n in layer_counts[c]] for c in present}
        plot_class_expert({name: layer_counts[present] for name, layer_counts in counts.items()},
                          [class_names[c] for c in present], output / "class_expert.png",
                          title=f"which classes each expert serves ({len(names)} images, tokens by top-1 expert)")
        stats["figures"]["class_expert"] = "class_expert.png"
    write_text(output / "stats.json", json.dumps(stats, indent=1))
    return stats


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:60] or "image"


def _routing_map_figures(record: RoutingRecord, display, names, class_names, labels, num_experts,
                         output: Path) -> List[Dict[str, Any]]:
    probs = record.logits.softmax(dim=-1)
    folder = output / "routing_maps"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, name in enumerate(names):
        confidence, predicted = probs[i].max(dim=0)
        caption = f"{Path(name).name}: predicted {class_names[predicted]} ({confidence:.0%})"
        if labels is not None:
            caption = f"{name}: label {class_names[labels[i]]}, predicted {class_names[predicted]} ({confidence:.0%})"
        maps = {layer: expert_map[i] for layer, expert_map in record.maps.items()}
        unrouted = {layer: unrouted_map[i] for layer, unrouted_map in record.unrouted.items()}
        path = plot_routing_map(display[i], maps, unrouted, num_experts, folder / f"{i:02d}_{_file_stem(name)}.png",
                                caption)
        images.append({
            "image": name,
            "label": None if labels is None else class_names[labels[i]],
            "predicted": class_names[predicted],
            "probability": float(confidence),
            "figure": path.relative_to(output).as_posix(),
            "top1_expert": {layer: grid.tolist() for layer, grid in maps.items()},
            "dropped": {layer: grid.tolist() for layer, grid in unrouted.items() if grid.any()},
        })
    return images


def _layer_stats(record: RoutingRecord, layers: Dict[str, nn.Module]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for name, expert_map in record.maps.items():
        requested = record.tokens_per_expert[name]
        kept = record.kept_tokens_per_expert[name]
        out[name] = {
            "title": layer_title(name),
            "token_grid": list(expert_map.shape[1:]),
            "num_tokens": expert_map[0].numel() * expert_map.shape[0],
            "capacity_applies": capacity_applies(layers[name]),
            "tokens_per_expert": [int(n) for n in requested],
            "kept_tokens_per_expert": [int(n) for n in kept],
            "dropped_fraction": 1.0 - float(kept.sum()) / max(float(requested.sum()), 1.0),
            "top1_tokens_per_expert": [int(n) for n in torch.bincount(expert_map.flatten(),
                                                                      minlength=len(requested))],
        }
    return out
