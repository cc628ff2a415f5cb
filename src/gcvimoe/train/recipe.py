"""Training settings that follow the data: the warmup, augmentation and regularisation a config leaves null.

A user's first run is ``gcvimoe train --data-dir DIR`` with nothing else, so the keys below default to null and are
decided at start from the training set's size, the input size and the global batch (:func:`derive_recipe`); the
run's header prints each choice and why. A ``-c`` file or a flag that sets a key wins over the data.

The rules were tuned on a held-out part of Fashion-MNIST's training set (50,000 / 10,000 images) and checked against
the digits recipe; ``benchmarks/small_images.py`` reports what they reach on data that took no part in tuning.

- ``warmup_epochs``: about :data:`WARMUP_UPDATES` optimiser updates, at most :data:`MAX_WARMUP_FRACTION` of the
  schedule. A large set reaches the updates within an epoch; a small one would spend its whole run warming up, so
  the fraction caps it.
- ``scale`` (the random-resized-crop area range): the fewer images, the stronger the crops, since a small set is
  memorised sooner; larger inputs take stronger crops, since a crop of a large image keeps more of its content than
  a crop of a 28 px one.
- ``drop_path_rate``: more stochastic depth for fewer images, for the same reason.
- ``hflip``: 0 for the digits; for other data the training images decide (:mod:`gcvimoe.data.flip_probe`): when
  mirroring them costs a simple probe much of its accuracy (text, digits, symbols), no flips, else 0.5 (objects,
  clothes, scenes, textures).
"""
import math
from typing import Any, Dict, List, Optional, Tuple

from gcvimoe.data import DataConfig
from gcvimoe.data.flip_probe import flip_default

SMALL_IMAGE_MAX = 64
"""Inputs up to this size (px) count as small images (the crop range below)."""
WARMUP_UPDATES = 500
MAX_WARMUP_FRACTION = 0.25
LARGE_SET, SMALL_SET = 50_000, 5_000
"""Training-set sizes (images) where augmentation and regularisation reach their lightest and strongest settings;
between them they follow the logarithm of the size."""
SMALL_IMAGE_SCALE = (0.5, 1.0)  # crop area lower bound for a small / a large set of small images
LARGE_IMAGE_SCALE = (0.08, 0.35)  # the same for larger images (timm's ImageNet default at the small end)
DROP_PATH = (0.1, 0.0)  # stochastic depth for a small / a large set

DERIVED_RECIPE = ("warmup_epochs", "scale", "hflip", "drop_path_rate")
"""The config keys :func:`derive_recipe` decides when they are null."""


def _size_position(num_images: int) -> float:
    """0 for a set of :data:`SMALL_SET` images or fewer, 1 for :data:`LARGE_SET` or more, log-linear between."""
    if num_images <= SMALL_SET:
        return 0.0
    if num_images >= LARGE_SET:
        return 1.0
    return math.log(num_images / SMALL_SET) / math.log(LARGE_SET / SMALL_SET)


def _between(ends: Tuple[float, float], position: float) -> float:
    return round(ends[0] + (ends[1] - ends[0]) * position, 2)


def derive_recipe(values: Dict[str, Any], dataset: str, num_images: int, img_size: int, global_batch: int,
                  epochs: int, data_cfg: Optional[DataConfig] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The values for the keys of :data:`DERIVED_RECIPE` that ``values`` (a config as a dict) leaves null, and a
    header line per value saying why.

    Args:
        values: The config's keys and values; only null keys are decided.
        dataset: The data source's name (its ``mirror_symmetric``, when set, decides the flip).
        num_images: Training images.
        img_size: The model's input size in pixels.
        global_batch: Images per optimiser update over all processes.
        epochs: Epochs of the schedule.
        data_cfg: The data, for the flip probe to sample its training images; without it flips are assumed.
    """
    chosen: Dict[str, Any] = {}
    notes: List[str] = []
    small = img_size <= SMALL_IMAGE_MAX
    position = _size_position(num_images)
    size_words = f"{num_images} training images, {img_size} px"
    if values.get("warmup_epochs") is None:
        updates = max(1, num_images // global_batch)
        chosen["warmup_epochs"] = round(min(MAX_WARMUP_FRACTION * epochs, WARMUP_UPDATES / updates), 2)
        notes.append(f"warmup_epochs {chosen['warmup_epochs']:g} (from the data: about {WARMUP_UPDATES} updates at "
                     f"{updates} per epoch, at most {MAX_WARMUP_FRACTION:g} of {epochs} epochs)")
    if values.get("scale") is None:
        ends = SMALL_IMAGE_SCALE if small else LARGE_IMAGE_SCALE
        chosen["scale"] = [_between(ends, position), 1.0]
        notes.append(f"scale {chosen['scale']} (from the data: {size_words}; fewer or larger images, stronger "
                     "crops)")
    if values.get("drop_path_rate") is None:
        chosen["drop_path_rate"] = _between(DROP_PATH, position)
        notes.append(f"drop_path_rate {chosen['drop_path_rate']:g} (from the data: {num_images} training images; "
                     "fewer images, more stochastic depth)")
    if values.get("hflip") is None:
        chosen["hflip"], why = flip_default(dataset, data_cfg)
        notes.append(f"hflip {chosen['hflip']:g} ({why})")
    return chosen, notes
