"""Where a GCViMoE puts its experts: parse the placement forms users write into per-stage block indices.

Accepted forms (stages and blocks are 0-based in lists, 1-based in sentences, as people say them):

- ``None`` or ``"swin"``: the Swin-MoE / original GCViMoE placement, every other block of stage 3 (the
  global-query blocks, indices 1, 3, 5, ...: blocks 2, 4, 6 in words) and index 1 of stage 4 (its block 2). The
  registered variants replace ``None`` by their own first (gcvimoe_pico's is every 2nd block of stages 1-4).
- A per-stage list, the original project's form: ``[[-1], [-1], [1, 3, 5], [1]]`` (-1 = no experts in that stage).
- ``"every 2nd block of stages 3-4"`` (also ``"every 2 blocks in stage 3"``, ``"every block of stages 2-4"``): blocks
  1, 3, 5, ... (for 2), i.e. every k-th block counting from the first, in the named stages.
- ``"last 4 blocks"``: the last n blocks of the network; ``"last 4 odd blocks"`` (V-MoE): the last n odd-indexed.
- ``"all"`` and ``"none"``.
"""
import re
from typing import List, Sequence

from gcvimoe.errors import GcvimoeError
from gcvimoe.moe.config import MoEPlacement

_EVERY = re.compile(
    r'^every\s*(?:(\d+)\s*(?:st|nd|rd|th)?\s*)?(?:other\s*)?blocks?\s*(?:of|in)\s*stages?\s*(\d+)\s*(?:-\s*(\d+))?$')
_LAST = re.compile(r'^last\s*(\d+)\s*(odd\s*)?blocks?$')

_FORMS = ('"swin", "all", "none", "every 2nd block of stages 3-4", "last 4 blocks", "last 4 odd blocks", '
          'or a per-stage list like [[-1], [-1], [1, 3, 5], [1]]')


def _swin_placement(depths: Sequence[int]) -> List[List[int]]:
    placement = [[] for _ in depths]
    if len(depths) >= 2:
        placement[-2] = list(range(1, depths[-2], 2))
        placement[-1] = [1] if depths[-1] > 1 else []
    return placement


def _from_string(spec: str, depths: Sequence[int]) -> List[List[int]]:
    text = ' '.join(spec.lower().replace('_', ' ').split())
    if text in ('swin', 'default'):
        return _swin_placement(depths)
    if text == 'all':
        return [list(range(d)) for d in depths]
    if text == 'none':
        return [[] for _ in depths]
    match = _EVERY.match(text)
    if match:
        step = 2 if 'other' in text else int(match.group(1) or 1)
        first, last = int(match.group(2)), int(match.group(3) or match.group(2))
        if step < 1 or not 1 <= first <= last <= len(depths):
            raise GcvimoeError(
                f"moe_blocks {spec!r} names stages {first}-{last} with step {step}, but the model has stages "
                f"1-{len(depths)}; use stages within that range and a step of at least 1")
        return [list(range(step - 1, d, step)) if first - 1 <= s <= last - 1 else [] for s, d in enumerate(depths)]
    match = _LAST.match(text)
    if match:
        count, odd_only = int(match.group(1)), bool(match.group(2))
        available = [(s, b) for s, d in enumerate(depths) for b in range(d) if not odd_only or b % 2 == 1]
        if count > len(available):
            raise GcvimoeError(f"moe_blocks {spec!r} asks for {count} blocks but the model has only {len(available)} "
                               f"such blocks (depths {tuple(depths)}); ask for at most {len(available)}")
        chosen = available[len(available) - count:]
        return [[b for s2, b in chosen if s2 == s] for s in range(len(depths))]
    raise GcvimoeError(f"moe_blocks {spec!r} is not a placement gcvimoe understands; use {_FORMS}")


def resolve_moe_blocks(spec: MoEPlacement, depths: Sequence[int]) -> List[List[int]]:
    """Per-stage sorted block indices that get an MoE MLP.

    Args:
        spec: One of the forms in this module's docstring.
        depths: Blocks per stage.

    Raises:
        GcvimoeError: an unknown form, or an index past its stage's depth (the message names both).
    """
    if spec is None:
        return _swin_placement(depths)
    if isinstance(spec, str):
        return _from_string(spec, depths)
    stages = [list(s) if isinstance(s, (list, tuple)) else [s] for s in spec]
    if len(stages) != len(depths):
        raise GcvimoeError(f"moe_blocks has {len(stages)} stage lists but the model has {len(depths)} stages "
                           f"(depths {tuple(depths)}); give one list per stage, [-1] for none")
    placement = []
    for stage, (indices, depth) in enumerate(zip(stages, depths, strict=True)):
        chosen = set()
        for index in indices:
            if not isinstance(index, int) or isinstance(index, bool):
                raise GcvimoeError(f"moe_blocks stage {stage} holds {index!r}; block indices are integers")
            if index == -1:
                continue
            if not 0 <= index < depth:
                raise GcvimoeError(f"moe_blocks puts an expert layer in block {index} of stage {stage} (0-based), "
                                   f"but that stage has {depth} blocks (0-{depth - 1}); use an index below {depth}")
            chosen.add(index)
        placement.append(sorted(chosen))
    return placement
