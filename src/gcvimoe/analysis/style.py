"""What every figure shares: MoE layers named in the README's words, one fixed colour per expert, and when the
dropped share is worth showing."""
import re
from typing import List, Tuple

import numpy as np
from matplotlib import colormaps
from torch import nn

_LAYER_PATH = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.mlp$')

RGB = Tuple[float, float, float]


def layer_title(name: str) -> str:
    """``stages.2.blocks.1.mlp`` -> ``stage 3, block 2`` (1-based, as people say it); other names unchanged."""
    match = _LAYER_PATH.match(name)
    if match is None:
        return name
    stage, block = (int(index) + 1 for index in match.groups())
    return f"stage {stage}, block {block}"


def expert_colors(num_experts: int) -> List[RGB]:
    """One opaque colour per expert, the same in every figure of a model: tab10 up to 10 experts, tab20 up to 20,
    evenly spaced hues beyond (where no palette keeps every pair apart)."""
    if num_experts <= 10:
        return [tuple(c) for c in colormaps['tab10'].colors[:num_experts]]
    if num_experts <= 20:
        # tab20 holds dark/light pairs of one hue: the dark ten first, so experts 0-9 match the tab10 colours
        colors = colormaps['tab20'].colors
        return [tuple(c) for c in (colors[0::2] + colors[1::2])[:num_experts]]
    return [tuple(c[:3]) for c in colormaps['hsv'](np.linspace(0, 1, num_experts, endpoint=False))]


def capacity_applies(layer: nn.Module) -> bool:
    """Whether an MoE layer in evaluation can drop tokens: an evaluation capacity factor, or expert choice (whose
    experts each take a fixed number of tokens); dropless evaluation never drops, so a 0 % there says nothing."""
    return layer.config.router == 'expert_choice' or layer.config.eval_capacity_factor > 0
